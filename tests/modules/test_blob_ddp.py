"""BLoB under DDP (2 CPU processes, gloo): with one weight draw per step shared by the batch (no local
reparameterisation) and the same generator state on every rank, the two ranks' batches of 4 give the single
process's batch of 8, so the means, the scales and both optimisers' states equal the single-process run's. This
holds only if the NLL gradients (rho's included, which the KL optimiser steps) are averaged across ranks and the KL
step, taken outside the forward pass, is the same on every rank. Float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.modules import BLoB

from shards import AlternateExamples

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


class SameNoiseBLoB(BLoB):
    """Every process starts its weight draws from the same generator state."""

    def on_train_start(self) -> None:
        super().on_train_start()
        torch.manual_seed(5)


def adamw(params) -> torch.optim.AdamW:  # module level: ddp_spawn pickles the module with its optimiser factory
    return torch.optim.AdamW(params, lr=0.05)


class Recorder(Callback):
    """Each rank writes its parameters and AdamW moments to ``rank<r>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        adamw = trainer.optimizers[0]
        state = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        state |= {f"{name}.exp_avg_sq": adamw.state[p]["exp_avg_sq"].clone()
                  for name, p in pl_module.named_parameters() if p in adamw.state}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def fit(folder: Path, devices: int, batch_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, dtype=torch.float64, generator=generator)
    data = DataLoader(TensorDataset(x, torch.arange(32) % 3), batch_size=batch_size, sampler=AlternateExamples(32))
    torch.manual_seed(0)
    module = SameNoiseBLoB(
        nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double(), params="0.*", prior_scale=0.5,
        init_eps=0.2, kl_lr=0.05, cycle_exponent=40.0, local_reparameterization=False, dataset_size=32,
        optimizer=adamw,
    )
    folder.mkdir()
    Trainer(
        max_epochs=2, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        use_distributed_sampler=False, callbacks=[Recorder(folder)],
    ).fit(module, data)


def test_two_processes_reach_the_single_process_posterior(tmp_path: Path) -> None:
    fit(tmp_path / "ddp", devices=2, batch_size=4)
    fit(tmp_path / "single", devices=1, batch_size=8)
    rank0, rank1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert set(rank0) == set(single) and "backbone.0.weight.raw_scale" in single
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name
        # the mean gradient of 8 examples against the average of two means of 4: float64 round-off
        torch.testing.assert_close(rank0[name], value, rtol=1e-9, atol=1e-12, msg=name)
