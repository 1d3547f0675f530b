"""SSVI removal scores: how much an active weight ``theta ~ N(mu, sigma^2)`` matters, from ``(mu, sigma)`` alone.

With ``a = |mu| / sigma``, ``phi``/``Phi`` the standard normal density/CDF and ``g(a) = phi(a) - a Phi(-a) >= 0``:

* ``mean``: ``|mu|``;  ``snr``: ``|mu| / sigma``;
* ``e_mean_abs``: the folded-normal mean ``E|theta| = mu erf(mu / (sigma sqrt 2)) + sigma sqrt(2/pi) exp(-mu^2 / (2 sigma^2))
  = |mu| + 2 sigma g(a)``;
* ``snr_mean_abs`` (the default): ``E|theta| / sd|theta|`` with ``Var|theta| = mu^2 + sigma^2 - (E|theta|)^2
  = sigma^2 (1 - 4 a g(a) - 4 g(a)^2)``, the second form free of the cancellation of the first when ``sigma << |mu|``;
* ``e_exp_mean_abs``: ``M(lambda) = E exp(lambda |theta|) = e^{lambda^2 sigma^2 / 2} [e^{lambda mu} Phi(mu/sigma + lambda sigma)
  + e^{-lambda mu} Phi(-mu/sigma + lambda sigma)]``;  ``snr_exp_mean_abs``: ``M(lambda) / sqrt(M(2 lambda) - M(lambda)^2)``.

Scores are computed in float64 and NaN (e.g. ``sigma = 0`` off the mask) becomes 0, as in the reference code.
Reference: Li, Miao, Qiu & Zhang, ICLR 2024 (arXiv 2402.11025), Sec. 4.2.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Score = Literal["mean", "snr", "e_mean_abs", "snr_mean_abs", "e_exp_mean_abs", "snr_exp_mean_abs"]
SCORES = ("mean", "snr", "e_mean_abs", "snr_mean_abs", "e_exp_mean_abs", "snr_exp_mean_abs")


def _folded_gap(ratio: Tensor) -> Tensor:
    """``g(a) = phi(a) - a Phi(-a)`` for ``a = |mu| / sigma``."""
    density = torch.exp(-0.5 * ratio.square()) / math.sqrt(2 * math.pi)
    return density - ratio * torch.special.ndtr(-ratio)


def folded_normal_moments(mean: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(E|theta|, Var|theta|)`` for ``theta ~ N(mean, scale^2)``."""
    ratio = mean.abs() / scale
    gap = _folded_gap(ratio)
    return mean.abs() + 2 * scale * gap, scale.square() * (1 - 4 * ratio * gap - 4 * gap.square())


def exp_abs_moment(mean: Tensor, scale: Tensor, lam: float) -> Tensor:
    """``E exp(lam |theta|)`` for ``theta ~ N(mean, scale^2)``."""
    shift = lam * scale
    return torch.exp(0.5 * shift.square()) * (
        torch.exp(lam * mean) * torch.special.ndtr(mean / scale + shift)
        + torch.exp(-lam * mean) * torch.special.ndtr(-mean / scale + shift)
    )


def removal_score(mean: Tensor, scale: Tensor, score: Score = "snr_mean_abs", lam: float = 1.0) -> Tensor:
    """The removal score ``score`` of every weight (float64, NaN replaced by 0); larger means keep."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    if mean.shape != scale.shape:
        raise ValueError(f"mean and scale must have one shape; got {tuple(mean.shape)} and {tuple(scale.shape)}")
    mean, scale = mean.detach().double(), scale.detach().double()
    if score == "mean":
        values = mean.abs()
    elif score == "snr":
        values = mean.abs() / scale
    elif score in ("e_mean_abs", "snr_mean_abs"):
        first, variance = folded_normal_moments(mean, scale)
        values = first if score == "e_mean_abs" else first / variance.sqrt()
    else:
        first = exp_abs_moment(mean, scale, lam)
        values = first if score == "e_exp_mean_abs" else first / (exp_abs_moment(mean, scale, 2 * lam) - first.square()).sqrt()
    return torch.nan_to_num(values, nan=0.0)
