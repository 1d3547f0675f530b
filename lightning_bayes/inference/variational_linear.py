"""A Bayesian ``Linear`` layer whose weight and bias are drawn from a pluggable per-weight variational family.

Families: :class:`~lightning_bayes.inference.mean_field_gaussian.MeanFieldGaussian` (closed-form KL, and the
local reparameterisation trick: for ``W ~ N(M, S^2)`` elementwise, ``x W^T + b`` is Gaussian with mean
``x M^T + m_b`` and variance ``x^2 (S^2)^T + s_b^2``, so one output draw per example replaces a weight draw;
Kingma, Salimans & Welling, NeurIPS 2015) or :class:`~lightning_bayes.inference.bernstein.BernsteinFlow` (a
weight draw per forward, shared by the batch, and a Monte Carlo ``log q - log p`` of that draw). The prior is
``N(0, prior_scale^2)`` on every weight. Nothing is scaled silently: :meth:`kl` is the KL (or its one-draw
estimate) of the whole layer; the module dividing it by the dataset size states so.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bernstein import BernsteinFlow
from .mean_field_gaussian import MeanFieldGaussian

Family = Literal["gaussian", "bernstein"]
FAMILIES = ("gaussian", "bernstein")


def _family(
    kind: Family, shape: tuple[int, ...], init_mean: Tensor, init_scale: float, degree: int, support: tuple[float, float]
) -> nn.Module:
    if kind == "gaussian":
        return MeanFieldGaussian(shape, init_mean, init_scale)
    return BernsteinFlow(shape, degree=degree, support=support)


class VariationalLinear(nn.Module):
    """``y = x W^T + b`` with ``(W, b) ~ q``; ``q`` mean-field Gaussian or a Bernstein flow per weight.

    Args:
        in_features, out_features: as ``nn.Linear``.
        family: ``"gaussian"`` or ``"bernstein"``.
        prior_scale: standard deviation of the ``N(0, prior_scale^2)`` prior of every weight.
        init_scale: initial posterior standard deviation (Gaussian family).
        degree: Bernstein polynomial degree ``M`` (Bernstein family).
        support: the initial range ``(w_min, w_max)`` of every weight's polynomial (Bernstein family).
        local_reparameterization: sample outputs instead of weights (Gaussian family only).
        init_from: an ``nn.Linear`` whose weights become the initial means (Gaussian family).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        family: Family = "gaussian",
        prior_scale: float = 1.0,
        init_scale: float = 1e-3,
        degree: int = 10,
        support: tuple[float, float] = (-1.0, 1.0),
        local_reparameterization: bool = True,
        init_from: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be > 0; got {prior_scale!r}")
        if local_reparameterization and family != "gaussian":
            raise ValueError(f"local_reparameterization needs family='gaussian'; got family={family!r}")
        if init_from is None:
            init_from = nn.Linear(in_features, out_features)
        if init_from.weight.shape != (out_features, in_features) or init_from.bias is None:
            raise ValueError(
                f"init_from must be an nn.Linear({in_features}, {out_features}) with a bias; got {init_from}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.prior_scale, self.local_reparameterization = prior_scale, local_reparameterization
        shapes = {"weight": (out_features, in_features), "bias": (out_features,)}
        self.weight, self.bias = (
            _family(family, shapes[name], getattr(init_from, name).detach(), init_scale, degree, support)
            for name in ("weight", "bias")
        )
        self._last_log_ratio: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.local_reparameterization:
            mean = F.linear(x, self.weight.mean, self.bias.mean)
            variance = F.linear(x.square(), self.weight.scale.square(), self.bias.scale.square())
            return mean + variance.sqrt() * torch.randn_like(mean)
        weight, weight_log_q = self.weight.sample(1)
        bias, bias_log_q = self.bias.sample(1)
        weight, bias = weight[0], bias[0]
        self._last_log_ratio = weight_log_q.sum() + bias_log_q.sum() - self._log_prior(weight) - self._log_prior(bias)
        return F.linear(x, weight, bias)

    def _log_prior(self, value: Tensor) -> Tensor:
        return (-0.5 * (value / self.prior_scale).square() - math.log(self.prior_scale) - 0.5 * math.log(2 * math.pi)).sum()

    def kl(self) -> Tensor:
        """``KL(q || p)`` of the layer: closed form (Gaussian) or ``log q - log p`` of the last forward's draw."""
        if isinstance(self.weight, MeanFieldGaussian):
            return self.weight.kl_to_prior(self.prior_scale) + self.bias.kl_to_prior(self.prior_scale)
        if self._last_log_ratio is None:
            raise RuntimeError("VariationalLinear.kl: run a forward pass first (the KL is estimated from its draw)")
        return self._last_log_ratio
