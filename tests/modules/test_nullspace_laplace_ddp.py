"""NullSpaceLaplace on 2 CPU processes (gloo): each process sweeps every training batch and projects its share of
the samples (3 and 2 of 5); the shares, summed at the end of each sweep and before a checkpoint, give the
samples, rank estimate, alpha and line-search scale of the one-process fit; a mid-sweep checkpoint holds every
process's rows, and resuming on 2 processes after the first sweep ends where the unstopped fit ends (to round-off)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_bayes.modules import NullSpaceLaplace

from ddp_comparison import ValidationRecorder, rank_states, spawn_trainer
from shards import AlternateBatches
from test_nullspace_laplace import make_data, make_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


class SavesMidSweep(Callback):
    """Saves ``sweep1.ckpt`` after the first sweep, ``mid.ckpt`` after the third batch of the second and each
    rank's state dict at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            trainer.save_checkpoint(self.folder / "mid.ckpt")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.folder / "sweep1.ckpt")

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")


def _fit(folder: Path, devices: int, ckpt_path: Path | None = None) -> None:
    folder.mkdir()
    loader, _, _ = make_data()
    module = NullSpaceLaplace(make_model(), num_samples=5, rtol=1e-12, scale="line_search", scale_batches=2)
    spawn_trainer(devices, [SavesMidSweep(folder)], max_epochs=3).fit(module, loader, ckpt_path=ckpt_path)


@pytest.mark.slow  # two processes, 25-55 s on 2 cores: CI runs the slow suite too
def test_two_processes_share_the_samples_and_give_the_one_process_posterior(tmp_path: Path) -> None:
    _fit(tmp_path / "two", 2)
    _fit(tmp_path / "one", 1)
    rank0, rank1 = rank_states(tmp_path / "two")
    (single,) = rank_states(tmp_path / "one")
    assert int(single["projections.sweeps_done"]) == 3 and float(single["scale_value"]) != 1.0  # the search ran
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-13, msg=name)  # per-row products: same
    moved = (single["projections.samples"] - single["projections.noise"]).norm(dim=1)
    assert (moved > 0.1).all()  # both shares (rows 0-2 on rank 0, 3-4 on rank 1) were projected
    two, one = (torch.load(tmp_path / run / "mid.ckpt", weights_only=False)["state_dict"] for run in ("two", "one"))
    assert not torch.equal(one["projections.samples"], single["projections.samples"])  # saved mid-sweep
    torch.testing.assert_close(two["projections.samples"], one["projections.samples"], rtol=0, atol=1e-13)
    _fit(tmp_path / "resumed", 2, ckpt_path=tmp_path / "two" / "sweep1.ckpt")  # resuming = not stopping
    for resumed in rank_states(tmp_path / "resumed"):  # its Gram factors are recomputed, not cached: round-off
        for name, value in rank0.items():
            torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-13, msg=name)


@pytest.mark.slow  # two processes, 25-55 s on 2 cores: CI runs the slow suite too
@pytest.mark.parametrize("loader_class", [DataLoader, StatefulDataLoader])  # Lightning splits the latter's batches
def test_a_split_training_loader_is_refused_by_name(loader_class: type[DataLoader]) -> None:
    _, x, y = make_data()
    loader = loader_class(TensorDataset(x, y), batch_size=4)
    with pytest.raises(Exception, match=r"set use_distributed_sampler=False"):
        spawn_trainer(2, [], max_epochs=1, use_distributed_sampler=True).fit(NullSpaceLaplace(make_model()), loader)


def test_a_split_validation_set_logs_the_kernel_residual_of_all_of_it(tmp_path: Path) -> None:
    """Ranks validating alternate batches log the residual ``||J v|| / ||v||`` of the whole set, as one process does:
    each rank logged its own shard's (0.676 and 0.795 against 0.735) and the logger wrote rank 0's."""
    generator = torch.Generator().manual_seed(2)
    held_out = TensorDataset(torch.randn(16, 30, dtype=torch.float64, generator=generator),
                             torch.randint(0, 3, (16,), generator=generator))
    for devices in (2, 1):
        folder = tmp_path / f"d{devices}"
        folder.mkdir()
        module = NullSpaceLaplace(make_model(), num_samples=5, rtol=1e-12)
        validation = DataLoader(held_out, batch_size=8, sampler=AlternateBatches(16, 8))
        spawn_trainer(devices, [ValidationRecorder(folder)], max_epochs=2).fit(module, make_data()[0], validation)
    one = torch.load(tmp_path / "d1" / "val0.pt")
    for rank in (0, 1):
        two = torch.load(tmp_path / "d2" / f"val{rank}.pt")
        assert two["val/kernel_residual"] == pytest.approx(one["val/kernel_residual"], rel=1e-9)
        assert two["val/nll"] == pytest.approx(one["val/nll"], rel=1e-9)
