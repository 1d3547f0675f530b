"""Regression metrics of a :class:`GaussianPredictive` (an equal-weight mixture of S Gaussians).

``update(predictive, target)`` takes targets ``[B, D]`` (or ``[B]`` when D = 1). States are sums, so the
value under DDP equals the value on the pooled data.

* ``GaussianNLL``: ``-1/N sum_n log p(y_n|x_n)``, the mixture's joint density over the D outputs.
* ``RMSE``: root mean squared error of the mixture mean over all examples and outputs.
* ``CRPS``: continuous ranked probability score, averaged over examples and outputs, in closed form for
  a Gaussian mixture (Grimit et al., 2006; Gneiting & Raftery, 2007):
  ``CRPS = E|X - y| - 1/2 E|X - X'| = 1/S sum_s A(y - mu_s, v_s) - 1/(2 S^2) sum_{s,t} A(mu_s - mu_t, v_s + v_t)``
  with ``A(m, v) = E|m + sqrt(v) Z| = m (2 Phi(m / s) - 1) + 2 s phi(m / s)``, ``s = sqrt(v)``.
* ``IntervalCoverage``: fraction of targets (over examples and outputs) inside the central ``level``
  interval ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of the marginal mixture.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics.regression import MeanSquaredError

from ..checks import is_number
from ..predictive import GaussianPredictive
from ._inputs import gaussian, regression_targets
from ._mean import MeanOverValues, refuse_empty

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class GaussianNLL(MeanOverValues):
    """Mean over examples of ``-log p(y|x)`` of the Gaussian mixture (nats, summed over outputs)."""

    higher_is_better = False

    def update(self, predictive: GaussianPredictive, target: Tensor) -> None:  # type: ignore[override]
        predictive = gaussian(predictive, type(self).__name__)
        super().update(-predictive.log_prob(regression_targets(predictive, target, type(self).__name__)))


class RMSE(MeanSquaredError):
    """Root mean squared error of the mixture mean, over examples and outputs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(squared=False, **kwargs)

    def update(self, predictive: GaussianPredictive, target: Tensor) -> None:  # type: ignore[override]
        predictive = gaussian(predictive, type(self).__name__)
        super().update(predictive.mean, regression_targets(predictive, target, type(self).__name__))

    def compute(self) -> Tensor:
        refuse_empty(self.total, type(self).__name__)
        return super().compute()


_PAIR_ELEMENTS = 2**22  # values of one block of CRPS's pairwise term (16 MB in float32)


def _expected_abs(m: Tensor, v: Tensor) -> Tensor:
    """``A(m, v) = E|m + sqrt(v) Z|`` for ``Z ~ N(0, 1)``."""
    s = v.sqrt()
    z = m / s
    return m * (2.0 * torch.special.ndtr(z) - 1.0) + 2.0 * s * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def gaussian_mixture_crps(predictive: GaussianPredictive, target: Tensor) -> Tensor:
    """Closed-form CRPS per example and output, ``[B, D]``: ``1/S sum_s A(y - mu_s, v_s) - 1/(2 S^2) sum_{s,t}
    A(mu_s - mu_t, v_s + v_t)`` (Grimit et al., 2006), the pairwise sum taken in blocks of rows ``s`` that hold
    about ``_PAIR_ELEMENTS`` values (all ``S^2 B D`` at once took 3.8 GB at S = 1000, B = 128)."""
    predictive = gaussian(predictive, "gaussian_mixture_crps")
    y = regression_targets(predictive, target, "gaussian_mixture_crps")
    mean, var = predictive.mean_samples, predictive.variance_samples
    to_target = _expected_abs(y - mean, var).mean(0)
    samples = mean.shape[0]
    rows = max(1, _PAIR_ELEMENTS // max(1, mean.numel()))
    between = torch.zeros_like(to_target)
    for start in range(0, samples, rows):
        block_mean, block_var = mean[start : start + rows].unsqueeze(1), var[start : start + rows].unsqueeze(1)
        between = between + _expected_abs(block_mean - mean.unsqueeze(0), block_var + var.unsqueeze(0)).sum((0, 1))
    return to_target - 0.5 * between / samples**2


class CRPS(MeanOverValues):
    """Mean closed-form CRPS of the Gaussian mixture over examples and outputs (units of the target)."""

    higher_is_better = False

    def update(self, predictive: GaussianPredictive, target: Tensor) -> None:  # type: ignore[override]
        super().update(gaussian_mixture_crps(gaussian(predictive, type(self).__name__), target))


class IntervalCoverage(MeanOverValues):
    """Fraction of targets inside the central ``level`` predictive interval (ideal value: ``level``).

    Args:
        level: the interval's probability mass, in ``(0, 1)``.
        kwargs: torchmetrics' ``Metric`` options.
    """

    higher_is_better = None

    def __init__(self, level: float = 0.9, **kwargs: Any) -> None:
        if not (is_number(level) and 0.0 < level < 1.0):  # a str "0.9" failed in '<'
            raise ValueError(f"level must lie in (0, 1); got {level!r}")
        super().__init__(**kwargs)
        self.level = level

    def update(self, predictive: GaussianPredictive, target: Tensor) -> None:  # type: ignore[override]
        predictive = gaussian(predictive, type(self).__name__)
        y = regression_targets(predictive, target, type(self).__name__)
        lower = predictive.quantile(0.5 * (1.0 - self.level))
        upper = predictive.quantile(0.5 * (1.0 + self.level))
        super().update(((y >= lower) & (y <= upper)).float())
