"""A CPU ``torch.Generator`` that survives pickling across processes.

``ddp_spawn`` pickles the LightningModule and the callbacks into new processes through
``torch.multiprocessing``, which sends a plain generator's state tensor as shared memory and fails to rebuild it
(``unable to resize file``). This subclass pickles its state as bytes; copies (pickled or deep) continue the same
stream.
"""

from __future__ import annotations

from typing import Any

import torch


class PicklableGenerator(torch.Generator):
    """``torch.Generator()`` (CPU) whose pickle is its state as bytes."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _from_state, (self.get_state().numpy().tobytes(),)


def _from_state(state: bytes) -> PicklableGenerator:
    generator = PicklableGenerator()
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator
