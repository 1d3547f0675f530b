"""CurveTraining under DDP (2 CPU processes): every rank draws the same t, the curve-point weight decay and
the Jensen-Shannon gradients are averaged like the loss's, and the grid sums are pooled, so two ranks with
half batches train the same control points and log the same values as one process with whole batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.callbacks.curve_training import CurveTraining
from lightning_bayes.modules import MAP

from gloo_exit import spawned_ddp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def sgd(params):
    return torch.optim.SGD(params, lr=0.2)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, dtype=torch.float64, generator=generator)
    return x, (x[:, 0] * x[:, 1] > 0).long()


def run(tmp_path: Path, devices: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    tmp_path.mkdir()
    ends = []
    for seed in (1, 2):
        ends.append(str(tmp_path / f"end{seed}.pt"))
        torch.save(MAP(mlp(seed)).state_dict(), ends[-1])
    module = MAP(mlp(0), optimizer=sgd)
    callback = CurveTraining(params="all", start=ends[0], end=ends[1], weight_decay=0.1, js_weight=1.0, grid_points=3)
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=64 // devices)  # each step sees all 64 examples
    trainer = Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=devices,
        strategy=spawned_ddp() if devices > 1 else "auto",
        logger=False,
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader, loader)
    # under ddp_spawn the main process's module was never set up: the trained curve is in the checkpoint
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    points = {name: value for name, value in saved.items() if "point_1" in name}
    logged = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("curve/")}
    return points, logged


@pytest.mark.slow  # two processes, 25-55 s on 2 cores: CI runs the slow suite too
def test_two_processes_train_the_single_process_curve(tmp_path: Path) -> None:
    single_points, single_logged = run(tmp_path / "single", 1)
    ddp_points, ddp_logged = run(tmp_path / "ddp", 2)
    assert len(single_points) == 4 and set(ddp_points) == set(single_points)
    for name, value in single_points.items():
        torch.testing.assert_close(ddp_points[name], value, rtol=0, atol=1e-12)  # float64 sums in another order
    assert {"curve/val_max_nll", "curve/val_max_error"} <= set(single_logged)
    for name, value in single_logged.items():
        assert ddp_logged[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
