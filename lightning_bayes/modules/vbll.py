"""VBLL heads on any feature extractor: ``VBLLClassifier`` and ``VBLLRegressor``.

The backbone ``g`` maps inputs to features ``[B, D]`` and is point-estimated (weight decay applies
to it only); the head (:mod:`lightning_bayes.inference.vbll`) keeps a Gaussian posterior over the
last layer and owns its objective ``nll + lambda (KL - log p(Sigma))`` with
``lambda = kl_weight / N``, N the training-set size (``dataset_size`` or the datamodule's
``num_train``). One backbone pass serves both training and prediction. ``freeze_backbone=True`` is
the post-hoc mode: the backbone stays frozen in eval mode and only the head trains.

Recipe (``vbll`` tutorials): AdamW, head weight decay 0 (set here), gradient clipping at 1
(``Trainer(gradient_clip_val=1.0)``).

``compile_loss=True`` runs the head's objective under ``torch.compile`` (one graph, forward and backward fused
into a few kernels). A small head's eager step is a few hundred tiny kernels, so on a GPU it is bound by launches,
not arithmetic; ``benchmarks/vbll_overhead.py --compile`` measures both (on 2 CPU threads the compiled head
step is 10-35% faster, e.g. 0.89 -> 0.66 ms diagonal and 22.5 -> 20.4 ms dense at D=512, K=10). The first step
pays the compilation (seconds; a C++ compiler on a CPU, Triton on a GPU).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..checks import check_flags, check_network, is_finite, is_int
from ..compilation import compiled, compiled_by
from ..inference.vbll import (
    DiscriminativeVBLL,
    GenerativeVBLL,
    Parameterization,
    VBLLHead,
    VBLLLoss,
    VBLLRegression,
)
from ..models.frozen import frozen_or_trained
from ..predictive import Predictive
from .base import Batch, BayesianModule


def _feature_width(backbone: nn.Module, in_features: int | None) -> int:
    width = in_features if in_features is not None else getattr(backbone, "num_features", None)
    if not is_int(width) or width < 1:
        raise ValueError(
            f"in_features must be a positive integer, or the backbone must expose num_features; got "
            f"in_features={in_features!r} and {type(backbone).__name__}.num_features="
            f"{getattr(backbone, 'num_features', '(missing)')!r}"
        )
    return width


def head_loss(head: VBLLHead, features: Tensor, y: Tensor) -> VBLLLoss:
    """``head.loss(features, y)`` as a function of the head (what :func:`compiled_head_loss` compiles)."""
    return head.loss(features, y)


def compiled_head_loss(head: VBLLHead, features: Tensor, y: Tensor) -> VBLLLoss:
    """:func:`head_loss` under ``torch.compile``, compiled once per process and called with autocast off: a compiled
    graph's backward runs under the autocast state of its call, not of the heads' own ``autocast(enabled=False)``,
    so under bf16-mixed the head's backward matmuls would run in bf16 (seen: 0.2% off in the weights' gradients).
    Not an attribute of the module: a compiled bound method does not pickle (``ddp_spawn``) and a deepcopy would
    keep calling the original head. The head is an argument, so its parameters are graph inputs and heads of one
    shape share the compiled code; every head objective traces as one graph (tested), and a process that builds
    heads of more shapes than dynamo's recompile limit (8) runs the later ones eagerly, with dynamo's warning."""
    with compiled_by("compile_loss"), torch.autocast(features.device.type, enabled=False):
        return compiled(head_loss)(head, features, y)


class _VBLLModule(BayesianModule):
    """Backbone + VBLL head: training step, tempering, optimiser groups and the post-hoc mode."""

    head: VBLLHead
    owns_likelihood = True

    def __init__(
        self,
        backbone: nn.Module,
        dataset_size: int | None,
        kl_weight: float,
        freeze_backbone: bool,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        num_samples: int,
        cache_features: bool = False,
        feature_cache_dir: str | None = None,
        compile_loss: bool = False,
    ) -> None:
        # the VBLL head owns its likelihood and objective
        check_network(backbone, "backbone")
        super().__init__(likelihood=None, optimizer=optimizer, lr_scheduler=lr_scheduler, num_samples=num_samples)
        if dataset_size is not None and (not is_int(dataset_size) or dataset_size < 1):
            raise ValueError(
                f"dataset_size must be a positive integer or None (read from the datamodule); got {dataset_size!r}"
            )
        if not (is_finite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0; got {kl_weight!r}")
        check_flags(freeze_backbone=freeze_backbone, cache_features=cache_features, compile_loss=compile_loss)
        self.backbone = frozen_or_trained(backbone, freeze_backbone, cache_features, feature_cache_dir)
        self.dataset_size = dataset_size
        self.training_size = dataset_size  # N of the current fit: the argument, or read at each fit's start
        self.kl_weight = float(kl_weight)
        self.compile_loss = compile_loss

    def _regularization_weight(self) -> float:
        """``lambda = kl_weight / N`` (0 until N is known; without ``dataset_size`` it is read at every fit, in
        ``setup`` from a datamodule, at the latest in ``on_train_start`` from the training loader, which
        ``trainer.fit(model, loader)`` attaches only then; a checkpoint does not pin it, so a fit on other data
        takes that data's N)."""
        return 0.0 if self.training_size is None else self.kl_weight / self.training_size

    def _resolve_training_size(self) -> None:
        self.training_size = self.training_set_size("dataset_size")
        self.head.regularization_weight = self._regularization_weight()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.dataset_size is None:
            self.training_size = None
            try:
                self._resolve_training_size()
            except ValueError:
                pass  # a plain training loader is attached later (on_train_start); test and predict need no N

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.training_size is None:
            self._resolve_training_size()

    def forward(self, x: Any) -> Tensor:
        """The features ``phi = g(x)``, ``[B, D]``."""
        return self.backbone(x)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.training_size is None:
            raise RuntimeError(
                f"{type(self).__name__}: the training-set size is unknown; pass dataset_size=N or train "
                "through a Trainer with a datamodule that has num_train"
            )
        x, y = batch
        loss = compiled_head_loss if self.compile_loss else head_loss
        terms = loss(self.head, self(x), y)
        self.log_training_loss(  # the regulariser: KL(q(W) || p(W)) - log p(Sigma), weighted by kl_scale = lambda
            terms.total, len(y), nll=terms.nll, regularizer=terms.regularizer, kl_scale=self.head.regularization_weight
        )
        return terms.total

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The backbone with the optimiser's weight decay, the head with none (the package's recipe)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return [{"params": backbone}, {"params": list(self.head.parameters()), "weight_decay": 0.0}]


class VBLLClassifier(_VBLLModule):
    """A backbone with a discriminative (D-VBLL) or generative (G-VBLL) variational last layer.

    Args:
        backbone: feature extractor returning ``[B, D]`` (e.g. ``LeNet5(num_classes=0)``).
        num_classes: number of classes K.
        in_features: D; read from ``backbone.num_features`` when None.
        head: ``"discriminative"`` (Gaussian logits, Jensen or MC bound) or ``"generative"``.
        parameterization: covariance of the head; None picks ``"dense"`` (discriminative) or
            ``"diagonal"`` (generative, its only option).
        prior_scale: scale of the weights' (discriminative) or class means' (generative) Gaussian prior; see
            :class:`~lightning_bayes.inference.vbll.DiscriminativeVBLL` and
            :class:`~lightning_bayes.inference.vbll.GenerativeVBLL`.
        wishart_scale: scale of the Wishart prior on the noise precision.
        dof: degrees of freedom of that Wishart prior.
        rank: rank of the ``"lowrank"`` covariance factor.
        bound: the discriminative head's bound, ``"jensen"`` (deterministic) or ``"mc"``.
        mc_samples: logit draws of the ``"mc"`` bound.
        class_prior: the generative head's class probabilities (uniform when None).
        dataset_size: N in ``lambda = kl_weight / N``; None reads ``trainer.datamodule.num_train``.
        kl_weight: tempering multiplier on ``1/N``.
        freeze_backbone: post-hoc mode, only the head trains.
        num_samples: logit samples of the discriminative predictive (the generative one is closed form, S = 1).
        cache_features: with ``freeze_backbone``, compute each example's features once (see
            :class:`~lightning_bayes.models.FrozenFeatures`); never saved in checkpoints.
        feature_cache_dir: also keep the cached features in this folder, for later runs.
        compile_loss: run the head's objective under ``torch.compile`` (see the module docstring).
        optimizer: as in :class:`~lightning_bayes.modules.base.BayesianModule` (the head's parameter group without
            weight decay).
        lr_scheduler: as in :class:`~lightning_bayes.modules.base.BayesianModule`.
    """

    head: DiscriminativeVBLL | GenerativeVBLL

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        in_features: int | None = None,
        head: Literal["discriminative", "generative"] = "discriminative",
        parameterization: Parameterization | None = None,
        prior_scale: float = 1.0,
        wishart_scale: float = 1.0,
        dof: float = 1.0,
        rank: int = 3,
        bound: Literal["jensen", "mc"] = "jensen",
        mc_samples: int = 10,
        class_prior: list[float] | None = None,
        dataset_size: int | None = None,
        kl_weight: float = 1.0,
        freeze_backbone: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_samples: int = 20,
        cache_features: bool = False,
        feature_cache_dir: str | None = None,
        compile_loss: bool = False,
    ) -> None:
        if head not in ("discriminative", "generative"):
            raise ValueError(f"head must be 'discriminative' or 'generative'; got {head!r}")
        if not is_int(num_samples) or num_samples < 1:  # checked whichever head (the generative one ignores it)
            raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}")
        super().__init__(
            backbone,
            dataset_size=dataset_size,
            kl_weight=kl_weight,
            freeze_backbone=freeze_backbone,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            num_samples=num_samples if head == "discriminative" else 1,
            cache_features=cache_features,
            feature_cache_dir=feature_cache_dir,
            compile_loss=compile_loss,
        )
        self.save_hyperparameters(ignore=["backbone"])
        width = _feature_width(backbone, in_features)
        if head == "discriminative":
            if class_prior is not None:
                raise ValueError("class_prior applies to head='generative' only; got it with head='discriminative'")
            self.head = DiscriminativeVBLL(
                width, num_classes, self._regularization_weight(), parameterization or "dense",
                prior_scale=prior_scale, wishart_scale=wishart_scale, dof=dof, bound=bound, rank=rank,
                mc_samples=mc_samples,
            )  # fmt: skip
        else:
            if bound != "jensen":
                raise ValueError(
                    f"bound applies to head='discriminative' only; got bound={bound!r} with head='generative'"
                )
            self.head = GenerativeVBLL(
                width, num_classes, self._regularization_weight(), parameterization or "diagonal",
                prior_scale=prior_scale, wishart_scale=wishart_scale, dof=dof,
                class_prior=None if class_prior is None else torch.tensor(class_prior),
            )  # fmt: skip

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        samples = self.resolve_num_samples(num_samples)
        if isinstance(self.head, DiscriminativeVBLL):
            return self.head.predictive(self(x), samples)
        return self.head.predictive(self(x))


class VBLLRegressor(_VBLLModule):
    """A backbone with a variational Bayesian linear regression last layer; closed-form Gaussian predictive.

    Args:
        backbone: feature extractor returning ``[B, D]`` (e.g. ``MLP(in_features=1, out_features=0)``).
        out_features: number of regression outputs.
        in_features: D; read from ``backbone.num_features`` when None.
        parameterization: covariance of the head, ``"dense"``, ``"diagonal"`` or ``"lowrank"``.
        prior_scale: the weights' prior ``N(0, (prior_scale / D) I)``; see
            :class:`~lightning_bayes.inference.vbll.VBLLRegression`.
        wishart_scale: scale of the Wishart prior on the noise precision (``1e-2`` here).
        dof: degrees of freedom of that Wishart prior.
        rank: rank of the ``"lowrank"`` covariance factor.
        dataset_size: N in ``lambda = kl_weight / N``; None reads ``trainer.datamodule.num_train``.
        kl_weight: tempering multiplier on ``1/N``.
        freeze_backbone: post-hoc mode, only the head trains.
        optimizer: as in :class:`~lightning_bayes.modules.base.BayesianModule` (the head's parameter group without
            weight decay).
        lr_scheduler: as in :class:`~lightning_bayes.modules.base.BayesianModule`.
        cache_features: with ``freeze_backbone``, compute each example's features once (see
            :class:`~lightning_bayes.models.FrozenFeatures`); never saved in checkpoints.
        feature_cache_dir: also keep the cached features in this folder, for later runs.
        compile_loss: run the head's objective under ``torch.compile`` (see the module docstring).
    """

    head: VBLLRegression

    def __init__(
        self,
        backbone: nn.Module,
        out_features: int = 1,
        in_features: int | None = None,
        parameterization: Parameterization = "dense",
        prior_scale: float = 1.0,
        wishart_scale: float = 1e-2,
        dof: float = 1.0,
        rank: int = 3,
        dataset_size: int | None = None,
        kl_weight: float = 1.0,
        freeze_backbone: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        cache_features: bool = False,
        feature_cache_dir: str | None = None,
        compile_loss: bool = False,
    ) -> None:
        super().__init__(
            backbone,
            dataset_size=dataset_size,
            kl_weight=kl_weight,
            freeze_backbone=freeze_backbone,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            num_samples=1,
            cache_features=cache_features,
            feature_cache_dir=feature_cache_dir,
            compile_loss=compile_loss,
        )
        self.save_hyperparameters(ignore=["backbone"])
        self.head = VBLLRegression(
            _feature_width(backbone, in_features), out_features, self._regularization_weight(), parameterization,
            prior_scale=prior_scale, wishart_scale=wishart_scale, dof=dof, rank=rank,
        )  # fmt: skip

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        """The head's closed-form Gaussian, S = 1, whatever valid ``num_samples`` is asked for."""
        self.resolve_num_samples(num_samples)
        return self.head.predictive(self(x))
