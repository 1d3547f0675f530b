"""BatchNorm statistics for weights the network was not trained at (SWA means, SWAG and subspace samples).

:func:`refresh_batchnorm` recomputes every BatchNorm layer's running statistics in one pass over the data:
reset, then before each call of a layer on ``b`` rows, ``n`` seen so far, momentum ``b / (n + b)``, so the result is
the average over examples (SWAG's and drbayes' ``bn_update``; ``torch.optim.swa_utils.update_bn`` averages over
batches, which gives a smaller last batch the weight of a full one). Batches are ``(x, y)`` tuples or ``x`` (nested
or dict inputs such as a tokenizer's output).
:func:`batch_statistics` makes BatchNorm layers normalise with the batch's own statistics while leaving
their running statistics untouched (for evaluating a likelihood at weights whose statistics are unknown).
Reference: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018,
section 3.2; Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from ..modes import modes_kept
from ..batches import BatchLayout


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` (any dimension, ``SyncBatchNorm`` included)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def batchnorm_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Every buffer of every BatchNorm layer (running statistics and ``num_batches_tracked``, by which a layer with
    ``momentum=None`` averages), by buffer name, as they are (not copies)."""
    layers = {id(m) for m in batchnorm_layers(model)}
    named = dict(model.named_modules())
    return {name: buffer for name, buffer in model.named_buffers() if id(named[name.rpartition(".")[0]]) in layers}


def running_statistics(model: nn.Module) -> dict[str, Tensor]:
    """The floating-point running statistics (``running_mean``, ``running_var``) of every BatchNorm layer, by
    buffer name, as they are (not copies)."""
    return {name: buffer for name, buffer in batchnorm_buffers(model).items() if buffer.is_floating_point()}


def _inputs(
    batches: Iterable[Any], layout: BatchLayout, device: torch.device | None, dtype: torch.dtype | None
) -> Iterator[Any]:
    def moved(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

    for batch in batches:
        yield tree_map(moved, layout.input(batch))


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def refresh_batchnorm(
    model: nn.Module, batches: Iterable[Any], device: torch.device | str | None = None,
    layout: BatchLayout = BatchLayout(),  # noqa: B008 - frozen
) -> None:
    """Recompute the running statistics of every BatchNorm layer of ``model`` from ``batches`` (``x``,
    ``(x, y, ...)``, or dicts split by ``layout``; ``x`` a tensor, a tuple or a dict of tensors, moved to ``device``,
    its floating tensors cast to the dtype of the model's parameters, as a Trainer's precision casts a step's batch):
    the average over examples of the batch statistics (momentum ``b / (n + b)``). The model runs in training mode for
    the pass (as
    ``update_bn`` and the reference's ``bn_update`` do) and gets its modes and momenta back. A no-op (no pass over
    the data) without BatchNorm."""
    layers = batchnorm_layers(model)
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    rows_seen: dict[int, int] = {}

    def cumulative_momentum(layer: _BatchNorm, args: tuple[Tensor, ...]) -> None:
        """Per call of a layer (one applied twice in a forward counts both, as ``update_bn``'s average does)."""
        rows, seen = args[0].shape[0], rows_seen.get(id(layer), 0)
        layer.momentum = rows / (seen + rows)
        rows_seen[id(layer)] = seen + rows

    hooks = [layer.register_forward_pre_hook(cumulative_momentum) for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
    try:
        with torch.no_grad(), modes_kept(model):
            model.train()
            for x in _inputs(batches, layout, None if device is None else torch.device(device), _floating_dtype(model)):
                model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


@contextmanager
def batchnorm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Inside, the BatchNorm buffers may move (a refresh at other weights); on exit they hold what they held."""
    saved = {name: buffer.clone() for name, buffer in batchnorm_buffers(model).items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in batchnorm_buffers(model).items():
                buffer.copy_(saved[name])


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers run in training mode (batch statistics) with ``momentum = 0``, so their running
    statistics stay exactly as they were; the rest of the model keeps its mode."""
    layers = batchnorm_layers(model)
    saved = [(m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in layers]
    for layer in layers:
        layer.train()
        layer.momentum = 0.0  # running = (1 - 0) running + 0 batch: unchanged
    try:
        yield
    finally:
        for layer, (training, momentum, tracked) in zip(layers, saved):
            layer.train(training)
            layer.momentum = momentum
            if tracked is not None:
                cast(Tensor, layer.num_batches_tracked).copy_(tracked)  # tracked is its clone, so not None
