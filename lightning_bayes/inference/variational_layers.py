"""Bayesian ``Linear`` / ``Conv2d`` layers whose weight and bias are drawn from a pluggable per-weight family.

Families: :class:`~lightning_bayes.inference.mean_field_gaussian.MeanFieldGaussian` (closed-form KL, and the
local reparameterisation trick: for ``W ~ N(M, S^2)`` elementwise, ``x W^T + b`` is Gaussian with mean
``x M^T + m_b`` and variance ``x^2 (S^2)^T + s_b^2``, so one output draw per example replaces a weight draw;
Kingma, Salimans & Welling, NeurIPS 2015), its masked SSVI form, or a Bernstein flow per weight
(:class:`~lightning_bayes.inference.bernstein.BernsteinFlow`) or jointly over a small tensor
(:class:`~lightning_bayes.inference.bernstein_autoregressive.AutoregressiveBernsteinFlow`): a weight draw per
forward, shared by the batch, and a Monte Carlo ``log q - log p`` of that draw. The prior is ``N(0, prior_scale^2)``
on every weight. :func:`use_noise` switches every layer of a model to its mean (Gaussian) or ``f(0)`` (flow, base
noise ``z = 0``: each weight's median for a mean-field flow, the chain of conditional medians given the earlier
weights at ``z = 0`` for the joint flow) weights, the deterministic "mean model"; :func:`draws_ahead` makes a
predictive's ``S`` (or an ELBO's ``T``) weight draws one ``sample(k)`` call per family instead of one per forward.
Nothing is scaled silently: :meth:`kl` is the KL (or its one-draw estimate) of the whole layer; the module dividing
it by the dataset size states so. :func:`to_variational` converts chosen layers of an existing model (the ``params``
selector) in place, their weights becoming the initial means.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import is_finite, is_int
from ..params import ParamSelector, select_parameters
from .bernstein import BernsteinFlow
from .bernstein_autoregressive import AutoregressiveBernsteinFlow
from .mean_field_gaussian import MeanFieldGaussian, ScaleMap
from .point_mass import PointMass
from .sparse_gaussian import SparseGaussian

Family = Literal["gaussian", "bernstein", "bernstein_autoregressive", "sparse_gaussian"]
FAMILIES = ("gaussian", "bernstein", "bernstein_autoregressive", "sparse_gaussian")
GAUSSIAN_FAMILIES = ("gaussian", "sparse_gaussian")  # the ones with local reparameterisation and a closed-form KL
DRAW_AHEAD_ELEMENTS = 2**24  # weights drawn at once per layer inside `draws_ahead` (64 MB in float32)
_LISTED = 8  # layers named in a refusal of unconvertible layers (a network may hold hundreds)
FamilyModule = Union[MeanFieldGaussian, SparseGaussian, PointMass, BernsteinFlow, AutoregressiveBernsteinFlow]


class GaussianFamilyModule(Protocol):
    """What a layer reads of a family in ``GAUSSIAN_FAMILIES``: its mean and scale (local reparameterisation) and
    its closed-form KL."""

    @property
    def mean(self) -> Tensor: ...

    @property
    def scale(self) -> Tensor: ...

    def kl_to_prior(self, prior_scale: float) -> Tensor: ...


def _family(
    kind: Family, shape: tuple[int, ...], init_mean: Tensor, init_scale: float, degree: int, support: tuple[float, float],
    scale_map: ScaleMap, freeze_affine: bool,
) -> FamilyModule:
    if kind == "gaussian":
        return MeanFieldGaussian(shape, init_mean, init_scale, scale_map)
    if kind == "sparse_gaussian":  # SSVI: masked Gaussian weights, deterministic biases
        return SparseGaussian(shape, init_mean, init_scale) if len(shape) > 1 else PointMass(init_mean)
    flow_class = BernsteinFlow if kind == "bernstein" else AutoregressiveBernsteinFlow
    flow = flow_class(shape, degree=degree, support=support, freeze_affine=freeze_affine, dtype=init_mean.dtype)
    with torch.no_grad():  # w = softplus(alpha) h - beta: centre the chain on the template's weight
        flow.beta.copy_(-init_mean)
    return flow


class VariationalLayer(nn.Module):
    """A ``Linear`` or ``Conv2d`` whose ``(W, b)`` are drawn from ``q``: mean-field Gaussian or a Bernstein flow per weight.

    Args:
        template: the deterministic layer (``nn.Linear`` or ``nn.Conv2d``, with or without a bias): its shape, its
            convolution settings and its weights as the initial means (Gaussian) or centres (flow: ``support`` is
            then the initial range around them).
        family: ``"gaussian"``, ``"sparse_gaussian"`` (SSVI), ``"bernstein"`` (per weight) or
            ``"bernstein_autoregressive"`` (one joint flow for the weight, one for the bias).
        prior_scale: standard deviation of the ``N(0, prior_scale^2)`` prior of every weight.
        init_scale: initial posterior standard deviation (Gaussian family).
        degree: Bernstein polynomial degree ``M`` (Bernstein family).
        support: the initial range ``(w_min, w_max)`` of every weight's polynomial around its template weight
            (Bernstein family).
        local_reparameterization: sample outputs instead of weights (Gaussian families only; for a convolution
            each output pixel gets its own noise, the standard approximation of Kingma et al.).
        scale_map: how the Gaussian family maps its raw scale to the standard deviation (``"softplus"``, or
            ``"square"`` as in BLoB; family ``"gaussian"`` only).
        freeze_affine: keep the flows' first affine map ``f1`` (``a``, ``b``) at its initial values, as the
            released Bernstein-flow script does (Bernstein families).
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
        scale_map: ScaleMap = "softplus",
        freeze_affine: bool = False,
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
        if scale_map != "softplus" and family != "gaussian":
            raise ValueError(f"scale_map={scale_map!r} needs family 'gaussian'; got family={family!r}")
        if not (is_finite(prior_scale) and prior_scale > 0):
            raise ValueError(f"prior_scale must be a finite number > 0; got {prior_scale!r}")
        if local_reparameterization and family not in GAUSSIAN_FAMILIES:
            raise ValueError(f"local_reparameterization needs a family in {GAUSSIAN_FAMILIES}; got family={family!r}")
        if not isinstance(template, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"template must be an nn.Linear or nn.Conv2d; got {template!r}")
        self.prior_scale, self.local_reparameterization = prior_scale, local_reparameterization
        self._convolution: dict[str, Any] | None = (
            {"stride": template.stride, "padding": template.padding, "dilation": template.dilation, "groups": template.groups}
            if isinstance(template, nn.Conv2d) else None
        )
        options: dict[str, Any] = {
            "init_scale": init_scale, "degree": degree, "support": support, "scale_map": scale_map,
            "freeze_affine": freeze_affine,
        }
        self.weight = _family(family, tuple(template.weight.shape), template.weight.detach(), **options)
        self.bias = (
            None if template.bias is None else _family(family, tuple(template.bias.shape), template.bias.detach(), **options)
        )
        self._shapes = [p.shape for p in (template.weight, template.bias) if p is not None]
        self.noise = True
        self._last_log_ratio: Tensor | None = None
        self._ahead = 0  # forwards still to serve from draws made ahead (`draws_ahead`)
        self._ahead_log_ratios = False
        self._drawn: Iterator[tuple[list[Tensor], Tensor | None]] = iter(())

    def __getstate__(self) -> dict[str, Any]:
        """The module's state with the last draw's log ratio detached: it holds the training step's graph, which
        ``copy.deepcopy`` refuses to copy (and a copy has no use for)."""
        state = super().__getstate__()
        if state.get("_last_log_ratio") is not None:
            state["_last_log_ratio"] = state["_last_log_ratio"].detach()
        return state

    def families(self) -> list[FamilyModule]:
        """The weight's family, then the bias's if the layer has one."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def _layer(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self._convolution is None:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, **self._convolution)

    def forward(self, x: Tensor) -> Tensor:
        if not self.noise:
            return self._layer(x, *(self._centre(family, shape) for family, shape in zip(self.families(), self._shapes)))
        if self.local_reparameterization:  # so the families are Gaussian (checked in __init__)
            gaussians = cast(list[GaussianFamilyModule], self.families())
            mean = self._layer(x, *(family.mean for family in gaussians))
            variance = self._layer(x.square(), *(family.scale.square() for family in gaussians))
            # clamped at 1e-16 (a standard deviation of 1e-8), not shifted: a finite gradient where the variance is 0
            # (sparse or deterministic parts), and no added variance that would keep a vanishing posterior from
            # reducing to the deterministic layer
            return mean + variance.clamp_min(1e-16).sqrt() * torch.randn_like(mean)
        if not self._ahead:
            values, self._last_log_ratio = self._draws(1, log_ratio=True)[0]
            return self._layer(x, *values)
        values, log_ratio = self._next_draw()
        if self._ahead_log_ratios:
            self._last_log_ratio = log_ratio
        return self._layer(x, *values)

    def _draws(self, count: int, log_ratio: bool) -> list[tuple[list[Tensor], Tensor | None]]:
        """``count`` draws from one ``sample(count)`` per family: each draw's values (weight, then bias) and, with
        ``log_ratio``, its ``log q - log p`` (the one-draw KL estimate)."""
        samples = [family.sample(count) for family in self.families()]
        if not log_ratio:
            return [([value[index] for value, _ in samples], None) for index in range(count)]
        draws: list[tuple[list[Tensor], Tensor | None]] = []
        for index in range(count):
            values = [value[index] for value, _ in samples]
            terms = [log_q[index].sum() - self._log_prior(v) for v, (_, log_q) in zip(values, samples)]
            draws.append((values, torch.stack(terms).sum()))
        return draws

    def _next_draw(self) -> tuple[list[Tensor], Tensor | None]:
        """The next of the draws made ahead; drawn inside the forward (where a sharded model's parameters are whole),
        up to ``DRAW_AHEAD_ELEMENTS`` weights at a time."""
        draw = next(self._drawn, None)
        if draw is None:
            count = min(self._ahead, max(1, DRAW_AHEAD_ELEMENTS // sum(math.prod(s) for s in self._shapes)))
            self._drawn = iter(self._draws(count, self._ahead_log_ratios))
            draw = next(self._drawn)
        self._ahead -= 1
        return draw

    @staticmethod
    def _centre(family: FamilyModule, shape: torch.Size) -> Tensor:
        """The mean of a Gaussian family (closed-form KL); ``f(0)`` of a flow (base noise zero: the median per weight
        of a mean-field flow, the conditional medians at ``z = 0`` of a joint one)."""
        if hasattr(family, "kl_to_prior"):
            return cast(GaussianFamilyModule, family).mean
        reference = next(family.parameters())
        return family(torch.zeros(shape, dtype=reference.dtype, device=reference.device))[0]

    def _log_prior(self, value: Tensor) -> Tensor:
        return (-0.5 * (value / self.prior_scale).square() - math.log(self.prior_scale) - 0.5 * math.log(2 * math.pi)).sum()

    def kl(self) -> Tensor:
        """``KL(q || p)`` of the layer: closed form (Gaussian) or ``log q - log p`` of the last forward's draw."""
        if hasattr(self.weight, "kl_to_prior"):  # the Gaussian families
            gaussians = cast(list[GaussianFamilyModule], self.families())
            return torch.stack([family.kl_to_prior(self.prior_scale) for family in gaussians]).sum()
        if self._last_log_ratio is None:
            raise RuntimeError("VariationalLayer.kl: run a forward pass first (the KL is estimated from its draw)")
        return self._last_log_ratio


def to_variational(model: nn.Module, params: ParamSelector = "all", **layer_options: Any) -> list[str]:
    """Replace, in place, every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` whose weight ``params`` selects by a
    :class:`VariationalLayer` built from it (``layer_options`` as its arguments); return the replaced names. Nothing
    is replaced when a selected layer cannot be (all such layers are named)."""
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"model is itself a {type(model).__name__}, which cannot be replaced in place; wrap it, e.g. nn.Sequential(model)")
    selected = select_parameters(model, params)
    chosen: list[tuple[str, nn.Linear | nn.Conv2d]] = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and f"{name}.weight" in selected
    ]
    if not chosen:
        raise ValueError(f"params={params!r} selects the weight of no nn.Linear or nn.Conv2d of {type(model).__name__}")
    _refuse_unconvertible(model, chosen, params)
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, VariationalLayer(module, **layer_options).to(module.weight))
    return [name for name, _ in chosen]


def _refuse_unconvertible(
    model: nn.Module, chosen: list[tuple[str, nn.Linear | nn.Conv2d]], params: ParamSelector
) -> None:
    """One error naming every chosen layer that cannot be replaced (the first ``_LISTED``, grouped by type and
    reason) and the ``params`` that leaves them out; a network with several (EfficientNet-Lite0's five
    ``Conv2dSame``) was refused one layer per attempt."""
    found = [(name, type(module).__name__, problem) for name, module in chosen
             if (problem := _unconvertible(model, name, module)) is not None]
    if not found:
        return
    groups: dict[tuple[str, str], list[str]] = {}
    for name, kind, problem in found[:_LISTED]:
        groups.setdefault((kind, problem), []).append(repr(name))
    listed = "; ".join(f"{', '.join(names)} ({kind}: {problem})" for (kind, problem), names in groups.items())
    more = len(found) - _LISTED
    selectors = [params] if isinstance(params, str) else list(params)
    suggestion = selectors + [f"!{name}.*" for name, _, _ in found[:_LISTED]]
    advice = (
        "and none of its layers can be: select others (nn.Linear / nn.Conv2d layers without a forward of their own)"
        if len(found) == len(chosen)
        else f"leave {'them' if len(found) > 1 else 'it'} out of params, e.g. params={suggestion!r}"
        + (f" plus a '!<layer>.*' for each of the {more} more" if more > 0 else "")
    )
    raise ValueError(
        f"params={params!r} selects {len(found)} layer{'s' if len(found) > 1 else ''} that VariationalLayer cannot "
        f"replace: {listed}" + (f"; and {more} more" if more > 0 else "") + f"; {advice}"
    )


def _unconvertible(model: nn.Module, name: str, module: nn.Linear | nn.Conv2d) -> str | None:
    """Why a plain ``F.linear`` / ``F.conv2d`` of the layer's weights is not what it computes, or replacing it would
    break its model, or ``None``: a forward of its own (e.g. timm's ``StdConv2d``, ``Conv2dSame``), padding other
    than zeros, ``nn.MultiheadAttention``'s output projection (whose weight the attention reads itself), or a layer
    used at two places (one replacement would untie them)."""
    plain = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module).forward is not plain.forward:
        return "its class has a forward of its own, which VariationalLayer would replace by a plain " + (
            "linear map" if plain is nn.Linear else "convolution"
        )
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"it pads with padding_mode={module.padding_mode!r}, and VariationalLayer's convolution with zeros"
    places = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
    if len(places) > 1:
        return f"it is one module used at {places}, which converting it would untie"
    parent_name = name.rpartition(".")[0]
    if isinstance(model.get_submodule(parent_name) if parent_name else model, nn.MultiheadAttention):
        return "it is nn.MultiheadAttention's output projection, whose weight the attention reads itself"
    return None


def total_kl(model: nn.Module) -> Tensor:
    """The sum of :meth:`VariationalLayer.kl` over the variational layers of ``model``."""
    layers = [m for m in model.modules() if isinstance(m, VariationalLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no VariationalLayer (convert it with to_variational)")
    return torch.stack([layer.kl() for layer in layers]).sum()


def use_noise(model: nn.Module, enabled: bool) -> None:
    """Draw weights (``enabled``) or use the mean / median weights in every :class:`VariationalLayer` of ``model``."""
    for layer in model.modules():
        if isinstance(layer, VariationalLayer):
            layer.noise = enabled


@contextmanager
def draws_ahead(model: nn.Module, num_samples: int, log_ratios: bool = False) -> Iterator[None]:
    """Within the block, the next ``num_samples`` forwards of every weight-sampling :class:`VariationalLayer` of
    ``model`` (flows, Gaussians without local reparameterisation) take their weights from draws made together,
    ``sample(k)`` once per family for up to ``k`` forwards, instead of ``sample(1)`` per forward: the same
    distribution, for a predictive's ``S`` passes or an ELBO's ``T`` draws (a Bernstein flow's draw costs its
    polynomial's evaluation whatever ``k``). With ``log_ratios`` each forward also sets the layer's one-draw KL
    estimate, as a forward outside the block does (:meth:`VariationalLayer.kl`); without, the KL is left as it was."""
    if not is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
    layers = [
        m for m in model.modules() if isinstance(m, VariationalLayer) and m.noise and not m.local_reparameterization
    ]
    for layer in layers:
        layer._ahead, layer._ahead_log_ratios, layer._drawn = num_samples, log_ratios, iter(())
    try:
        yield
    finally:
        for layer in layers:
            layer._ahead, layer._ahead_log_ratios, layer._drawn = 0, False, iter(())
