"""``SSVI``: sparse subspace variational inference, mean-field Gaussian VI on a support of fixed density.

Every ``nn.Linear`` / ``nn.Conv2d`` weight that ``params`` selects gets a
:class:`~lightning_bayes.inference.sparse_gaussian.SparseGaussian` on a random support of ``round(density n)``
entries (the first convolution dense unless ``dense_first_conv=False``); biases and everything else (BatchNorm)
stay deterministic. Training minimises the negative ELBO of
:class:`~lightning_bayes.modules.variational_inference.VariationalInference` (KL over active weights only);
every ``update_every`` iterations before ``update_end_fraction`` of training, the step is replaced by a support
update (:mod:`~lightning_bayes.inference.ssvi_topology`) whose growth scores are the dense gradients of that
iteration's minibatch. After every iteration the weights and the optimiser state are zero off the masks (the
product ``mu * gamma`` in the forward already masks the gradients). Masks, the iteration counter, the optimiser
state and the random state (:class:`VariationalInference`) live in the checkpoint, and validation (the sanity check
too) leaves the random stream untouched, so a resumed run continues exactly. Logs ``ssvi/density`` and ``ssvi/flops_ratio``
(counted training weight FLOPs over dense VI's, :mod:`~lightning_bayes.inference.ssvi_flops`). Under DDP the
growth gradients are averaged across ranks like the parameters' gradients, so every rank keeps the same supports.
With gradient accumulation the growth gradients are those of all the update iteration's micro-batches.
Reference: Li, Miao, Qiu & Zhang, "Training Bayesian Neural Networks with Sparse Subspace Variational
Inference", ICLR 2024 (arXiv 2402.11025).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..checks import check_flags, check_seed, is_int, is_number
from ..inference.likelihoods import Likelihood
from ..inference.sparse_gaussian import SparseGaussian
from ..inference.ssvi_flops import LayerCost, training_flops_ratio
from ..inference.ssvi_scores import SCORES, Score
from ..inference.ssvi_topology import (
    GROW_RHO,
    MEAN_INITS,
    GrowRho,
    MeanInit,
    drop_fraction,
    initialise_support,
    is_update_iteration,
    mask_optimizer_state,
    update_support,
)
from ..inference.variational_layers import VariationalLayer, use_noise
from ..modes import modes_kept
from ..params import ParamSelector
from .base import Batch
from .variational_inference import VariationalInference


def _sparse_weight(layer: VariationalLayer) -> SparseGaussian:
    """The layer's weight family: SSVI's family is ``sparse_gaussian``, a :class:`SparseGaussian` for every weight
    matrix or kernel."""
    return cast(SparseGaussian, layer.weight)


class SSVI(VariationalInference):
    """Sparse subspace VI over the layers of ``backbone`` selected by ``params``.

    Args:
        backbone: the network (LeNet, a timm ResNet, ...); its selected conv / linear weights become sparse Gaussians.
        params: which layers (``"all"``, globs; see ``params.py``).
        density: the fraction ``s`` of active weights in every sparse tensor.
        dense_first_conv: keep the first convolution dense (the reference's allocation).
        update_every: ``Delta T``, iterations between support updates.
        drop_fraction: ``alpha``, the initial fraction of active weights swapped (cosine-decayed).
        update_end_fraction: the support is frozen from this fraction of the total iterations on.
        score: removal score (:data:`~lightning_bayes.inference.ssvi_scores.SCORES`).
        grow_rho: ``rho`` of grown weights, ``"mean"`` (of the kept ones) or ``"eps"`` (``softplus^-1(1e-6)``).
        grow_noise_free: compute the growth gradient with the noise off (the mean network).
        mean_init: initial means on the support: ``"normal"``, ``N(0, 0.01^2)`` (the reference, whose ResNets have
            BatchNorm), or ``"backbone"``, the backbone's initial weights scaled by ``1 / sqrt(density)`` (for
            networks without normalisation, e.g. LeNet, where tiny means shrink the signal layer by layer).
        seed: seed of the initial supports and values.
        Others: as in :class:`VariationalInference` (``kl_weight`` multiplies ``KL / N``; the reference's
            ``0.01 / N`` tempering is ``kl_weight=0.01``).

    Defaults are the library's, not the reference's recipe (prior ``N(0, 0.005^2)``, ``kl_weight=0.01``, a KL
    warm-up over half of training, SGD lr 0.01 with momentum 0.9 and weight decay 5e-4, the noise-off mean as the
    prediction): pass those to reproduce it; ``configs/mnist/ssvi.yaml`` states its own choices and why.
    """

    # buffers (register_buffer), typed for readers and checkers
    iteration: Tensor
    supports_sharding = False  # the masks and support updates take whole tensors, not FSDP2's shards

    def __init__(
        self,
        backbone: nn.Module,
        params: ParamSelector = "all",
        likelihood: str | Likelihood = "categorical",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        prior_scale: float = 1.0,
        local_reparameterization: bool = True,
        dataset_size: int | None = None,
        kl_weight: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        train_samples: int = 1,
        num_samples: int = 10,
        mean_prediction: bool = False,
        density: float = 0.1,
        dense_first_conv: bool = True,
        update_every: int = 100,
        drop_fraction: float = 0.3,
        update_end_fraction: float = 0.75,
        score: Score = "snr_mean_abs",
        grow_rho: GrowRho = "mean",
        grow_noise_free: bool = False,
        mean_init: MeanInit = "normal",
        seed: int = 0,
    ) -> None:
        if not (is_number(density) and 0 < density <= 1):
            raise ValueError(f"density must be a number in (0, 1]; got {density!r}")
        check_flags(dense_first_conv=dense_first_conv, grow_noise_free=grow_noise_free)
        if not is_int(update_every) or update_every < 1:
            raise ValueError(f"update_every must be a positive int; got {update_every!r}")
        if not 0 <= drop_fraction < 1:
            raise ValueError(f"drop_fraction must be in [0, 1); got {drop_fraction!r}")
        if not 0 <= update_end_fraction <= 1:
            raise ValueError(f"update_end_fraction must be in [0, 1]; got {update_end_fraction!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}; got {score!r}")
        if grow_rho not in GROW_RHO:
            raise ValueError(f"grow_rho must be one of {GROW_RHO}; got {grow_rho!r}")
        if mean_init not in MEAN_INITS:
            raise ValueError(f"mean_init must be one of {MEAN_INITS}; got {mean_init!r}")
        super().__init__(
            backbone, params=params, likelihood=likelihood, optimizer=optimizer, lr_scheduler=lr_scheduler,
            family="sparse_gaussian", prior_scale=prior_scale, local_reparameterization=local_reparameterization,
            dataset_size=dataset_size, kl_weight=kl_weight,
            kl_warmup_epochs=kl_warmup_epochs, train_samples=train_samples, num_samples=num_samples,
            mean_prediction=mean_prediction,
        )
        self.update_every, self.alpha, self.local_reparameterization = update_every, drop_fraction, local_reparameterization
        self.update_end_fraction, self.score, self.grow_rho, self.grow_noise_free = (
            update_end_fraction, score, grow_rho, grow_noise_free
        )
        check_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        convolutions = [layer for layer in self.variational_layers if layer.weight.loc.ndim == 4]
        first_conv = convolutions[0] if dense_first_conv and convolutions else None
        self.sparse_families: list[SparseGaussian] = []
        for layer in self.variational_layers:
            dense = layer is first_conv
            initialise_support(_sparse_weight(layer), 1.0 if dense else density, generator, mean_init)
            if not dense:
                self.sparse_families.append(_sparse_weight(layer))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self._layer_positions: dict[VariationalLayer, int] | None = None

    @property
    def update_end(self) -> int:
        """``T_end``: the first iteration with a frozen support."""
        return math.floor(self.update_end_fraction * self.trainer.estimated_stepping_batches)

    def on_train_start(self) -> None:
        super().on_train_start()
        if not math.isfinite(self.trainer.estimated_stepping_batches):
            raise ValueError(
                "SSVI's support schedule (update_end_fraction, the drop fraction's cosine decay) needs the fit's "
                "total steps, and this fit has no last step: set trainer max_steps, or max_epochs with a sized "
                "training loader"
            )

    def parameter_groups(self) -> list[dict[str, Any]]:
        """``rho`` (and a Gaussian likelihood's noise) without weight decay (the reference's second SGD group),
        everything else as configured."""
        scales = [layer.weight.raw_scale for layer in self.variational_layers]
        return self.without_decay_for([p for p in self.parameters() if p.requires_grad], exempt=scales)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """An optimiser step, or on an update iteration the closure's dense gradients and a support update
        (the parameters do not move); then the masks on weights and optimiser state."""
        iteration = int(self.iteration) + 1
        self.iteration.fill_(iteration)
        if is_update_iteration(iteration, self.update_every, self.update_end):
            self._update_supports(optimizer_closure, drop_fraction(iteration, self.update_end, self.alpha))
        else:
            optimizer.step(closure=optimizer_closure)
        self._apply_masks(getattr(optimizer, "optimizer", optimizer))

    def _record_growth_gradients(self, record: bool) -> None:
        """Add the dense gradients of the coming backward passes to the growth scores (with the noise off when
        ``grow_noise_free``), or stop."""
        for family in self.sparse_families:
            family.record_dense_gradient = record
        use_noise(self.backbone, not (record and self.grow_noise_free))

    def _update_supports(self, closure: Any, fraction: float) -> None:
        self._record_growth_gradients(True)  # already on for the earlier micro-batches of this iteration
        try:
            closure()
        finally:
            self._record_growth_gradients(False)
        for family in self.sparse_families:
            if family.dense_gradient is None:
                raise RuntimeError(
                    "SSVI: a sparse layer got no gradient on an update iteration; every converted layer must take part "
                    "in the loss (convert only the layers the forward uses, with params)"
                )
            # DDP averages parameter gradients only: average this one too, so every rank grows the same weights
            gradient = self.trainer.strategy.reduce(family.dense_gradient, reduce_op="mean")
            update_support(family, gradient, fraction, self.score, self.grow_rho)
            family.dense_gradient = None

    @torch.no_grad()
    def _apply_masks(self, optimizer: torch.optim.Optimizer) -> None:
        for family in self.sparse_families:
            for parameter in (family.loc, family.raw_scale):
                parameter.mul_(family.mask)
                mask_optimizer_state(optimizer, parameter, family.mask)

    def layer_costs(self) -> list[LayerCost]:
        """Active and total weights and output positions of every variational layer (positions from the first
        training batch)."""
        if self._layer_positions is None:
            raise RuntimeError("SSVI.layer_costs: the output positions are measured on the first training batch")
        return [
            LayerCost(_sparse_weight(layer).num_active, _sparse_weight(layer).mask.numel(), positions)
            for layer, positions in self._layer_positions.items()
        ]

    def weight_density(self) -> float:
        """Active over total variational weights (the dense first convolution included)."""
        families = [_sparse_weight(layer) for layer in self.variational_layers]
        return sum(f.num_active for f in families) / sum(f.mask.numel() for f in families)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._layer_positions is None:
            self._layer_positions = self._measure_positions(batch[0])
        if is_update_iteration(int(self.iteration) + 1, self.update_every, self.update_end):
            # every micro-batch of an update iteration (gradient accumulation) adds to the growth scores
            self._record_growth_gradients(True)

    @torch.no_grad()
    def _measure_positions(self, x: Any) -> dict[VariationalLayer, int]:
        """Output positions per example and unit of each variational layer, from one noise-free forward in eval
        mode (no random draw, no BatchNorm statistics update)."""
        positions: dict[VariationalLayer, int] = {}
        hooks = [
            layer.register_forward_hook(
                lambda layer, _, out: positions.__setitem__(layer, out[0].numel() // layer.weight.mask.shape[0])
            )
            for layer in self.variational_layers
        ]
        use_noise(self.backbone, False)
        try:
            with modes_kept(self.backbone):  # every submodule's own flag back (train(mode) set them all alike)
                self.backbone.eval()
                self(x[:1])
        finally:
            use_noise(self.backbone, True)
            for hook in hooks:
                hook.remove()
        return positions

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        ratio = training_flops_ratio(
            self.layer_costs(), int(self.trainer.estimated_stepping_batches), self.update_every, self.update_end,
            local_reparameterization=self.local_reparameterization,
        )
        self.log("ssvi/density", self.weight_density())
        self.log("ssvi/flops_ratio", ratio)
