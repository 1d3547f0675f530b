"""Monte Carlo dropout (Gal & Ghahramani, 2016): keep dropout active at test time and average.

The S stochastic passes run as one vectorised call, ``torch.func.vmap(..., randomness="different")``,
so every sample gets its own dropout masks while the backbone is traced once.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ..inference.likelihoods import Likelihood
from ..predictive import Predictive
from .map import MAP

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class MCDropout(MAP):
    """A MAP-trained network with dropout whose predictive averages ``num_samples`` dropout masks.

    Args:
        backbone: a network with at least one dropout layer of rate ``p > 0`` (e.g. ``LeNet5(dropout=0.25)``).
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
        self.dropout_layers = [m for m in backbone.modules() if isinstance(m, _DROPOUT_TYPES) and m.p > 0]
        if not self.dropout_layers:
            raise ValueError(
                f"MCDropout needs a backbone with dropout (p > 0); {type(backbone).__name__} has none: "
                "build it with a dropout rate, e.g. LeNet5(dropout=0.1)"
            )

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        samples = self.resolve_num_samples(num_samples)
        previous = [m.training for m in self.dropout_layers]
        for layer in self.dropout_layers:
            layer.train()
        try:
            outputs = torch.func.vmap(lambda _: self(x), randomness="different")(torch.arange(samples))
        finally:
            for layer, mode in zip(self.dropout_layers, previous):
                layer.train(mode)
        return self.likelihood.predictive(outputs)
