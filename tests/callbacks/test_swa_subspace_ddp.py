"""SWASubspace under DDP (2 CPU processes, gloo): every rank holds the same parameters and collects the same
snapshots locally, so the checkpointed moments are the closed-form moments of one rank's iterates (nothing
counted twice, no communication)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.callbacks.swa_subspace import SWASubspace
from lightning_bayes.modules.subspace_inference import swag_state_from_checkpoint

from gloo_exit import spawned_ddp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


class Regression(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Recorder(Callback):
    """Each rank writes its flat parameters after every optimiser step to ``steps<rank>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.steps = folder, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])

    def on_train_end(self, trainer, pl_module):
        torch.save(self.steps, self.folder / f"steps{trainer.global_rank}.pt")


def test_two_processes_collect_each_snapshot_once(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, dtype=torch.float64, generator=generator)
    data = DataLoader(TensorDataset(x, torch.sin(x.sum(1, keepdim=True))), batch_size=4)  # 4 steps per rank and epoch
    Trainer(
        max_epochs=3, accelerator="cpu", devices=2, strategy=spawned_ddp(), logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[SWASubspace(params="all", start_epoch=1, every_n_steps=1, max_rank=3),
                   ModelCheckpoint(dirpath=tmp_path, save_last=True), Recorder(tmp_path)],
    ).fit(Regression(), data)
    state = swag_state_from_checkpoint(str(tmp_path / "last.ckpt"))["moments"]
    rank0, rank1 = torch.load(tmp_path / "steps0.pt"), torch.load(tmp_path / "steps1.pt")
    assert all(torch.equal(rank0[s], rank1[s]) for s in rank0)  # the premise: the ranks' parameters agree
    thetas = torch.stack([rank0[s] for s in range(5, 13)])  # steps 5..12: epochs 2 and 3
    assert state["count"].item() == 8
    torch.testing.assert_close(state["mean"], thetas.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(state["sq_mean"], thetas.square().mean(0), rtol=0, atol=1e-12)
    last = torch.stack([thetas[i] - thetas[: i + 1].mean(0) for i in range(5, 8)])
    rows = torch.roll(state["deviations"], -int(state["position"]), dims=0)
    torch.testing.assert_close(rows, last, rtol=0, atol=1e-12)
