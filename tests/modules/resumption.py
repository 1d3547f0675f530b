"""Exact resumption, shared by module tests: a fit stopped early and resumed from its checkpoint ends where the
uninterrupted fit ends, bit for bit in every state-dict entry, whether it stopped at an epoch's end, inside one, or
on an epoch's last batch (which Lightning resumes without that epoch's end hooks and the next one's start hooks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint


class SavesInsideAnEpoch(Callback):
    """Saves a checkpoint to ``path`` after batch ``batch_idx`` of epoch ``epoch`` (inside it, not at its end; -1:
    its last batch), and stops the fit there if ``stop``."""

    def __init__(self, path: Path, epoch: int = 1, batch_idx: int = 2, stop: bool = False) -> None:
        self.path, self.epoch, self.batch_idx, self.stop = path, epoch, batch_idx, stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = self.batch_idx == -1 and batch_idx == trainer.num_training_batches - 1
        if trainer.current_epoch == self.epoch and (batch_idx == self.batch_idx or last):
            trainer.save_checkpoint(self.path)
            trainer.should_stop = self.stop


# (epochs, root folder, checkpoint to resume, callbacks to add) -> the fitted module
Run = Callable[[int, Path, "str | None", "list[Callback]"], LightningModule]


STOPS = ("epoch_end", "inside", "last_batch")  # where a fit may stop: see assert_resumption_is_exact


def assert_resumption_is_exact(run: Run, folder: Path, epochs: int, stop: str = "epoch_end") -> LightningModule:
    """Fit ``epochs`` straight; fit again, stopping after epoch ``epochs - 1`` (``"epoch_end"``: ``last.ckpt``),
    after batch 1 of that epoch (``"inside"``: the training loader must be resumable, a torchdata
    ``StatefulDataLoader``) or after its last batch (``"last_batch"``); resume to ``epochs``; compare the state
    dicts; return the resumed module."""
    stopped = folder / "stopped"
    if stop != "epoch_end":
        ckpt = stopped / "inside.ckpt"
        batch_idx = 1 if stop == "inside" else -1
        run(epochs, stopped, None, [SavesInsideAnEpoch(ckpt, epoch=epochs - 2, batch_idx=batch_idx, stop=True)])
    else:
        ckpt = stopped / "last.ckpt"
        run(epochs - 1, stopped, None, [ModelCheckpoint(dirpath=stopped, save_last=True)])
    straight = run(epochs, folder / "straight", None, [])
    resumed = run(epochs, folder / "resumed", str(ckpt), [])
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    return resumed
