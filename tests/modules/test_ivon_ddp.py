"""IVONModule under DDP (2 CPU processes, gloo): both ranks draw the same noise (rank 0's seed is broadcast, so
DDP averages gradients taken at one theta), and the posterior state (m, h, g_bar) equals a single-process run on
the same global batches. Float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.modules.ivon import IVONModule
from lightning_bayes.optim import IVON

from gloo_exit import spawned_ddp
from shards import AlternateExamples

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


def rank_seeded_ivon(params, ess: float) -> IVON:
    """A different seed on each rank: the optimiser must agree on rank 0's (11, the single-process seed)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return IVON(params, ess, lr=0.1, hess_init=0.5, beta2=0.99, weight_decay=1e-2, mc_samples=2, seed=11 + rank)


class RecordingIVON(IVONModule):
    """Records the flat parameters at every training_step (the sampled theta)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double(),
                         optimizer=rank_seeded_ivon, dataset_size=32)
        self.draws: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.draws.append(torch.cat([p.detach().reshape(-1).clone() for p in self.parameters()]))
        return super().training_step(batch, batch_idx)


class Recorder(Callback):
    """Each rank writes its draws, mean and IVON state to ``rank<r>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        params = list(pl_module.parameters())
        torch.save({
            "draws": torch.stack(pl_module.draws),
            "mean": torch.cat([p.detach().reshape(-1) for p in params]),
            "hess": torch.cat([optimizer.state[p]["hess"].reshape(-1) for p in params]),
            "momentum": torch.cat([optimizer.state[p]["momentum"].reshape(-1) for p in params]),
            "seed": optimizer.seed,
        }, self.folder / f"rank{trainer.global_rank}.pt")


def fit(folder: Path, devices: int, batch_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, dtype=torch.float64, generator=generator)
    data = DataLoader(TensorDataset(x, torch.arange(32) % 3), batch_size=batch_size, sampler=AlternateExamples(32))
    folder.mkdir()
    Trainer(
        max_epochs=1, accelerator="cpu", devices=devices, strategy=spawned_ddp() if devices > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        use_distributed_sampler=False, callbacks=[Recorder(folder)],
    ).fit(RecordingIVON(), data)


def test_two_processes_draw_the_same_noise_and_reach_the_single_process_posterior(tmp_path: Path) -> None:
    """Rank r takes examples r, r + 2, ...: the two ranks' batches of 4 are the single process's batch of 8."""
    fit(tmp_path / "ddp", devices=2, batch_size=4)
    fit(tmp_path / "single", devices=1, batch_size=8)
    rank0, rank1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert rank0["seed"] == rank1["seed"] == single["seed"] == 11
    assert rank0["draws"].shape[0] == 8  # 4 steps x mc_samples 2
    assert torch.equal(rank0["draws"], rank1["draws"])
    for key in ("draws", "mean", "hess", "momentum"):
        assert torch.equal(rank0[key], rank1[key]), key
        # the mean gradient of 8 examples against the average of two means of 4: float64 round-off
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-10, atol=1e-12, msg=key)
