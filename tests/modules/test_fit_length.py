"""fit_length: the epochs a fit runs from max_epochs / max_steps (read off the Trainer's attributes only)."""

import math
from types import SimpleNamespace

import pytest

from lightning_bayes.modules.fit_length import fit_length


def _trainer(max_epochs=10, max_steps=-1, batches=4.0, accumulate=1, fast_dev_run=False):
    return SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps, num_training_batches=batches,
                           accumulate_grad_batches=accumulate, fast_dev_run=fast_dev_run)


@pytest.mark.parametrize(
    "kwargs, steps_per_batch, epochs",
    [
        ({"max_epochs": 0}, False, 0.0),  # max_epochs=0 fits nothing (not unbounded)
        ({"max_epochs": -1}, False, math.inf),
        ({"max_epochs": None}, False, math.inf),
        ({"max_steps": 0}, False, 0.0),  # max_steps=0 ends the fit before its first step
        ({"max_steps": 3, "batches": 1.0}, False, 3.0),  # one batch per epoch: 3 steps are 3 epochs
        ({"max_steps": 6, "batches": 4.0}, False, 1.5),
        ({"max_steps": 6, "batches": 4.0, "accumulate": 3}, False, 3.0),  # ceil(4 / 3) = 2 steps per epoch
        ({"max_steps": 6, "batches": 4.0, "accumulate": 3}, True, 1.5),  # steps_per_batch ignores accumulation
        ({"max_steps": 100, "batches": 4.0}, False, 10.0),  # max_epochs ends it first
        ({"max_steps": 6, "batches": math.inf}, False, 10.0),  # an unsized loader: max_steps is not converted
    ],
)
def test_the_fit_length_in_epochs(kwargs, steps_per_batch, epochs):
    assert fit_length(_trainer(**kwargs), steps_per_batch=steps_per_batch).epochs == epochs  # type: ignore[arg-type]
