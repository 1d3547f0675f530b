"""SWAG moments of a sequence of weight vectors: the SWA mean, the diagonal second moment and the last K
deviations, and the SWAG Gaussian they define.

After ``n`` snapshots ``theta_1..theta_n`` (running averages, one update per snapshot)

    theta_bar_n = (n - 1) / n theta_bar_{n-1} + theta_n / n,   m2_n likewise with theta_n^2,
    d_n = theta_n - theta_bar_n   (the mean *after* adding theta_n),

and the last ``K`` deviations are kept as the rows of a ring buffer ``D`` ``[K, P]``. A SWAG sample is

    theta = theta_bar + sqrt(s) (Sigma_diag^{1/2} z_1 + D^T z_2 / sqrt(K - 1)),
    Sigma_diag = clamp(m2 - theta_bar^2, 1e-30),   z_1 ~ N(0, I_P), z_2 ~ N(0, I_K),

with ``s = 0.5`` for SWAG, the diagonal part only for SWAG-diag (``s = 1``) and ``s = 0`` for SWA. ``K`` is the
number of deviations stored so far (at most ``max_rank``). ``D^T D / (K - 1)`` is SWAG's low-rank estimate, not
the sample covariance of the stored snapshots: each row deviates from the running mean at its own snapshot (two
snapshots 0 and 1 give 1/4 where their sample variance is 1/2).
Reference: Maddox, Garipov, Izmailov, Vetrov & Wilson, "A Simple Baseline for Bayesian Uncertainty in
Deep Learning", NeurIPS 2019, section 3 and algorithm 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..checks import is_int
from .wide_buffers import WideBuffers

_MIN_VARIANCE = 1e-30


def learning_rate_factor(progress: float, ratio: float) -> float:
    """SWAG's learning-rate multiplier at ``progress = epoch / swa_start`` with ``ratio = swa_lr / lr_init``: 1 up to
    ``progress`` 0.5, then linear down to ``ratio`` at 0.9, then ``ratio`` (collection runs at ``swa_lr``).
    Maddox et al., NeurIPS 2019, appendix (the released ``schedule``)."""
    if progress <= 0.5:
        return 1.0
    if progress <= 0.9:
        return 1.0 - (1.0 - ratio) * (progress - 0.5) / 0.4
    return ratio


class SWAGMoments(WideBuffers):
    """Running SWAG moments of ``size``-dimensional weight vectors, all state in buffers.

    Buffers: ``count`` (snapshots seen), ``mean`` and ``sq_mean`` ``[P]``, ``deviations`` ``[K, P]`` (a
    ring buffer whose next write is at row ``position``).
    """

    # buffers (register_buffer), typed for readers and checkers
    count: Tensor
    position: Tensor
    mean: Tensor
    sq_mean: Tensor
    deviations: Tensor

    def __init__(self, size: int, max_rank: int = 20, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not is_int(size) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}")
        if not is_int(max_rank) or max_rank < 0:
            raise ValueError(f"max_rank must be an int >= 0 (0: diagonal SWAG only); got {max_rank!r}")
        self.size, self.max_rank = size, max_rank
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(size, dtype=dtype))
        self.register_buffer("sq_mean", torch.zeros(size, dtype=dtype))
        self.register_buffer("deviations", torch.zeros(max_rank, size, dtype=dtype))

    @torch.no_grad()
    def update(self, theta: Tensor) -> None:
        """Add one snapshot ``theta`` ``[P]`` (any device and dtype; stored in the buffers' own)."""
        if theta.shape != (self.size,):
            raise ValueError(f"theta must have shape ({self.size},); got {tuple(theta.shape)}")
        theta = theta.detach().to(self.mean)
        n = float(self.count)
        self.mean.mul_(n / (n + 1)).add_(theta, alpha=1 / (n + 1))
        self.sq_mean.mul_(n / (n + 1)).add_(theta.square(), alpha=1 / (n + 1))
        if self.max_rank > 0:
            self.deviations[int(self.position)] = theta - self.mean
            self.position.fill_((int(self.position) + 1) % self.max_rank)
        self.count.add_(1)

    @property
    def rank(self) -> int:
        """How many deviation rows are stored: ``min(count, K)``."""
        return min(int(self.count), self.max_rank)

    def variance(self) -> Tensor:
        """The diagonal SWAG variance ``clamp(m2 - theta_bar^2, 1e-30)``."""
        return (self.sq_mean - self.mean.square()).clamp_min(_MIN_VARIANCE)

    def deviation_rows(self) -> Tensor:
        """The stored deviations ``[rank, P]``, oldest first."""
        if int(self.count) <= self.max_rank:
            return self.deviations[: self.rank]
        return torch.roll(self.deviations, -int(self.position), dims=0)

    def sample(
        self,
        scale: float = 0.5,
        num_samples: int | None = None,
        diagonal: bool = True,
        low_rank: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """SWAG draws ``theta_bar + sqrt(scale) (diagonal part + low-rank part)``: ``[P]``, or
        ``[num_samples, P]`` when ``num_samples`` is given. ``diagonal=False`` / ``low_rank=False`` drop a part."""
        if int(self.count) == 0:
            raise ValueError("SWAGMoments.sample: no snapshot collected yet (count=0)")
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f"scale must be a number >= 0; got {scale!r}")
        if low_rank and self.rank < 2 and self.max_rank > 0:
            raise ValueError(f"low_rank=True needs at least 2 stored deviations; have rank={self.rank}")
        rows = 1 if num_samples is None else num_samples
        if not is_int(rows) or rows < 1:
            raise ValueError(f"num_samples must be None or a positive int; got {num_samples!r}")
        device = self.mean.device if generator is None else generator.device  # draws follow the generator
        options: dict[str, Any] = {"device": device, "dtype": self.mean.dtype, "generator": generator}
        noise = torch.zeros(rows, self.size, device=self.mean.device, dtype=self.mean.dtype)
        if diagonal:
            noise += self.variance().sqrt() * torch.randn(rows, self.size, **options).to(self.mean.device)
        if low_rank and self.max_rank > 0:
            rank = self.rank
            coefficients = torch.randn(rows, rank, **options).to(self.mean.device)
            noise += coefficients @ self.deviation_rows() / math.sqrt(rank - 1)
        draws = self.mean + math.sqrt(scale) * noise
        return draws[0] if num_samples is None else draws


def default_swag_scale(moments: SWAGMoments) -> float:
    """The reference's ``s``: 0.5 for SWAG (a low-rank part), 1 for SWAG-diag (``max_rank=0``, the diagonal only)."""
    return 1.0 if moments.max_rank == 0 else 0.5


def low_rank_part(moments: SWAGMoments, scale: float, who: str) -> bool:
    """Whether draws at ``scale`` take the low-rank part (2 or more deviations stored); an error naming ``who`` when
    they would need it but one snapshot left a single deviation (every draw would be the SWA mean). Scale 0 (SWA)
    takes no part at all, so any run serves it."""
    if scale > 0 and 0 < moments.rank < 2:
        raise ValueError(
            f"{who} draws SWAG's low-rank part (max_rank={moments.max_rank}), which needs at least 2 snapshots; the "
            "run collected 1 (every draw would be the SWA mean): collect more, use a run with max_rank=0 (diagonal "
            "SWAG), or scale 0 (SWA)"
        )
    return moments.rank >= 2
