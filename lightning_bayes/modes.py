"""Train / eval flags of a module tree, put back one by one: ``Module.train(mode)`` would set every submodule's,
including those a method keeps in eval mode on purpose (frozen features, a post-hoc method's trained network)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def modes_kept(module: nn.Module) -> Iterator[None]:
    """Every submodule's ``training`` flag as it was on entry, restored on exit."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def in_eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` inside (running BatchNorm statistics, no dropout), every flag as it was after."""
    if not any(m.training for m in module.modules()):
        yield
        return
    with modes_kept(module):
        module.eval()
        yield
