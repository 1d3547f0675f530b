"""``StepTimer``: the seconds of each training step, from ``on_train_batch_start`` to ``on_train_batch_end`` (on a
CUDA module, with the device synchronised at both ends: the host alone runs ahead of the queued kernels).

Shared by the overhead benchmarks (run as scripts from the repository root: ``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lightning.pytorch import Callback, LightningModule, Trainer


class StepTimer(Callback):
    """Seconds of each training step, from batch start to batch end; stops the fit after ``stop_after`` batches
    if given (``max_steps`` counts optimiser steps, two per batch for a method with two optimisers such as BLoB)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.seconds: list[float] = []
        self.stop_after = stop_after
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        _synchronise(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _synchronise(pl_module)
        self.seconds.append(time.perf_counter() - self._start)
        if self.stop_after is not None and len(self.seconds) >= self.stop_after:
            trainer.should_stop = True


def _synchronise(pl_module: LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
