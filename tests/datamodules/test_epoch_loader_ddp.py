"""On 2 CPU processes (gloo) with a loader worker each, a fit resumed at an epoch boundary or inside an epoch ends
with the unstopped fit's weights on every rank: Lightning's ``DistributedSampler`` takes the right epoch before the
resumed iterator draws its indices (``EpochLoader``; Lightning-AI/pytorch-lightning#21938 replays epoch 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer

from lightning_bayes.datamodules import DigitsDataModule
from lightning_bayes.models import MLP
from lightning_bayes.modules import MAP

from gloo_exit import spawned_ddp

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch"),
]


class _Stops(Callback):
    """Saves ``path`` and stops after batch ``batch_idx`` of epoch 1, or after epoch 0 if ``batch_idx`` is None."""

    def __init__(self, path: Path, batch_idx: int | None) -> None:
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == self.batch_idx:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0 and self.batch_idx is None:
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.path)
        trainer.should_stop = True


class _RankWeights(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")


def _fit(folder: Path, callbacks: list[Callback], ckpt_path: Path | None = None) -> list[dict[str, torch.Tensor]]:
    folder.mkdir()
    torch.manual_seed(0)
    Trainer(
        max_epochs=3, accelerator="cpu", devices=2, strategy=spawned_ddp(), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        callbacks=[*callbacks, _RankWeights(folder)],
    ).fit(MAP(MLP(64, 10, hidden=[16])), datamodule=DigitsDataModule(batch_size=32, num_workers=1),
          ckpt_path=ckpt_path, weights_only=False)  # fmt: skip
    return [torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)]


def test_two_processes_with_loader_workers_resume_where_they_stopped(tmp_path: Path) -> None:
    straight = _fit(tmp_path / "straight", [])
    for name, stop_after_batch in (("boundary", None), ("inside", 2)):
        ckpt = tmp_path / f"{name}.ckpt"
        _fit(tmp_path / f"stopped_{name}", [_Stops(ckpt, stop_after_batch)])
        resumed = _fit(tmp_path / f"resumed_{name}", [], ckpt_path=ckpt)
        for rank in (0, 1):
            for key, value in straight[rank].items():
                assert torch.equal(value, resumed[rank][key]), (name, rank, key)


class _Labels(Callback):
    """Every training batch's labels, per epoch, saved by each rank as ``rank<r>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch[1].clone()))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.seen, self.folder / f"rank{trainer.global_rank}.pt")


def test_shuffle_false_keeps_one_order_under_ddp(tmp_path: Path) -> None:
    """Lightning puts a shuffling DistributedSampler in every training loader; the datamodule's ``shuffle=False`` gives
    it an unshuffled one: rank r takes examples r, r + 2, ... in the one-process order, the same every epoch."""
    data = DigitsDataModule(batch_size=16, shuffle=False)
    data.setup("fit")
    labels = data.train_set.tensors[1]
    Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy=spawned_ddp(), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_train_batches=3, limit_val_batches=0,
        callbacks=[_Labels(tmp_path)],
    ).fit(MAP(MLP(64, 10, hidden=[16])), datamodule=data)
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        expected = labels[rank::2][:48].split(16)
        assert [epoch for epoch, _ in seen] == [0, 0, 0, 1, 1, 1]
        for (_, batch), own in zip(seen, [*expected, *expected]):
            assert torch.equal(batch, own)
