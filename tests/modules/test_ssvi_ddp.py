"""SSVI under DDP (2 CPU processes, gloo): a support update ranks weights by the growth gradient, a gradient of
the masked mean that DDP does not average (it averages parameter gradients only), so the module averages it
across ranks; then every rank drops and grows the same weights and the masks, means, scales and Adam moments equal
the single process's on the same global batches (weight draws shared by the batch, one seeded stream on every
rank: the two ranks' batches of 4 are the single process's batch of 8). Float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.modules import SSVI

from shards import AlternateExamples

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


class SameNoiseSSVI(SSVI):
    """Every process starts its weight draws from the same generator state."""

    def on_train_start(self) -> None:
        super().on_train_start()
        torch.manual_seed(5)


def adam(params) -> torch.optim.Adam:  # module level: ddp_spawn pickles the module with its optimiser factory
    return torch.optim.Adam(params, lr=0.05)


class Recorder(Callback):
    """Each rank writes its state dict and Adam moments to ``rank<r>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        adam = trainer.optimizers[0]
        state = {name: value.clone() for name, value in pl_module.state_dict().items()}
        state |= {f"{name}.exp_avg": adam.state[p]["exp_avg"].clone()
                  for name, p in pl_module.named_parameters() if p in adam.state}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def fit(folder: Path, devices: int, batch_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, dtype=torch.float64, generator=generator)
    data = DataLoader(TensorDataset(x, torch.arange(32) % 3), batch_size=batch_size, sampler=AlternateExamples(32))
    torch.manual_seed(0)
    module = SameNoiseSSVI(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double(), density=0.5, update_every=2,
        drop_fraction=0.3, local_reparameterization=False, dataset_size=32, optimizer=adam,
    )
    folder.mkdir()
    Trainer(
        max_epochs=2, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[Recorder(folder)],
    ).fit(module, data)


def test_two_processes_update_the_supports_as_one_process(tmp_path: Path) -> None:
    fit(tmp_path / "ddp", devices=2, batch_size=4)
    fit(tmp_path / "single", devices=1, batch_size=8)
    rank0, rank1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert int(single["iteration"]) == 8  # updates at iterations 2, 4 and 6 (the last quarter is frozen)
    initial = SSVI(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double(), density=0.5, seed=0)
    masks = [name for name in single if name.endswith("mask")]
    assert masks and any(not torch.equal(single[m], initial.state_dict()[m]) for m in masks)  # supports moved
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name
        # the mean gradient of 8 examples against the average of two means of 4: float64 round-off
        torch.testing.assert_close(rank0[name], value, rtol=1e-9, atol=1e-12, msg=name)
