"""Bayesian ``Linear`` / ``Conv2d`` layers whose weight and bias are drawn from a pluggable per-weight family.

Families: :class:`~lightning_bayes.inference.mean_field_gaussian.MeanFieldGaussian` (closed-form KL, and the
local reparameterisation trick: for ``W ~ N(M, S^2)`` elementwise, ``x W^T + b`` is Gaussian with mean
``x M^T + m_b`` and variance ``x^2 (S^2)^T + s_b^2``, so one output draw per example replaces a weight draw;
Kingma, Salimans & Welling, NeurIPS 2015) or :class:`~lightning_bayes.inference.bernstein.BernsteinFlow` (a
weight draw per forward, shared by the batch, and a Monte Carlo ``log q - log p`` of that draw). The prior is
``N(0, prior_scale^2)`` on every weight. Nothing is scaled silently: :meth:`kl` is the KL (or its one-draw
estimate) of the whole layer; the module dividing it by the dataset size states so. :func:`to_variational`
converts chosen layers of an existing model (the ``params`` selector) in place, their weights becoming the
initial means.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import ParamSelector, select_parameters
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


class VariationalLayer(nn.Module):
    """A ``Linear`` or ``Conv2d`` whose ``(W, b)`` are drawn from ``q``: mean-field Gaussian or a Bernstein flow per weight.

    Args:
        template: the deterministic layer (``nn.Linear`` or ``nn.Conv2d`` with a bias): its shape, its convolution
            settings and, for the Gaussian family, its weights as the initial means.
        family: ``"gaussian"`` or ``"bernstein"``.
        prior_scale: standard deviation of the ``N(0, prior_scale^2)`` prior of every weight.
        init_scale: initial posterior standard deviation (Gaussian family).
        degree: Bernstein polynomial degree ``M`` (Bernstein family).
        support: the initial range ``(w_min, w_max)`` of every weight's polynomial (Bernstein family).
        local_reparameterization: sample outputs instead of weights (Gaussian family only; for a convolution
            each output pixel gets its own noise, the standard approximation of Kingma et al.).
    """

    def __init__(
        self,
        template: nn.Linear | nn.Conv2d,
        family: Family = "gaussian",
        prior_scale: float = 1.0,
        init_scale: float = 1e-3,
        degree: int = 10,
        support: tuple[float, float] = (-1.0, 1.0),
        local_reparameterization: bool = True,
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be > 0; got {prior_scale!r}")
        if local_reparameterization and family != "gaussian":
            raise ValueError(f"local_reparameterization needs family='gaussian'; got family={family!r}")
        if not isinstance(template, (nn.Linear, nn.Conv2d)) or template.bias is None:
            raise ValueError(f"template must be an nn.Linear or nn.Conv2d with a bias; got {template!r}")
        self.prior_scale, self.local_reparameterization = prior_scale, local_reparameterization
        self._convolution = (
            {"stride": template.stride, "padding": template.padding, "dilation": template.dilation, "groups": template.groups}
            if isinstance(template, nn.Conv2d) else None
        )
        self.weight, self.bias = (
            _family(family, tuple(p.shape), p.detach(), init_scale, degree, support) for p in (template.weight, template.bias)
        )
        self._last_log_ratio: Tensor | None = None

    def _layer(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if self._convolution is None:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, **self._convolution)

    def forward(self, x: Tensor) -> Tensor:
        if self.local_reparameterization:
            mean = self._layer(x, self.weight.mean, self.bias.mean)
            variance = self._layer(x.square(), self.weight.scale.square(), self.bias.scale.square())
            return mean + variance.sqrt() * torch.randn_like(mean)
        weight, weight_log_q = self.weight.sample(1)
        bias, bias_log_q = self.bias.sample(1)
        weight, bias = weight[0], bias[0]
        self._last_log_ratio = weight_log_q.sum() + bias_log_q.sum() - self._log_prior(weight) - self._log_prior(bias)
        return self._layer(x, weight, bias)

    def _log_prior(self, value: Tensor) -> Tensor:
        return (-0.5 * (value / self.prior_scale).square() - math.log(self.prior_scale) - 0.5 * math.log(2 * math.pi)).sum()

    def kl(self) -> Tensor:
        """``KL(q || p)`` of the layer: closed form (Gaussian) or ``log q - log p`` of the last forward's draw."""
        if isinstance(self.weight, MeanFieldGaussian):
            return self.weight.kl_to_prior(self.prior_scale) + self.bias.kl_to_prior(self.prior_scale)
        if self._last_log_ratio is None:
            raise RuntimeError("VariationalLayer.kl: run a forward pass first (the KL is estimated from its draw)")
        return self._last_log_ratio


def to_variational(model: nn.Module, params: ParamSelector = "all", **layer_options: Any) -> list[str]:
    """Replace, in place, every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` whose weight ``params`` selects by a
    :class:`VariationalLayer` built from it (``layer_options`` as its arguments); return the replaced names."""
    selected = select_parameters(model, params)
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d)) and f"{name}.weight" in selected:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, VariationalLayer(module, **layer_options).to(module.weight))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"params={params!r} selects the weight of no nn.Linear or nn.Conv2d of {type(model).__name__}")
    return replaced


def total_kl(model: nn.Module) -> Tensor:
    """The sum of :meth:`VariationalLayer.kl` over the variational layers of ``model``."""
    layers = [m for m in model.modules() if isinstance(m, VariationalLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no VariationalLayer (convert it with to_variational)")
    return torch.stack([layer.kl() for layer in layers]).sum()
