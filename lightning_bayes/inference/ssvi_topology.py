"""SSVI support updates: initial masks, the drop-and-grow schedule, one tensor's update, and optimiser-state masking.

Every ``update_every`` (``Delta T``) iterations ``t`` with ``t < T_end``, each sparse tensor

1. drops the ``n = round(alpha_t n_active)`` active weights of lowest removal score
   (:func:`~lightning_bayes.inference.ssvi_scores.removal_score`), ``alpha_t = (alpha / 2)(1 + cos(pi t / T_end))``;
2. grows the ``n`` weights, inactive before the update, of largest dense gradient ``|dL/dw|`` (so the dropped and
   the grown sets are disjoint and ``nnz`` is unchanged), with ``mu = 0`` and ``rho`` the mean ``rho`` of the kept
   weights (``"mean"``) or ``softplus^-1(1e-6)`` (``"eps"``).

Iterations count from 1, as in the reference (``t % Delta T == 0`` and ``t < T_end``). Reference: Li, Miao, Qiu &
Zhang, ICLR 2024 (arXiv 2402.11025), Algorithm 1; growth by gradient as in RigL (Evci et al., ICML 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .sparse_gaussian import SparseGaussian
from .softplus import inverse_softplus, inverse_softplus_value
from .ssvi_scores import Score, removal_score

GrowRho = Literal["mean", "eps"]
GROW_RHO = ("mean", "eps")
MeanInit = Literal["normal", "backbone"]
MEAN_INITS = ("normal", "backbone")
EPS_RHO = inverse_softplus_value(1e-6)
INIT_MEAN_STD = 0.01
INIT_SCALE_MEAN, INIT_SCALE_STD = 1e-3, 5e-4


def drop_fraction(iteration: int, end: int, alpha: float) -> float:
    """``alpha_t = (alpha / 2)(1 + cos(pi t / T_end))`` (0 from ``T_end`` on: the support is frozen)."""
    if iteration >= end:
        return 0.0
    return 0.5 * alpha * (1.0 + math.cos(math.pi * iteration / end))


def is_update_iteration(iteration: int, every: int, end: int) -> bool:
    """Whether iteration ``t`` (counted from 1) updates the support: ``t % Delta T == 0`` and ``t < T_end``."""
    return iteration > 0 and iteration % every == 0 and iteration < end


@torch.no_grad()
def initialise_support(
    family: SparseGaussian, density: float, generator: torch.Generator, mean_init: MeanInit = "normal"
) -> None:
    """Draw a uniformly random support of exactly ``round(density n)`` entries and ``sigma ~ |N(1e-3, (5e-4)^2)|``
    (stored as ``rho = softplus^-1(sigma)``) on it, zeros off it. ``mean_init``: ``"normal"``, ``mu ~ N(0, 0.01^2)``
    (the reference, for networks with BatchNorm); ``"backbone"``, the family's current means (the backbone's
    initial weights) times ``1 / sqrt(density)``, which keeps the dense initialisation's activation scale with a
    ``density`` fraction of the fan-in (sparse-aware scaling, Evci et al., AAAI 2022)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1]; got {density!r}")
    if mean_init not in MEAN_INITS:
        raise ValueError(f"mean_init must be one of {MEAN_INITS}; got {mean_init!r}")
    size = family.mask.numel()
    active = round(density * size)
    if active < 1:
        raise ValueError(f"density={density} leaves no active entry of a tensor of {size}; expected density * size >= 0.5")
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.randperm(size, generator=generator)[:active]] = True
    mask = mask.view_as(family.mask).to(family.mask.device)
    dtype, shape = family.loc.dtype, family.loc.shape
    normal = INIT_MEAN_STD * torch.randn(shape, generator=generator, dtype=dtype)
    loc = normal if mean_init == "normal" else family.loc.detach().cpu() / math.sqrt(density)
    scale = (INIT_SCALE_MEAN + INIT_SCALE_STD * torch.randn(shape, generator=generator, dtype=dtype)).abs()
    family.mask.copy_(mask)
    family.loc.copy_(loc * mask.to(loc))
    family.raw_scale.copy_(inverse_softplus(scale) * mask.to(scale))


@dataclass(frozen=True)
class TopologyChange:
    """Flat indices of the weights one update dropped and grew (disjoint, of equal length)."""

    dropped: Tensor
    grown: Tensor


@torch.no_grad()
def update_support(
    family: SparseGaussian, dense_gradient: Tensor, fraction: float, score: Score = "snr_mean_abs", grow_rho: GrowRho = "mean"
) -> TopologyChange:
    """Drop ``round(fraction n_active)`` active weights of ``family`` by lowest ``score`` and grow as many inactive
    ones by largest ``|dense_gradient|``, re-initialised by ``grow_rho`` (``"mean"``: the mean raw scale of the weights
    kept, or of those active before the drop when it keeps none); dropped entries are zeroed."""
    if dense_gradient.shape != family.mask.shape:
        raise ValueError(f"dense_gradient must have shape {tuple(family.mask.shape)}; got {tuple(dense_gradient.shape)}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction!r}")
    if grow_rho not in GROW_RHO:
        raise ValueError(f"grow_rho must be one of {GROW_RHO}; got {grow_rho!r}")
    mask = family.mask.view(-1)
    active = int(mask.sum())
    count = min(round(fraction * active), mask.numel() - active)
    keep_score = removal_score(family.mean, family.scale, score).view(-1)
    dropped = torch.topk(keep_score.masked_fill(~mask, math.inf), count, largest=False).indices
    growth = dense_gradient.detach().abs().view(-1).double()
    grown = torch.topk(growth.masked_fill(mask, -math.inf), count).indices
    loc, raw_scale = family.loc.view(-1), family.raw_scale.view(-1)
    before = mask.clone()
    mask[dropped] = False
    kept = mask if mask.any() else before  # every active weight dropped: the mean over them before the drop
    new_rho = raw_scale[kept].mean() if grow_rho == "mean" else torch.tensor(EPS_RHO)
    mask[grown] = True
    loc[dropped], raw_scale[dropped] = 0.0, 0.0
    loc[grown], raw_scale[grown] = 0.0, new_rho.to(raw_scale)
    return TopologyChange(dropped, grown)


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, parameter: Tensor, mask: Tensor) -> None:
    """Zero every per-parameter optimiser state tensor of ``parameter``'s shape (momentum, Adam's moments) off ``mask``."""
    for value in optimizer.state.get(parameter, {}).values():
        if isinstance(value, Tensor) and value.shape == parameter.shape:
            value.mul_(mask)
