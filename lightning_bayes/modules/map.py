"""Maximum a posteriori baseline: one network, a point estimate, the predictive is its likelihood.

Weight decay in AdamW plays the role of the Gaussian prior (decoupled; Loshchilov & Hutter, 2019).
"""

from __future__ import annotations

from typing import Any, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..checks import check_network
from ..inference.likelihoods import Likelihood
from ..predictive import Predictive
from .base import Batch, BayesianModule


class MAP(BayesianModule):
    """Trains ``backbone`` by maximum likelihood plus weight decay; ``predictive`` has S = 1.

    Args:
        backbone: the network, ``x -> outputs`` (logits for ``"categorical"``).
        likelihood, optimizer, lr_scheduler: as in :class:`~lightning_bayes.modules.base.BayesianModule`; the
            prior is the optimiser's weight decay (AdamW's by default).
    """

    supports_sharding = True
    supports_fsdp1 = True

    def __init__(
        self,
        backbone: nn.Module,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_network(backbone, "backbone")
        super().__init__(likelihood=likelihood, optimizer=optimizer, lr_scheduler=lr_scheduler, num_samples=1)
        self.save_hyperparameters(ignore=["backbone", "likelihood"])
        self.backbone = backbone

    def forward(self, x: Any) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.likelihood.loss(self(x), y)
        self.log_training_loss(loss, len(y))
        return loss

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        """The network's likelihood, S = 1 (a point estimate) whatever valid ``num_samples`` is asked for."""
        self.resolve_num_samples(num_samples)
        return self.likelihood.predictive(self(x).unsqueeze(0))
