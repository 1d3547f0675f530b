"""The training shuffle depends on the seed and the epoch only: a run resumed at an epoch boundary trains on the
unstopped run's batches and ends with the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_bayes.datamodules import DigitsDataModule, EpochShuffle
from lightning_bayes.models import MLP
from lightning_bayes.modules import MAP


def test_each_epochs_order_is_a_function_of_seed_and_epoch() -> None:
    data = range(50)
    sampler = EpochShuffle(data, seed=7)
    first, second = list(sampler), list(sampler)  # without set_epoch: epochs 0 and 1
    assert sorted(first) == list(data) and first != second
    for epoch in (3, 1, 0):  # any order of epochs, whatever was drawn before
        sampler.set_epoch(epoch)
        expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 + 1_000_003 * epoch)).tolist()
        assert list(sampler) == expected
    assert list(EpochShuffle(data, seed=8)) != first


def _fit(epochs: int, root: Path | None = None, ckpt_path: Path | None = None, num_workers: int = 0) -> MAP:
    torch.manual_seed(0)
    module = MAP(MLP(64, 10, hidden=[16]))
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True)] if root is not None else []
    Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=root is not None, callbacks=callbacks, limit_val_batches=0,
    ).fit(module, datamodule=DigitsDataModule(batch_size=64, num_workers=num_workers), ckpt_path=ckpt_path,
          weights_only=False)  # fmt: skip
    return module


@pytest.mark.parametrize("num_workers", [0, 1])  # a worker draws indices before Lightning calls set_epoch
def test_resuming_at_an_epoch_boundary_ends_with_the_unstopped_weights(tmp_path: Path, num_workers: int) -> None:
    straight = _fit(3, num_workers=num_workers)
    _fit(1, tmp_path, num_workers=num_workers)
    resumed = _fit(3, ckpt_path=tmp_path / "last.ckpt", num_workers=num_workers)  # must not replay epoch 0
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), name
