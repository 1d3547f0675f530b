"""IVON under Lightning's automatic optimisation: the optimiser is the posterior, the module wires it in.

:class:`~lightning_bayes.optim.IVON` samples ``theta = m + sigma * n`` inside ``optimizer.step(closure)``, so
``training_step`` is the plain batch-mean loss and Lightning calls it ``mc_samples`` times per step. The module
builds the optimiser with ``ess = dataset_size / kl_weight`` (``N`` by default: the objective
``E_q[mean loss] + kl_weight KL(q || p) / N`` of the other variational modules), stops configurations in which
Lightning would call the closure outside ``step`` (a gradient scaler, gradient accumulation), and keeps
``sigma^2 = 1 / (ess (h + delta))`` in a buffer so that ``predictive`` works after ``load_from_checkpoint``.
The predictive is the model average over ``num_samples`` draws, or the model at the mean (``mean_prediction``,
"IVON@mean"). Reference: Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from ..checks import check_flags, check_network, is_finite, is_int
from ..inference.likelihoods import Likelihood
from ..inference.wide_buffers import WideBuffers
from ..optim.ivon import IVON, posterior_draws
from ..params import ParamSelector, full_tensor, fsdp2_units, laid_out_like, select_parameters
from ..predictive import Predictive
from .base import Batch, BayesianModule

_PEFT_FRESH = "modules_to_save"  # peft's copies of layers trained in full next to the adapters (a SEQ_CLS head)

IVONFactory = Callable[[Iterable, float], Optimizer]
"""``(params, ess) -> IVON``; in a config: ``class_path: lightning_bayes.optim.IVON`` with ``init_args`` but no ess."""


def default_ivon(params: Iterable, ess: float) -> IVON:
    """IVON with the library defaults and ``lr = 0.1``."""
    return IVON(params, ess, lr=0.1)


_NO_VARIANCE = (
    "IVONModule has no posterior variance yet: fit it, or load a checkpoint saved during a fit (or predict at the mean "
    "with mean_prediction=True)"
)


class IVONModule(WideBuffers, BayesianModule):
    """Trains ``backbone`` with IVON; ``predictive`` averages posterior draws.

    Args:
        backbone: the network.
        params: the parameters IVON holds a posterior over (``"trainable"``, ``"lora"``, ``"last_layer"``, globs over
            this module's names such as ``backbone.0.weight``; see ``params.py``); the others are frozen.
        optimizer: factory ``(params, ess) -> IVON`` (LightningCLI: ``class_path: lightning_bayes.optim.IVON``).
        dataset_size: ``N``; by default the datamodule's ``num_train`` (with plain data loaders: required).
        kl_weight: temperature of the prior term: ``ess = N / kl_weight`` (1: the ELBO per example).
        num_samples: posterior draws of the predictive.
        mean_prediction: predict with the mean weights ``m`` (one sample) instead.
        likelihood, lr_scheduler: as in :class:`~lightning_bayes.modules.base.BayesianModule`.

    Under FSDP2 (``ModelParallelStrategy``) the backbone is sharded, IVON draws each rank's shard of the
    one-process noise, and the ``sigma^2`` buffer holds the whole (gathered) variances on every rank.
    """

    wide_buffers = ("posterior_variance",)  # the saved variances stay float32 or wider under bf16-true

    # buffers (register_buffer), typed for readers and checkers
    posterior_variance: Tensor

    supports_sharding = True

    def __init__(
        self,
        backbone: nn.Module,
        params: ParamSelector = "trainable",
        likelihood: str | Likelihood = "categorical",
        optimizer: IVONFactory = default_ivon,
        lr_scheduler: LRSchedulerCallable | None = None,
        dataset_size: int | None = None,
        kl_weight: float = 1.0,
        num_samples: int = 10,
        mean_prediction: bool = False,
    ) -> None:
        check_network(backbone, "backbone")
        super().__init__(  # the base keeps the factory; configure_optimizers calls it with the ess
            likelihood=likelihood, optimizer=cast(OptimizerCallable, optimizer), lr_scheduler=lr_scheduler,
            num_samples=num_samples,
        )
        # the factories are callables, which a weights-only checkpoint load refuses
        self.save_hyperparameters(ignore=["backbone", "likelihood", "optimizer", "lr_scheduler"])
        if dataset_size is not None and (not is_int(dataset_size) or dataset_size < 1):
            raise ValueError(f"dataset_size must be None or a positive int; got {dataset_size!r}")
        if not (is_finite(kl_weight) and kl_weight > 0):
            raise ValueError(
                f"kl_weight must be a finite number > 0 (ess = dataset_size / kl_weight); got {kl_weight!r}"
            )
        check_flags(mean_prediction=mean_prediction)
        self.backbone = backbone
        selected = select_parameters(self, params)
        fresh = [n for n, p in self.named_parameters() if n not in selected and p.requires_grad and _PEFT_FRESH in n]
        if fresh:
            raise ValueError(
                f"params={params!r} leaves out layers peft initialised afresh to be trained ({fresh[:2]}..., e.g. a "
                f"classification head): IVON would freeze them at their random values; select them too, e.g. "
                f"params: [lora, '*{_PEFT_FRESH}*']"
            )
        for name, parameter in self.named_parameters():
            if name not in selected:
                parameter.requires_grad_(False)
        self.posterior_names = list(selected)
        dtype = torch.promote_types(next(iter(selected.values())).dtype, torch.float32)
        numel = sum(p.numel() for p in selected.values())
        # sigma^2 of every selected parameter, flattened in posterior_names order; NaN until a fit sets it
        self.register_buffer("posterior_variance", torch.full((numel,), float("nan"), dtype=dtype))
        self.dataset_size, self.kl_weight, self.mean_prediction = dataset_size, kl_weight, mean_prediction
        self._resolution_warned = False  # once a fit: see on_train_epoch_end

    def forward(self, x: Any) -> Tensor:
        return self.backbone(x)

    def posterior_parameters(self) -> list[nn.Parameter]:
        """The parameters the posterior covers (``params``), in the optimiser's order."""
        named = dict(self.named_parameters())
        return [named[name] for name in self.posterior_names]

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.posterior_parameters()}]

    def ess(self) -> float:
        """``N / kl_weight``. IVON needs it when it is built, before Lightning loads the training data, so ``N`` is
        ``dataset_size`` or the datamodule's ``num_train`` (set by its ``setup``, which runs earlier)."""
        size = self.dataset_size or getattr(getattr(self.trainer, "datamodule", None), "num_train", None)
        if not is_int(size):
            raise ValueError(
                "IVONModule needs the training-set size N when it builds IVON (ess = N / kl_weight), before the "
                "training loader exists: pass dataset_size=N, or fit with a datamodule that has num_train"
            )
        return size / self.kl_weight

    def configure_optimizers(self) -> Any:
        ess = self.ess()
        optimizer = cast(IVONFactory, self.optimizer_factory)(self.parameter_groups(), ess)
        if not isinstance(optimizer, IVON):
            raise ValueError(
                f"IVONModule's optimizer must build a lightning_bayes.optim.IVON (it samples the weights inside its "
                f"step); got {type(optimizer).__name__}"
            )
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._resolution_warned = False
        trainer = self.trainer
        if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
            raise ValueError(
                f"IVONModule cannot train under FSDPStrategy on {trainer.world_size} processes: FSDP1 hands IVON flat "
                "shards, and every rank would draw the same noise for its own shard (noise correlated across "
                "shards); use strategy 'ddp', or the IVON optimiser in a LightningModule sharded by FSDP2 "
                "(ModelParallelStrategy), where each rank keeps its shard of the one-process noise"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"IVONModule cannot train with precision={trainer.precision!r}: its gradient scaler calls the "
                "training closure outside optimizer.step, where IVON cannot sample the weights; use '32-true', "
                "'bf16-mixed', 'bf16-true' or '16-true'"
            )
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"IVONModule cannot train with accumulate_grad_batches={trainer.accumulate_grad_batches}: Lightning "
                "runs the accumulating closures outside optimizer.step, at the mean instead of sampled weights; "
                "use accumulate_grad_batches=1 with a larger batch, or more IVON mc_samples per step"
            )

    def on_train_epoch_end(self) -> None:
        """Under a half-precision parameter dtype (``bf16-true``), once a fit: a warning when the posterior std of a
        tenth or more of the weights is below their dtype's resolution, where IVON's Hessian estimate fails."""
        optimizer = self._fitting_optimizer()
        share = 0.0 if optimizer is None or self._resolution_warned else optimizer.below_resolution()
        if share >= 0.1:
            self._resolution_warned = True
            rank_zero_warn(
                f"IVON under precision={self.trainer.precision!r}: the posterior std of {share:.0%} of the weights is "
                "below half their dtype's spacing at the mean, where a draw rounds back to the mean and the Hessian "
                "estimate sees no noise (it sinks toward 0, the variances grow); use precision='bf16-mixed' (float32 "
                "weights) or a smaller ess"
            )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.likelihood.loss(self(x), y)
        self.log_training_loss(loss, len(y))
        return loss

    # ------------------------------------------------------------------------------- sigma^2 outside the optimiser
    def _fitting_optimizer(self) -> IVON | None:
        """The live IVON while fitting (not while testing a loaded checkpoint); ``None`` otherwise."""
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return None
        return next((o for o in self.trainer.optimizers if isinstance(o, IVON)), None)

    def _store_posterior_variance(self) -> None:
        optimizer = self._fitting_optimizer()
        if optimizer is not None:
            variances = optimizer.posterior_variances()
            # under FSDP2 the variances are shards: every rank gathers the whole sigma^2 (the buffer is not sharded)
            flat = torch.cat([full_tensor(variances[p]).reshape(-1) for p in self.posterior_parameters()])
            self.posterior_variance.copy_(flat)

    def on_train_end(self) -> None:
        self._store_posterior_variance()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # Lightning collects the state dict before this hook: write the current sigma^2 into it
        self._store_posterior_variance()
        checkpoint["state_dict"]["posterior_variance"] = self.posterior_variance.detach().clone()

    def unfitted_refusal(self) -> str | None:
        return None if self.mean_prediction or torch.isfinite(self.posterior_variance).all() else _NO_VARIANCE

    def posterior_variances(self) -> list[Tensor]:
        """``sigma^2`` per posterior parameter (the live optimiser's while fitting, else the stored buffer)."""
        self._store_posterior_variance()
        if not torch.isfinite(self.posterior_variance).all():
            raise RuntimeError(_NO_VARIANCE)
        params = self.posterior_parameters()
        variances = self.posterior_variance.split([p.numel() for p in params])
        return [laid_out_like(v, p) for v, p in zip(variances, params, strict=True)]

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        samples = self.resolve_num_samples(num_samples)
        if self.mean_prediction:  # S = 1
            return self.likelihood.predictive(self(x).unsqueeze(0))
        # FSDP2: draw into the sharded parameters, not the gathered copy of the last forward; after each forward
        # reshard, so that the next one gathers the next draw (and, after the last, the restored means)
        units = fsdp2_units(self)
        for unit in units:
            unit.reshard()
        outputs = []
        with posterior_draws(self.posterior_parameters(), self.posterior_variances()) as draw:
            for _ in range(samples):
                draw()
                outputs.append(self(x))
                for unit in units:
                    unit.reshard()
        return self.likelihood.predictive(torch.stack(outputs))
