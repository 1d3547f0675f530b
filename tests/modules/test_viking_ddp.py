"""VIKING under DDP (2 CPU processes, gloo): each rank carries its own noise (the spec's choice: independent Monte
Carlo samples, each rank sweeping its own shard), so DDP must not broadcast rank 0's noise buffers, and a resumed
run restores every rank's own noise and generator, continuing exactly where the uninterrupted run goes. Float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.modules.viking import VIKING

from ddp_comparison import ValidationRecorder, rank_states, spawn_trainer
from gloo_exit import spawned_ddp
from shards import AlternateBatches, AlternateExamples
from test_viking_module import assert_in_kernel

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")

NOISE = ("epoch_noise", "carried", "sample_noise", "sample_kernel")


def adam(params) -> torch.optim.Adam:  # module level: ddp_spawn pickles the module with its optimiser factory
    return torch.optim.Adam(params, lr=1e-2)


class Recorder(Callback):
    """Each rank writes to ``rank<r>.pt`` its state after training, the last batch of its last epoch and
    ``theta_hat`` at that epoch's start (where the sweep projected), and after every step the epoch noise."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # before the module's hook, which sweeps
        self.theta = pl_module.function.theta().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.last_batch = [part.clone() for part in batch]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(pl_module.epoch_noise.clone())

    def on_train_end(self, trainer, pl_module) -> None:
        state = {name: value.clone() for name, value in pl_module.state_dict().items()}
        state |= {"generator": pl_module.generator.get_state(), "seen": torch.stack(self.seen),
                  "sweep_theta": self.theta, "last_x": self.last_batch[0], "last_y": self.last_batch[1]}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def fit(folder: Path, epochs: int, gamma: float, resume: Path | None = None,
        find_unused_parameters: bool = True) -> None:
    generator = torch.Generator().manual_seed(1)
    y = torch.arange(32) % 2
    x = torch.randn(32, 2, dtype=torch.float64, generator=generator) * 0.4 + (2.0 * y[:, None] - 1.0)
    data = DataLoader(TensorDataset(x, y), batch_size=4, sampler=AlternateExamples(32))
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    module = VIKING(network, phase_epochs=(1, 1, 2), gamma=gamma, num_samples=3, optimizer=adam)
    folder.mkdir()
    spawn_trainer(
        2, [Recorder(folder), ModelCheckpoint(dirpath=folder, save_last=True)], max_epochs=epochs,
        strategy=spawned_ddp(find_unused_parameters),
        enable_checkpointing=True, default_root_dir=folder,
    ).fit(module, data, ckpt_path=resume, weights_only=False)  # the hyperparameters hold the optimiser factory


def test_each_rank_keeps_its_own_noise_through_training(tmp_path: Path) -> None:
    fit(tmp_path / "run", epochs=3, gamma=1.0)
    ranks = rank_states(tmp_path / "run")
    for name in NOISE:
        assert not torch.equal(ranks[0][name], ranks[1][name]), name
    assert torch.equal(ranks[0]["backbone.0.weight"], ranks[1]["backbone.0.weight"])  # gradients are averaged
    for state in ranks:
        # gamma = 1: the ELBO epoch's 4 steps used this rank's epoch-start noise (the seen buffer, not rank 0's)
        assert torch.equal(state["seen"][-4:], state["epoch_noise"].expand(4, -1))
        # this rank's sweep ended on its own last batch: its samples lie in that batch's loss kernel
        module = VIKING(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double(), num_samples=3)
        jacobian = module.function.jacobian(state["last_x"], state["last_y"], state["sweep_theta"])
        assert_in_kernel(jacobian, state["sample_kernel"])


@pytest.mark.slow  # two processes, 25-55 s on 2 cores: CI runs the slow suite too
def test_a_resumed_run_restores_every_ranks_noise_and_continues_exactly(tmp_path: Path) -> None:
    fit(tmp_path / "straight", epochs=4, gamma=0.2)
    fit(tmp_path / "stopped", epochs=3, gamma=0.2)
    fit(tmp_path / "resumed", epochs=4, gamma=0.2, resume=tmp_path / "stopped" / "last.ckpt")
    straight_ranks, resumed_ranks = rank_states(tmp_path / "straight"), rank_states(tmp_path / "resumed")
    assert len(straight_ranks) == len(resumed_ranks) == 2
    for straight, resumed in zip(straight_ranks, resumed_ranks):
        for name, value in straight.items():
            if name != "seen":
                assert torch.equal(value, resumed[name]), name


def test_ddp_that_does_not_look_for_unused_parameters_is_refused_before_the_first_step(tmp_path: Path) -> None:
    # the MLE phase leaves the two scales without gradients, the warm-up the network
    with pytest.raises(Exception, match=r"phase_epochs=\(1, 1, 2\).*strategy='ddp_find_unused_parameters_true'"):
        fit(tmp_path / "run", epochs=1, gamma=0.2, find_unused_parameters=False)


def test_ranks_log_the_kernel_residual_of_the_whole_validation_set(tmp_path: Path) -> None:
    """Each rank's noise is its own, so the residual of its validation shard is too (0.433 and 0.207): the logged value
    is their batch-weighted mean on every rank, not rank 0's alone."""
    generator = torch.Generator().manual_seed(2)
    y = torch.arange(16) % 2
    x = torch.randn(16, 2, dtype=torch.float64, generator=generator) * 0.4 + (2.0 * y[:, None] - 1.0)
    validation = DataLoader(TensorDataset(x, y), batch_size=8, sampler=AlternateBatches(16, 8))
    train = DataLoader(TensorDataset(x, y), batch_size=4, sampler=AlternateExamples(16))
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    module = VIKING(network, phase_epochs=(1, 0, 1), num_samples=3, optimizer=adam)
    spawn_trainer(2, [ValidationRecorder(tmp_path)], max_epochs=2, strategy=spawned_ddp(True)).fit(
        module, train, validation
    )
    ranks = [torch.load(tmp_path / f"val{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["val/kernel_residual"] == ranks[1]["val/kernel_residual"] > 0
