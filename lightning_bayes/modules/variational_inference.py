"""Weight-space variational inference over chosen layers: mean-field Gaussian (Bayes by backprop) or Bernstein flows.

The selected ``nn.Linear`` / ``nn.Conv2d`` layers become
:class:`~lightning_bayes.inference.variational_layers.VariationalLayer` s (their trained or initial weights as the
means), everything else stays deterministic. Each step minimises the negative ELBO per training example,

    L = (1/T) sum_t mean_batch[-log p(y | x, w_t)] + beta_t KL(q || p) / N,   beta_t = kl_weight * min(epoch / E_w, 1),

with ``T = train_samples`` draws (local reparameterisation for Gaussians; a shared weight draw and a one-draw
``log q - log p`` for flows), ``N`` the training-set size and ``E_w = kl_warmup_epochs``. ``kl_weight = 1`` is the
ELBO; anything else is a tempered posterior and is logged as such (``train/kl_scale`` = ``beta_t / N``). The
noise comes from torch's global generator, whose state the checkpoint carries (and validation, the sanity check too,
leaves as it found it), so a resumed run draws the same noise as an uninterrupted one. The predictive averages ``num_samples`` forward draws, or is the mean model (``mean_prediction``). References: Blundell
et al., "Weight Uncertainty in Neural Networks", ICML 2015; Duerr et al., "Bernstein flows for flexible posteriors
in variational Bayes", AStA 2024.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..checks import check_flags, check_network, is_finite, is_int
from ..inference.likelihoods import Likelihood
from ..inference.mean_field_gaussian import ScaleMap
from ..inference.variational_layers import (
    FAMILIES, GAUSSIAN_FAMILIES, Family, VariationalLayer, draws_ahead, to_variational, total_kl, use_noise,
)
from ..models.weights import load_trained_likelihood, load_trained_weights
from ..params import ParamSelector
from ..predictive import Predictive
from .base import Batch, BayesianModule
from .fit_length import fit_length


class VariationalInference(BayesianModule):
    """Variational inference over the layers of ``backbone`` selected by ``params``.

    Args:
        backbone: the network; the ``nn.Linear`` / ``nn.Conv2d`` layers whose weights ``params`` selects become
            variational (their biases with them), the rest (e.g. BatchNorm) stays deterministic and is trained.
        params: which layers (``"all"``, ``"last_layer"``, globs; see ``params.py``).
        checkpoint: optional trained weights loaded into ``backbone`` first (they become the variational means).
        family: ``"gaussian"`` (mean field), ``"bernstein"`` (a Bernstein flow per weight) or
            ``"bernstein_autoregressive"`` (one joint flow per weight tensor: for small parts such as a few regression
            coefficients); ``"sparse_gaussian"`` is SSVI's (:class:`~lightning_bayes.modules.ssvi.SSVI`).
        prior_scale: the prior ``N(0, prior_scale^2)`` on every variational weight.
        init_scale: initial posterior standard deviation (Gaussian).
        scale_map: the Gaussian family's standard deviation as ``softplus(rho)`` or ``rho^2`` (``"square"``, BLoB's).
        degree: Bernstein families: the polynomial degree ``M``.
        support: Bernstein families: each chain's initial range around its starting weight.
        freeze_affine: Bernstein families: keep each flow's first affine map (``a``, ``b``) at its initial values, as
            the paper's released script does (ours trains them by default).
        local_reparameterization: sample outputs rather than weights (Gaussian families only).
        dataset_size: ``N``; by default the datamodule's ``num_train`` or the training set's length.
        kl_weight: multiplier of ``KL / N`` (1 is the ELBO).
        kl_warmup_epochs: ramp the KL weight linearly from 0 over this many epochs (0: none).
        train_samples: weight draws ``T`` per training step.
        num_samples: predictive draws.
        mean_prediction: predict with the mean (Gaussian) / base-noise-zero ``f(0)`` (flow: the median of each
            weight under a mean-field flow) weights instead of sampling.
        likelihood, optimizer, lr_scheduler: as in :class:`~lightning_bayes.modules.base.BayesianModule`.
    """

    supports_sharding = True

    def __init__(
        self,
        backbone: nn.Module,
        params: ParamSelector = "all",
        checkpoint: str | None = None,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        family: Family = "gaussian",
        prior_scale: float = 1.0,
        init_scale: float = 1e-3,
        scale_map: ScaleMap = "softplus",
        degree: int = 10,
        support: tuple[float, float] = (-0.1, 0.1),
        freeze_affine: bool = False,
        local_reparameterization: bool = True,
        dataset_size: int | None = None,
        kl_weight: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        train_samples: int = 1,
        num_samples: int = 10,
        mean_prediction: bool = False,
    ) -> None:
        check_network(backbone, "backbone")
        super().__init__(likelihood=likelihood, optimizer=optimizer, lr_scheduler=lr_scheduler, num_samples=num_samples)
        self.save_hyperparameters(ignore=["backbone", "likelihood"])
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
        if dataset_size is not None and (not is_int(dataset_size) or dataset_size < 1):
            raise ValueError(f"dataset_size must be None or a positive int; got {dataset_size!r}")
        if not (is_finite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0; got {kl_weight!r}")
        if not (is_finite(kl_warmup_epochs) and kl_warmup_epochs >= 0):
            raise ValueError(f"kl_warmup_epochs must be a finite number >= 0; got {kl_warmup_epochs!r}")
        check_flags(
            freeze_affine=freeze_affine, local_reparameterization=local_reparameterization,
            mean_prediction=mean_prediction,
        )
        if not is_int(train_samples) or train_samples < 1:
            raise ValueError(f"train_samples must be a positive int; got {train_samples!r}")
        if checkpoint is not None:  # a Gaussian likelihood's trained noise with the network
            load_trained_likelihood(self.likelihood, load_trained_weights(backbone, checkpoint))
        self.variational_layer_names = to_variational(
            backbone, params, family=family, prior_scale=prior_scale, init_scale=init_scale, degree=degree,
            support=support, local_reparameterization=local_reparameterization and family in GAUSSIAN_FAMILIES,
            scale_map=scale_map, freeze_affine=freeze_affine,
        )
        self.backbone = backbone
        self.dataset_size, self.kl_weight, self.kl_warmup_epochs = dataset_size, kl_weight, kl_warmup_epochs
        self.train_samples, self.mean_prediction = train_samples, mean_prediction

    def forward(self, x: Any) -> Tensor:
        return self.backbone(x)

    @property
    def variational_layers(self) -> list[VariationalLayer]:
        """The backbone's layers with a variational posterior, in module order."""
        return [m for m in self.backbone.modules() if isinstance(m, VariationalLayer)]

    def resolved_dataset_size(self) -> int:
        """``N``: ``dataset_size`` if given, else the training set's size."""
        return self.dataset_size or self.training_set_size()

    def kl_scale(self) -> float:
        """``beta_t / N``: the weight of ``KL(q || p)`` in the per-example loss at the current epoch."""
        warmup = 1.0 if self.kl_warmup_epochs == 0 else min(self.current_epoch / self.kl_warmup_epochs, 1.0)
        return self.kl_weight * warmup / self.resolved_dataset_size()

    def on_train_start(self) -> None:
        """Logs the objective's constants; warns when the fit ends inside the KL warm-up (a tempered posterior)."""
        super().on_train_start()
        length = fit_length(self.trainer)
        last_epoch = math.ceil(length.epochs) - 1 if math.isfinite(length.epochs) else math.inf
        if last_epoch < self.kl_warmup_epochs and not length.smoke_run:
            rank_zero_warn(
                f"{type(self).__name__}'s KL weight ramps up over kl_warmup_epochs={self.kl_warmup_epochs} epochs but "
                f"the Trainer stops after {length.bound}: the last epoch weighs the KL by "
                f"{self.kl_weight * last_epoch / self.kl_warmup_epochs:.3g} instead of kl_weight={self.kl_weight}, a "
                "colder (tempered) posterior; give more epochs than kl_warmup_epochs, or a shorter warm-up"
            )
        if self.logger is not None:  # the objective's N, next to the logged terms (not under the argument's own
            # name, which a later test stage logs again with the module's hyperparameters: null when from the data)
            self.logger.log_hyperparams({"resolved_dataset_size": self.resolved_dataset_size()})

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        nll: Tensor | float = 0.0
        kl: Tensor | float = 0.0
        with draws_ahead(self.backbone, self.train_samples, log_ratios=True):  # a flow's T draws in one sample(T)
            for _ in range(self.train_samples):  # the KL of a flow is the log-ratio of the forward's own draw
                nll = nll + self.likelihood.loss(self(x), y)
                kl = kl + total_kl(self.backbone)
        assert isinstance(nll, Tensor) and isinstance(kl, Tensor)  # train_samples >= 1 terms added
        nll, kl = nll / self.train_samples, kl / self.train_samples
        scale = self.kl_scale()
        loss = nll + scale * kl
        self.log_training_loss(loss, len(y), nll=nll, kl=kl, kl_scale=scale)
        return loss

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        samples = self.resolve_num_samples(num_samples)
        if self.mean_prediction:  # S = 1
            use_noise(self.backbone, False)
            try:
                return self.likelihood.predictive(self(x).unsqueeze(0))
            finally:
                use_noise(self.backbone, True)
        with draws_ahead(self.backbone, samples):
            return self.likelihood.predictive(torch.stack([self(x) for _ in range(samples)]))
