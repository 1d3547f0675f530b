"""BLoB: Bayesian low-rank adaptation by backpropagation, with the reference's two optimisers.

Every selected layer (by default peft's LoRA ``A``) gets ``q(A) = N(M, Omega^2)`` elementwise with
``Omega = rho^2``, ``rho_0 ~ U(eps / sqrt(2), eps)``, and the prior ``N(0, beta^2)``; ``B`` and everything else stay
deterministic. Each training batch ``t``:

1. one noisy forward pass; the batch-mean NLL is back-propagated and the NLL optimiser (AdamW) steps every
   trainable parameter except ``rho``;
2. the KL optimiser (SGD, ``kl_lr``) steps ``(M, rho)`` on ``w_t grad KL(q || p)`` plus, for ``rho``, the NLL
   gradient left from step 1, with the geometric cycle weight ``w_t = 2^i / (2^(K+1) - 1)``, ``i = (t mod K) + 1``,
   ``K = floor(100 N^(pi / gamma) / B)`` (``B`` the global batch size), or ``w_t = 1 / K`` with ``K`` the batches
   per epoch (``kl_reweighting=False``).

The split matters: under one Adam step the raw scale moves by at most the learning rate per step, while SGD
on the KL, whose gradient in ``rho`` is ``-2 / rho + 2 rho^3 / beta^2``, lets ``Omega`` grow from ``eps^2`` towards
the prior. Noise enters by local reparameterisation (one draw of ``A x`` per token: the per-token marginal of the
released code's flipout, whose signs are drawn per token too; tokens are uncorrelated either way, where one weight
draw per example would correlate them). Lightning counts each optimiser's step in ``global_step`` (two per
batch); bound training with epochs, or ``max_steps`` = 2 x batches. Reference: Wang et al., "BLoB: Bayesian
Low-Rank Adaptation by Backpropagation for Large Language Models", NeurIPS 2024 (Wang-ML-Lab/bayesian-peft for the
optimiser split).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Union, cast

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn

from ..checks import check_flags, is_finite
from ..inference.kl_cycle import cycle_weight
from ..inference.likelihoods import Likelihood
from ..inference.mean_field_gaussian import MeanFieldGaussian
from ..inference.variational_layers import total_kl
from ..params import ParamSelector
from ..skipped_epoch_hooks import epoch_hooks_skipped
from .base import Batch
from .variational_inference import VariationalInference


class BLoB(VariationalInference):
    """BLoB on the layers of ``backbone`` selected by ``params`` (peft's ``lora_A`` by default).

    Args:
        prior_scale: ``beta``, the prior standard deviation.
        init_eps: ``eps``: ``rho`` starts uniform on ``[eps / sqrt(2), eps]``, so ``Omega`` on ``[eps^2 / 2, eps^2]``.
        kl_lr: learning rate of the KL optimiser (plain SGD).
        kl_reweighting: the geometric cycle weights (the reference's ``--bayes-klreweighting``), else ``1 / K``.
        cycle_exponent: ``gamma`` in ``K = floor(100 N^(pi / gamma) / B)``.
        gradient_clip_val: clip the NLL optimiser's gradient norm to this (the Trainer's own clipping does not
            apply under manual optimisation).
        optimizer, lr_scheduler: the NLL optimiser; the scheduler factory is applied to both optimisers.
        scheduler_interval: step the schedulers after every ``"epoch"`` or every training ``"step"`` (the
            reference's per-step warm-up and linear decay).
        Others: as in :class:`VariationalInference`.
    """

    supports_sharding = False  # the KL step differentiates whole parameters outside the forward pass

    def __init__(
        self,
        backbone: nn.Module,
        params: ParamSelector = "*lora_A*",
        checkpoint: str | None = None,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        prior_scale: float = 0.2,
        init_eps: float = 0.05,
        kl_lr: float = 0.01,
        kl_reweighting: bool = True,
        cycle_exponent: float = 8.0,
        gradient_clip_val: float | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        local_reparameterization: bool = True,
        dataset_size: int | None = None,
        num_samples: int = 10,
        mean_prediction: bool = False,
    ) -> None:
        if not (is_finite(init_eps) and 0 < init_eps < 1e100):
            raise ValueError(f"init_eps must be a number in (0, 1e100); got {init_eps!r}")
        if not (is_finite(kl_lr) and kl_lr >= 0):
            raise ValueError(f"kl_lr must be a finite number >= 0; got {kl_lr!r}")
        if not (is_finite(cycle_exponent) and cycle_exponent > 0):
            raise ValueError(f"cycle_exponent must be a finite number > 0; got {cycle_exponent!r}")
        check_flags(kl_reweighting=kl_reweighting)
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be None or > 0; got {gradient_clip_val!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step'; got {scheduler_interval!r}")
        super().__init__(
            backbone, params=params, checkpoint=checkpoint, likelihood=likelihood, optimizer=optimizer,
            lr_scheduler=lr_scheduler, family="gaussian", prior_scale=prior_scale, init_scale=init_eps**2,
            scale_map="square", local_reparameterization=local_reparameterization, dataset_size=dataset_size,
            num_samples=num_samples, mean_prediction=mean_prediction,
        )
        self.automatic_optimization = False
        self.kl_lr, self.kl_reweighting, self.cycle_exponent = kl_lr, kl_reweighting, cycle_exponent
        self.gradient_clip_val, self.scheduler_interval = gradient_clip_val, scheduler_interval
        with torch.no_grad():
            for family in self._families():
                family.raw_scale.uniform_(init_eps / math.sqrt(2), init_eps)

    def _families(self) -> list[MeanFieldGaussian]:
        """Every layer's families: BLoB's family is ``gaussian``."""
        return [cast(MeanFieldGaussian, family) for layer in self.variational_layers for family in layer.families()]

    def _kl_parameters(self) -> list[nn.Parameter]:
        return [p for family in self._families() for p in (family.mean, family.raw_scale) if p.requires_grad]

    def configure_optimizers(self) -> Any:
        scales = {id(family.raw_scale) for family in self._families()}
        nll_parameters = [p for p in self.parameters() if p.requires_grad and id(p) not in scales]
        optimizers = [self.optimizer_factory(nll_parameters), torch.optim.SGD(self._kl_parameters(), lr=self.kl_lr)]
        if self.lr_scheduler_factory is None:
            return optimizers
        return optimizers, [self.lr_scheduler_factory(optimizer) for optimizer in optimizers]

    def cycle_length(self) -> int:
        """``K``: ``floor(100 N^(pi / gamma) / B)`` with the global batch size ``B`` (reweighting), else the batches
        per epoch."""
        if not self.kl_reweighting:
            return max(int(self.trainer.num_training_batches), 1)
        loader = self.trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None)  # None where Lightning rebuilt it with a batch sampler:
        if batch_size is None:  # overfit_batches, a distributed sampler
            batch_size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if not isinstance(batch_size, int):
            raise ValueError(
                "BLoB with kl_reweighting=True needs the training DataLoader's batch_size for the cycle length "
                f"K = 100 N^(pi/gamma) / B; got batch_size={batch_size!r} (use a batch_size loader or kl_reweighting=False)"
            )
        scaled_size = 100 * self.resolved_dataset_size() ** (math.pi / self.cycle_exponent)
        return max(int(scaled_size / (batch_size * self.trainer.world_size)), 1)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        precision = str(self.trainer.precision)
        half = "it would hold the variational parameters in half precision, where the KL steps on rho fall below its "
        why = {
            "16-mixed": "its loss scaler would rescale the KL optimiser's unscaled gradient",
            "16-true": half + "resolution",
            "bf16-true": half + "resolution: 87% of rho never moved in a test",
        }.get(precision)
        if why is not None:
            raise ValueError(
                f"BLoB: precision={self.trainer.precision!r} is not supported ({why}); use '32-true', '64-true' or "
                "'bf16-mixed'"
            )

    def on_train_start(self) -> None:  # the training loader exists from here on
        super().on_train_start()
        self._cycle_length = self.cycle_length()
        if self.logger is not None:
            self.logger.log_hyperparams({"kl_cycle_length": self._cycle_length})
        if epoch_hooks_skipped(self.trainer):  # resumed on an epoch's last batch: that epoch's end did not run
            self.on_train_epoch_end()

    def kl_weight_at(self, step: int) -> float:
        """``w_t`` of the KL optimiser's step at training batch ``step`` (counted from 0 over the whole fit)."""
        return cycle_weight(step, self._cycle_length) if self.kl_reweighting else 1.0 / self._cycle_length

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        nll_optimizer, kl_optimizer = cast(list[LightningOptimizer], self.optimizers())  # two, so a list
        step = self.trainer.fit_loop.epoch_loop.batch_progress.total.completed  # restored on resume
        x, y = batch
        nll = self.likelihood.loss(self(x), y)
        self.manual_backward(nll)
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                nll_optimizer,  # type: ignore[arg-type]  # a LightningOptimizer subclasses its optimizer's class
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm="norm",
            )
        nll_optimizer.step()
        nll_optimizer.zero_grad()
        weight = self.kl_weight_at(step)
        kl = total_kl(self.backbone)  # at the updated means, as in the reference
        parameters = self._kl_parameters()
        for parameter, gradient in zip(parameters, torch.autograd.grad(weight * kl, parameters)):
            parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient  # rho keeps its NLL part
        kl_optimizer.step()
        kl_optimizer.zero_grad()
        loss = nll.detach() + kl.detach() / self.resolved_dataset_size()  # the negative ELBO per example, for monitoring
        self.log_training_loss(loss, len(y), nll=nll, kl=kl, kl_cycle_weight=weight)
        if self.scheduler_interval == "step":
            self._step_schedulers()
        return loss

    def on_train_epoch_end(self) -> None:
        if self.scheduler_interval == "epoch":
            self._step_schedulers()

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [] if schedulers is None else [schedulers]:
            scheduler.step()  # type: ignore[call-arg]  # Lightning's union includes ReduceLROnPlateau (step(metrics))
