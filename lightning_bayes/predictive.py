"""The one contract: every method answers ``predictive(x, num_samples)`` with a Predictive.

``CategoricalPredictive`` holds logit samples ``[S, B, C]``; its probabilities are the
Bayesian model average (BMA) ``p(y|x) = 1/S sum_s softmax(z_s)``.
``GaussianPredictive`` is an equal-weight mixture of S Gaussians with mean and variance
``[S, B, D]``.  A point estimate or a closed-form predictive is simply ``S = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Union, cast

import torch
from torch import Tensor

from .checks import class_labels
from .torch_func_state import inside_torch_func

_LOG_2PI = math.log(2.0 * math.pi)


def at_least_float32(value: Tensor) -> Tensor:
    """``value`` in float32 if it is in a half precision, else unchanged (float64 stays float64)."""
    return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value


def _check_rank3(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.ndim != 3:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape [S, B, C|D] (samples, batch, outputs); got {shape}")
    if value.shape[0] < 1 or value.shape[2] < 1:
        raise ValueError(f"{name} needs at least one sample and one output, shape [S >= 1, B, C|D >= 1]; got "
                         f"{tuple(value.shape)}")


def _may_keep(logits: Tensor) -> bool:
    """Whether values computed from ``logits`` may be kept on their predictive: not while ``torch.compile`` traces
    (it cannot replay the write to a frozen dataclass), not inside a ``torch.func`` transform (they would be its
    wrapped tensors, dead outside it), and not under inference mode for logits made outside it (an inference tensor
    cannot be saved for a later backward pass)."""
    return not (
        torch.compiler.is_compiling()
        or inside_torch_func()
        or (torch.is_inference_mode_enabled() and not logits.is_inference())
    )


def _entropy(log_probs: Tensor) -> Tensor:
    """``-sum_c p_c log p_c`` over the last axis; a class of probability 0 (a logit of -inf) adds 0, not NaN."""
    return -(log_probs.exp() * log_probs.clamp_min(torch.finfo(log_probs.dtype).min)).sum(-1)


@dataclass(frozen=True)
class CategoricalPredictive:
    """Mixture of S categorical distributions given by logit samples ``[S, B, C]``.

    The log-probabilities and entropies are computed once and kept, since a metric collection reads them about ten
    times an update (4.5x faster updates at 32 samples, 7x at 100): change a predictive by making a new one, never
    its ``logits`` in place."""

    logits: Tensor

    def __post_init__(self) -> None:
        _check_rank3("logits", self.logits)
        if not self.logits.is_floating_point():  # log_softmax has no integer kernel: its error named no argument
            raise ValueError(f"logits must be a floating-point tensor; got {self.logits.dtype}")

    def _kept(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, kept under ``name`` where no gradient is wanted (metrics update under ``no_grad``); where
        one is, computed afresh, so no graph is kept or reused after a backward pass freed it (see :func:`_may_keep`
        for the other exceptions)."""
        if (torch.is_grad_enabled() and self.logits.requires_grad) or not _may_keep(self.logits):
            return compute()
        kept: Tensor | None = self.__dict__.get(name)
        if kept is None:
            kept = compute()
            self.__dict__[name] = kept  # the dataclass is frozen: its fields, not this cache
        return kept

    def __getstate__(self) -> dict[str, Any]:
        """Pickles (and copies) the fields alone: the kept values are recomputed where read again."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def num_samples(self) -> int:
        """S, the logit samples."""
        return self.logits.shape[0]

    @property
    def log_probs_per_sample(self) -> Tensor:
        """``log softmax(z_s)``, ``[S, B, C]``, in float32 or wider."""
        return self._kept("log_probs_per_sample", lambda: torch.log_softmax(at_least_float32(self.logits), dim=-1))

    @property
    def log_probs(self) -> Tensor:
        """Log of the model average, ``log 1/S sum_s softmax(z_s)``, ``[B, C]``; at most 0 (the sum of S agreeing
        confident samples, divided by S, rounds a hair above 1)."""

        def log_mean() -> Tensor:
            return (torch.logsumexp(self.log_probs_per_sample, dim=0) - math.log(self.num_samples)).clamp_max(0.0)

        return self._kept("log_probs", log_mean)

    @property
    def probs(self) -> Tensor:
        """Bayesian model average probabilities ``[B, C]``."""
        return self.log_probs.exp()

    def log_prob(self, y: Tensor) -> Tensor:
        """``log p(y|x)`` of the model average for integer labels ``[B]``."""
        _, batch, classes = self.logits.shape
        # the range is checked outside torch.func transforms and compilation (no batching rule there), where
        # gather's own error ("index 5 is out of bounds") would not say how many logits the network gives
        in_transform = torch.compiler.is_compiling() or inside_torch_func()
        labels = class_labels(y, batch, classes, "CategoricalPredictive.log_prob(y)", check_range=not in_transform)
        return self.log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    @property
    def entropy(self) -> Tensor:
        """Total uncertainty ``H[p(y|x)]`` of the model average, ``[B]``."""
        return self._kept("entropy", lambda: _entropy(self.log_probs))

    @property
    def expected_entropy(self) -> Tensor:
        """Aleatoric part ``1/S sum_s H[softmax(z_s)]``, ``[B]``."""
        return self._kept("expected_entropy", lambda: _entropy(self.log_probs_per_sample).mean(0))

    @property
    def mutual_information(self) -> Tensor:
        """Epistemic part ``H[BMA] - E_s H[p_s] >= 0`` (clamped against round-off), ``[B]``."""
        return (self.entropy - self.expected_entropy).clamp_min(0.0)

    @property
    def max_prob(self) -> Tensor:
        """Confidence ``max_c p(c|x)`` of the model average, ``[B]``."""
        return self.probs.max(-1).values

    def detach(self) -> CategoricalPredictive:
        """The same predictive without an autograd graph (itself, with what it keeps, when it has none)."""
        return CategoricalPredictive(self.logits.detach()) if self.logits.requires_grad else self

    @property
    def num_examples(self) -> int:
        """B, the examples of the batch."""
        return self.logits.shape[1]

    def first_examples(self, count: int) -> CategoricalPredictive:
        """The predictive of the batch's first ``count`` examples."""
        return CategoricalPredictive(self.logits[:, :count])

    def to(self, *args: Any, **kwargs: Any) -> CategoricalPredictive:
        """The same predictive with its tensors moved or cast as ``Tensor.to`` does (Lightning moves predictions
        to the CPU through this)."""
        return CategoricalPredictive(self.logits.to(*args, **kwargs))


@dataclass(frozen=True)
class GaussianPredictive:
    """Equal-weight mixture of S diagonal Gaussians, ``mean`` and ``variance`` ``[S, B, D]`` (variances positive: the
    metrics refuse others), held in one floating dtype, float32 or wider (the wider of the two; half-precision inputs
    are cast, since a bf16 log density keeps 3 digits, so ``.to(torch.bfloat16)`` keeps float32; integer inputs take
    torch's default dtype). ``weight_variance_samples`` (optional, ``[S, B, D]``, at most the variances) is the part of
    each component's variance that the weights' uncertainty makes: a closed-form predictive's epistemic share
    (VBLL regression's ``phi^T S phi`` beside the noise); ``None``: every component's variance is noise."""

    mean_samples: Tensor
    variance_samples: Tensor
    weight_variance_samples: Tensor | None = None

    def __post_init__(self) -> None:
        _check_rank3("mean_samples", self.mean_samples)
        named = {"variance_samples": self.variance_samples}
        if self.weight_variance_samples is not None:
            named["weight_variance_samples"] = self.weight_variance_samples
        for name, value in named.items():
            if not isinstance(value, Tensor) or value.shape != self.mean_samples.shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must match mean_samples {tuple(self.mean_samples.shape)}; got {got}")
            if value.device != self.mean_samples.device:
                raise ValueError(
                    f"mean_samples and {name} must be on one device; got {self.mean_samples.device} and "
                    f"{value.device}"
                )
        dtype = torch.promote_types(self.mean_samples.dtype, self.variance_samples.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        object.__setattr__(self, "mean_samples", self.mean_samples.to(dtype))
        for name, value in named.items():
            object.__setattr__(self, name, value.to(dtype))

    def _with(self, transform: Callable[[Tensor], Tensor]) -> GaussianPredictive:
        """The predictive with ``transform`` applied to each of its tensors."""
        weight = self.weight_variance_samples
        weight = None if weight is None else transform(weight)
        return GaussianPredictive(transform(self.mean_samples), transform(self.variance_samples), weight)

    @property
    def num_samples(self) -> int:
        """S, the Gaussian components."""
        return self.mean_samples.shape[0]

    @property
    def mean(self) -> Tensor:
        """Mixture mean ``[B, D]``."""
        return self.mean_samples.mean(0)

    @property
    def variance(self) -> Tensor:
        """Total variance: mean of variances (aleatoric) plus variance of means (epistemic), ``[B, D]``."""
        return self.aleatoric_variance + self.epistemic_variance

    @property
    def aleatoric_variance(self) -> Tensor:
        """Mean of the components' noise variances, ``E_s[v_s - w_s]``, ``[B, D]``: the noise the model expects."""
        weight = self.weight_variance_samples
        return (self.variance_samples if weight is None else self.variance_samples - weight).mean(0)

    @property
    def epistemic_variance(self) -> Tensor:
        """Variance of the components' means plus their mean weight variance, ``Var_s[mu_s] + E_s[w_s]``, ``[B, D]``:
        the model's own uncertainty."""
        spread = self.mean_samples.var(0, unbiased=False)
        return spread if self.weight_variance_samples is None else spread + self.weight_variance_samples.mean(0)

    def _check_target(self, y: Tensor) -> Tensor:
        if y.ndim == 1 and self.mean_samples.shape[-1] == 1:
            y = y.unsqueeze(-1)
        if y.shape != self.mean_samples.shape[1:]:
            raise ValueError(f"y must have shape [B, D]={tuple(self.mean_samples.shape[1:])}; got {tuple(y.shape)}")
        return y

    def log_prob(self, y: Tensor) -> Tensor:
        """Mixture log density ``log 1/S sum_s prod_d N(y_d; mu_sd, v_sd)``, ``[B]``."""
        y = self._check_target(y).to(self.mean_samples.dtype)
        comp = -0.5 * (_LOG_2PI + self.variance_samples.log() + (y - self.mean_samples) ** 2 / self.variance_samples)
        return torch.logsumexp(comp.sum(-1), dim=0) - math.log(self.num_samples)

    def cdf(self, y: Tensor) -> Tensor:
        """Marginal mixture CDF per output dimension, ``[B, D]``."""
        y = self._check_target(y).to(self.mean_samples.dtype)
        z = (y - self.mean_samples) / self.variance_samples.sqrt()
        return torch.special.ndtr(z).mean(0)

    def quantile(self, q: float, iterations: int = 60) -> Tensor:
        """Marginal quantile per output dimension, ``[B, D]``: exact for S = 1, bisection on the CDF otherwise."""
        if not 0.0 < q < 1.0:
            raise ValueError(f"q must lie in (0, 1); got {q}")
        std = self.variance_samples.sqrt()
        z = torch.special.ndtri(torch.tensor(q, dtype=std.dtype, device=std.device))  # 2q - 1 rounded to -1 below 3e-8
        per_component = self.mean_samples + z * std
        if self.num_samples == 1:
            return per_component[0]
        lo, hi = per_component.min(0).values, per_component.max(0).values  # the mixture quantile lies in between
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def affine(self, shift: Tensor | float, scale: Tensor | float) -> GaussianPredictive:
        """The predictive of ``shift + scale y`` (``scale`` > 0, per output or one number): means ``shift + scale
        mu``, variances ``scale^2 sigma^2``; e.g. a standardised target back in its original units."""
        scale = torch.as_tensor(scale, dtype=self.mean_samples.dtype, device=self.mean_samples.device)
        if not bool((scale > 0).all()):
            raise ValueError(f"scale must be > 0; got {scale.tolist()}")
        weight = self.weight_variance_samples
        weight = None if weight is None else weight * scale**2
        return GaussianPredictive(self.mean_samples * scale + shift, self.variance_samples * scale**2, weight)

    def detach(self) -> GaussianPredictive:
        """The same predictive without an autograd graph."""
        return self._with(Tensor.detach)

    @property
    def num_examples(self) -> int:
        """B, the examples of the batch."""
        return self.mean_samples.shape[1]

    def first_examples(self, count: int) -> GaussianPredictive:
        """The predictive of the batch's first ``count`` examples."""
        return self._with(lambda t: t[:, :count])

    def to(self, *args: Any, **kwargs: Any) -> GaussianPredictive:
        """The same predictive with its tensors moved or cast as ``Tensor.to`` does."""
        return self._with(lambda t: t.to(*args, **kwargs))


Predictive = Union[CategoricalPredictive, GaussianPredictive]


def concatenate(predictives: list[Predictive]) -> Predictive:
    """Pool the samples of several predictives of one type into one (an equal-weight mixture).

    Used by ensembles: M members, each with S_m samples, give one predictive with sum_m S_m samples.
    """
    if not predictives:
        raise ValueError("concatenate needs at least one predictive; got an empty list")
    kinds = {type(p) for p in predictives}
    if len(kinds) != 1:
        raise TypeError(f"cannot concatenate predictives of different types: {sorted(k.__name__ for k in kinds)}")
    first = predictives[0]
    shapes = {tuple(p.logits.shape[1:] if isinstance(p, CategoricalPredictive) else p.mean_samples.shape[1:])
              for p in predictives}
    if len(shapes) > 1:
        raise ValueError(f"cannot concatenate predictives of different [B, C|D] (batch, outputs): {sorted(shapes)}")
    if isinstance(first, CategoricalPredictive):  # all predictives share first's type (checked above)
        categorical = cast(list[CategoricalPredictive], predictives)
        return CategoricalPredictive(torch.cat([p.logits for p in categorical], dim=0))
    gaussian = cast(list[GaussianPredictive], predictives)
    weights = [p.weight_variance_samples for p in gaussian]
    return GaussianPredictive(
        torch.cat([p.mean_samples for p in gaussian], dim=0),
        torch.cat([p.variance_samples for p in gaussian], dim=0),
        None if all(w is None for w in weights) else torch.cat(
            [torch.zeros_like(p.variance_samples) if w is None else w for p, w in zip(gaussian, weights)], dim=0
        ),
    )
