"""Monte Carlo dropout (Gal & Ghahramani, 2016): keep dropout active at test time and average.

The S stochastic passes run as one vectorised call, ``torch.func.vmap(..., randomness="different")``,
so every sample gets its own dropout masks while the backbone is traced once (and the layers before the first
dropout run once; a backbone whose attention applies dropout itself gets its inputs stacked S times, since
attention's dropout draws in place, which ``vmap`` cannot make different per sample on an unstacked tensor). While
sampling, every module of the
backbone runs in training mode except the layers that keep running statistics (BatchNorm: they keep using them and
leave them unchanged): switching only the ``nn.Dropout`` modules left the dropout that attention applies itself
(``nn.MultiheadAttention``, transformers' attention layers, gated by their own ``training``) off, and an eval-mode
``nn.TransformerEncoderLayer`` took torch's fused inference path, which skips every dropout, under ``no_grad``.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..inference.likelihoods import Likelihood
from ..predictive import Predictive
from .map import MAP

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_RATES = ("dropout", "attention_dropout", "drop_rate")  # MultiheadAttention's, transformers', timm heads'


def _is_dropout_layer(module: nn.Module) -> bool:
    return isinstance(module, _DROPOUT_TYPES) and module.p > 0


def _applies_own_dropout(module: nn.Module) -> bool:
    """A layer that applies a dropout rate ``> 0`` of its own (attention, a timm classifier head)."""
    return any(isinstance(getattr(module, name, None), float) and getattr(module, name) > 0 for name in _DROPOUT_RATES)


class MCDropout(MAP):
    """A MAP-trained network with dropout whose predictive averages ``num_samples`` dropout masks.

    Args:
        backbone: a network with at least one dropout of rate ``p > 0`` (e.g. ``LeNet5(dropout=0.25)``, or attention
            dropout).
        likelihood, optimizer, lr_scheduler: as in :class:`MAP`.
        num_samples: dropout masks averaged by the predictive (at validation and test).
    """

    def __init__(
        self,
        backbone: nn.Module,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_samples: int = 20,
    ) -> None:
        super().__init__(backbone, likelihood=likelihood, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.num_samples = self.resolve_num_samples(num_samples)
        if not any(_is_dropout_layer(m) or _applies_own_dropout(m) for m in backbone.modules()):
            raise ValueError(
                f"MCDropout needs a backbone with dropout (p > 0); {type(backbone).__name__} has none: "
                "build it with a dropout rate, e.g. LeNet5(dropout=0.1)"
            )

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        samples = self.resolve_num_samples(num_samples)
        sampled = [m for m in self.backbone.modules() if not getattr(m, "track_running_stats", False)]
        previous = [m.training for m in sampled]
        for module in sampled:  # one by one: Module.train() would recurse into the BatchNorm layers
            module.training = True
        try:
            if any(_applies_own_dropout(module) for module in sampled):
                dims = tree_map(lambda t: 0 if isinstance(t, Tensor) else None, x)
                stacked = tree_map(lambda t: t.expand(samples, *t.shape) if isinstance(t, Tensor) else t, x)
                outputs = torch.func.vmap(self, in_dims=(dims,), randomness="different")(stacked)
            else:
                outputs = torch.func.vmap(lambda _: self(x), randomness="different")(torch.arange(samples))
        finally:
            for module, mode in zip(sampled, previous):
                module.training = mode
        return self.likelihood.predictive(outputs)
