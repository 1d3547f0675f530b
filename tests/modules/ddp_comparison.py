"""A fit on 2 CPU processes (``ddp_spawn``, gloo) against one process on the same global batches, for methods that
draw one weight sample per step from torch's global generator: both runs restart that generator at the start of
training, the ranks take alternate examples (their batches of 4 are the one process's batch of 8), and each rank
writes its state dict and Adam moments, to be compared entry by entry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from gloo_exit import spawned_ddp
from shards import AlternateExamples

EXAMPLES = 32


class SameNoise:
    """Mixed into a module: every process starts its weight draws from the same generator state."""

    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        torch.manual_seed(5)


def adam(params) -> torch.optim.Adam:  # module level: ddp_spawn pickles the module with its optimiser factory
    return torch.optim.Adam(params, lr=0.05)


def adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=0.05)


class StateRecorder(Callback):
    """Each rank writes its state dict and the first optimiser's Adam moments to ``rank<r>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        state = {name: value.clone() for name, value in pl_module.state_dict().items()}
        for name, p in pl_module.named_parameters():
            for moment in ("exp_avg", "exp_avg_sq"):
                if p in optimizer.state:
                    state[f"{name}.{moment}"] = optimizer.state[p][moment].clone()
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


class ValidationRecorder(Callback):
    """Each rank writes the validation metrics Lightning holds after the fit's last validation."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_validation_end(self, trainer, pl_module) -> None:
        logged = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
        torch.save(logged, self.folder / f"val{trainer.global_rank}.pt")


def spawn_trainer(devices: int, callbacks: list[Callback], **overrides) -> Trainer:
    """A quiet CPU Trainer: ``devices`` processes under ``ddp_spawn`` (one: no strategy), leaving gloo cleanly, the caller's samplers."""
    options = {
        "accelerator": "cpu", "devices": devices, "strategy": spawned_ddp() if devices > 1 else "auto", "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
        "use_distributed_sampler": False, "num_sanity_val_steps": 0, "callbacks": callbacks,
    }  # fmt: skip
    return Trainer(**{**options, **overrides})


def rank_states(folder: Path) -> list[dict]:
    """What each rank wrote to ``folder/rank<r>.pt``, by rank."""
    return [torch.load(path) for path in sorted(folder.glob("rank*.pt"))]


def fit_states(folder: Path, build: Callable[[], LightningModule], features: int) -> tuple[dict, dict, dict]:
    """``build()`` fitted for 2 epochs on 2 processes (batches of 4) and on one (batches of 8): the states of rank 0,
    rank 1 and the one process."""
    x = torch.randn(EXAMPLES, features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, torch.arange(EXAMPLES) % 3)
    for devices in (2, 1):
        out = folder / f"devices{devices}"
        out.mkdir()
        torch.manual_seed(0)
        spawn_trainer(devices, [StateRecorder(out)], max_epochs=2).fit(
            build(), DataLoader(data, batch_size=8 // devices, sampler=AlternateExamples(EXAMPLES))
        )
    rank0, rank1 = rank_states(folder / "devices2")
    return rank0, rank1, rank_states(folder / "devices1")[0]


def assert_ranks_equal_one_process(rank0: dict, rank1: dict, single: dict) -> None:
    assert set(rank0) == set(single)
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name
        # the mean gradient of 8 examples against the average of two means of 4: float64 round-off
        torch.testing.assert_close(rank0[name], value, rtol=1e-9, atol=1e-12, msg=name)
