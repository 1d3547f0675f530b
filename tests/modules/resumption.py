"""Exact resumption, shared by module tests: a fit stopped one epoch early and resumed from its ``last.ckpt`` ends
where the uninterrupted fit ends, bit for bit in every state-dict entry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule

class SavesInsideAnEpoch(Callback):
    """Saves a checkpoint to ``path`` after batch ``batch_idx`` of epoch ``epoch`` (inside it, not at its end)."""

    def __init__(self, path: Path, epoch: int = 1, batch_idx: int = 2) -> None:
        self.path, self.epoch, self.batch_idx = path, epoch, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


Run = Callable[[int, Path, "str | None"], LightningModule]  # (epochs, root folder, checkpoint to resume) -> module


def assert_resumption_is_exact(run: Run, folder: Path, epochs: int) -> LightningModule:
    """Fit ``epochs`` straight, ``epochs - 1`` then resume to ``epochs``; compare the state dicts; return the resumed."""
    straight = run(epochs, folder / "straight", None)
    run(epochs - 1, folder / "stopped", None)
    resumed = run(epochs, folder / "resumed", str(folder / "stopped" / "last.ckpt"))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    return resumed
