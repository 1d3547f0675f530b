"""How long a fit runs, in epochs, from the Trainer's ``max_epochs`` and ``max_steps``: what a method with an
epoch schedule (phases, a KL warm-up) compares with the epochs it needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning.pytorch import Trainer


@dataclass(frozen=True)
class FitLength:
    """``epochs``: the epochs the fit runs (``inf``: unbounded; a fraction when ``max_steps`` ends it inside one);
    ``bound``: the Trainer setting that ends it, as a user writes it (e.g. ``max_steps=60 (1.76 epochs of 34
    steps)``); ``smoke_run``: a ``fast_dev_run`` (a few batches that check the code runs, too short by design)."""

    epochs: float
    bound: str
    smoke_run: bool


def fit_length(trainer: Trainer, steps_per_batch: bool = False) -> FitLength:
    """The length of ``trainer``'s fit, known from ``on_train_start`` (once the training loader is sized).

    An epoch takes ``ceil(batches / accumulate_grad_batches)`` optimiser steps (Lightning steps at an epoch's last
    batch whatever the accumulation), or ``batches`` steps for a fit that counts each batch as a step
    (``steps_per_batch``); ``max_steps`` counts ``global_step`` from the fit's start, a resumed fit's included.
    ``EarlyStopping`` or ``max_time`` may end it sooner."""
    max_epochs = trainer.max_epochs
    epochs = math.inf if max_epochs is None or max_epochs < 0 else float(max_epochs)
    bound = f"max_epochs={max_epochs}"
    batches, max_steps = trainer.num_training_batches, trainer.max_steps
    if max_steps >= 0 and math.isfinite(batches) and batches > 0:
        steps = batches if steps_per_batch else math.ceil(batches / trainer.accumulate_grad_batches)
        if max_steps / steps < epochs:
            epochs = max_steps / steps
            bound = f"max_steps={max_steps} ({epochs:.3g} epochs of {steps} steps)"
    return FitLength(epochs, bound, bool(trainer.fast_dev_run))  # type: ignore[attr-defined]  # set by Lightning
