"""Train / eval flags of a module tree, put back one by one: ``Module.train(mode)`` would set every submodule's,
including those a method keeps in eval mode on purpose (frozen features, a post-hoc method's trained network); and a
method's ``predictive`` run in eval mode (every :class:`~lightning_bayes.modules.base.BayesianModule`'s)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .predictive import Predictive


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


def evaluated_in_eval_mode(predictive: Callable[..., Predictive]) -> Callable[..., Predictive]:
    """``predictive`` in eval mode, at its outermost call only: a subclass's ``predictive`` that turns dropout on and
    calls ``super().predictive`` keeps it on."""

    @functools.wraps(predictive)
    def evaluated(self: nn.Module, *args: Any, **kwargs: Any) -> Predictive:
        if self.__dict__.get("_predicting", False):
            return predictive(self, *args, **kwargs)
        self.__dict__["_predicting"] = True
        try:
            with in_eval_mode(self):
                return predictive(self, *args, **kwargs)
        finally:
            self.__dict__["_predicting"] = False

    evaluated.as_written = predictive  # type: ignore[attr-defined]
    return evaluated


def predictive_as_written(module: nn.Module) -> Callable[..., Predictive] | None:
    """``type(module).predictive`` in the module's own modes, without the eval mode of
    :func:`evaluated_in_eval_mode` (a curve's Jensen-Shannon passes run in training mode); ``None`` without one."""
    own = getattr(type(module), "predictive", None)
    return getattr(own, "as_written", own) if callable(own) else None
