"""``BernsteinVI``: variational inference with Bernstein-flow posteriors over any chosen layers (BF-VI).

Every selected weight gets the 1-D chain ``w = f3(h(sigmoid(f1(z))))`` of
:class:`~lightning_bayes.inference.bernstein.BernsteinFlow` (mean field, ``M + 5`` parameters per weight), or,
with ``joint=True``, each selected weight tensor one autoregressive flow
(:class:`~lightning_bayes.inference.bernstein_autoregressive.AutoregressiveBernsteinFlow`) that captures the
correlations of a few interpretable coefficients. The objective is :class:`VariationalInference`'s with the
Monte Carlo ``log q - log p`` of each step's ``train_samples`` draws. Each draw is a full forward pass through
the Bayesian part, so keep it small (a last layer, a linear part of a semi-structured model, a small network).
Reference: Duerr, Hoertling, Dold, Kovylov & Sick, "Bernstein flows for flexible posteriors in variational
Bayes", AStA 2024 (arXiv 2202.05650).
"""

from __future__ import annotations

from typing import Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ..checks import check_flags
from ..inference.likelihoods import Likelihood
from ..params import ParamSelector
from .variational_inference import VariationalInference


class BernsteinVI(VariationalInference):
    """Bernstein-flow VI over the layers of ``backbone`` selected by ``params``.

    Args:
        joint: one autoregressive flow per weight tensor (and per bias) instead of one chain per weight.
        degree: Bernstein degree ``M`` (the paper's network layers: 10; its 1-D recovery: up to 60).
        support: initial range of each chain around its starting weight.
        freeze_affine: keep each flow's first affine map (``a``, ``b``) at its initial values: the paper's released
            script (ours trains them by default).
        Others: as :class:`VariationalInference` (``checkpoint`` starts the flows at trained weights).
    """

    def __init__(
        self,
        backbone: nn.Module,
        params: ParamSelector = "all",
        checkpoint: str | None = None,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        joint: bool = False,
        degree: int = 10,
        support: tuple[float, float] = (-0.1, 0.1),
        freeze_affine: bool = False,
        prior_scale: float = 1.0,
        dataset_size: int | None = None,
        kl_weight: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        train_samples: int = 1,
        num_samples: int = 10,
        mean_prediction: bool = False,
    ) -> None:
        check_flags(joint=joint)
        super().__init__(
            backbone, params=params, checkpoint=checkpoint, likelihood=likelihood, optimizer=optimizer,
            lr_scheduler=lr_scheduler, family="bernstein_autoregressive" if joint else "bernstein",
            prior_scale=prior_scale, degree=degree, support=support, freeze_affine=freeze_affine,
            local_reparameterization=False,
            dataset_size=dataset_size, kl_weight=kl_weight, kl_warmup_epochs=kl_warmup_epochs,
            train_samples=train_samples, num_samples=num_samples, mean_prediction=mean_prediction,
        )
