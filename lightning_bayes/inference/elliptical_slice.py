"""Elliptical slice sampling (ESS) for a Gaussian prior ``N(0, sigma_p^2 I)`` and any log-likelihood ``L``.

One step from ``z``: draw ``nu ~ N(0, sigma_p^2 I)``, the slice threshold ``h = L(z) + log u``
(``u ~ U(0, 1)``), an angle ``phi ~ U(0, 2 pi)`` with the bracket ``[phi - 2 pi, phi]``; propose
``z cos phi + nu sin phi``; accept when ``L > h``, else shrink the bracket towards 0 at ``phi`` and draw
``phi`` again inside it. The chain leaves ``p(z) ∝ exp(L(z)) N(z; 0, sigma_p^2 I)`` invariant and needs
no step size. Reference: Murray, Adams & MacKay, "Elliptical slice sampling", AISTATS 2010, figure 2.

:class:`EllipticalSlice` holds the step as a state machine (``begin``, ``proposal``, ``observe``) in
buffers, for callers that evaluate ``L`` over many batches (a Lightning epoch per proposal) and must
checkpoint mid-step; :func:`elliptical_slice_step` runs one whole step against an oracle ``z -> L(z)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import is_int
from .wide_buffers import WideBuffers


class SliceStep(NamedTuple):
    """The result of one ESS step: the new point, its log-likelihood, the slice threshold it cleared and the
    number of log-likelihood evaluations spent."""

    z: Tensor
    log_likelihood: float
    threshold: float
    evaluations: int


class EllipticalSlice(WideBuffers):
    """One elliptical slice step at a time, its whole state in buffers (so a checkpoint resumes mid-step).

    Args:
        dim: dimension ``k`` of ``z``.
        prior_scale: ``sigma_p`` of the prior ``N(0, sigma_p^2 I)``.
        dtype: dtype of the chain's buffers ``z`` and ``nu``.
    """

    # buffers (register_buffer), typed for readers and checkers
    z: Tensor
    log_likelihood: Tensor
    nu: Tensor
    threshold: Tensor
    angle: Tensor
    lower: Tensor
    upper: Tensor
    evaluations: Tensor

    def __init__(self, dim: int, prior_scale: float = 1.0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if not is_int(dim) or dim < 1:
            raise ValueError(f"dim must be a positive int; got {dim!r}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be > 0; got {prior_scale!r}")
        self.prior_scale = float(prior_scale)
        self.register_buffer("z", torch.zeros(dim, dtype=dtype))
        self.register_buffer("log_likelihood", torch.tensor(-math.inf, dtype=torch.float64))
        self.register_buffer("nu", torch.zeros(dim, dtype=dtype))
        self.register_buffer("threshold", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("angle", torch.zeros((), dtype=torch.float64))
        self.register_buffer("lower", torch.zeros((), dtype=torch.float64))
        self.register_buffer("upper", torch.zeros((), dtype=torch.float64))
        self.register_buffer("evaluations", torch.zeros((), dtype=torch.long))

    def reset(self, z: Tensor, log_likelihood: float) -> None:
        """Set the current point and its log-likelihood (the chain's start)."""
        if z.shape != self.z.shape:
            raise ValueError(f"z must have shape {tuple(self.z.shape)}; got {tuple(z.shape)}")
        if not math.isfinite(log_likelihood):
            raise ValueError(f"the start point's log-likelihood must be finite; got {log_likelihood}")
        self.z.copy_(z)
        self.log_likelihood.fill_(log_likelihood)

    def _uniform(self, generator: torch.Generator | None) -> float:
        return float(torch.rand((), dtype=torch.float64, generator=generator))

    def begin(self, generator: torch.Generator | None = None) -> Tensor:
        """Start a step from the current point: draw ``nu``, ``h`` and the first angle; return the proposal."""
        if not math.isfinite(float(self.log_likelihood)):
            raise ValueError("EllipticalSlice.begin: call reset(z, log_likelihood) with a finite value first")
        draw = torch.randn(self.z.shape, dtype=self.z.dtype, generator=generator)
        self.nu.copy_(self.prior_scale * draw)
        self.threshold.fill_(float(self.log_likelihood) + math.log(self._uniform(generator)))
        angle = 2 * math.pi * self._uniform(generator)
        self.angle.fill_(angle)
        self.lower.fill_(angle - 2 * math.pi)
        self.upper.fill_(angle)
        self.evaluations.zero_()
        return self.proposal()

    def proposal(self) -> Tensor:
        """``z cos phi + nu sin phi`` at the current angle."""
        angle = float(self.angle)
        return self.z * math.cos(angle) + self.nu * math.sin(angle)

    def observe(self, log_likelihood: float, generator: torch.Generator | None = None) -> bool:
        """Judge the current proposal by its log-likelihood: accept (``True``; it becomes the current point)
        or shrink the bracket and draw a new angle (``False``; call ``proposal()`` again)."""
        self.evaluations.add_(1)
        if log_likelihood > float(self.threshold):
            self.z.copy_(self.proposal())
            self.log_likelihood.fill_(log_likelihood)
            return True
        angle = float(self.angle)
        (self.lower if angle < 0 else self.upper).fill_(angle)
        low, high = float(self.lower), float(self.upper)
        self.angle.fill_(low + (high - low) * self._uniform(generator))
        return False


MAX_EVALUATIONS = 10_000
"""Cap on the log-likelihood evaluations of one :func:`elliptical_slice_step`. The bracket holds angle 0 (the
current point, where ``L(z) > h``) and shrinks at every rejection, so for a log-likelihood that is finite and
continuous near ``z`` a step ends long before: the bracket's width falls by half per rejection on average and
reaches the rounding of ``z`` within a few hundred. Reaching the cap means ``L`` is NaN or not repeatable at ``z``."""


def elliptical_slice_step(
    z: Tensor,
    log_likelihood: Callable[[Tensor], float],
    prior_scale: float = 1.0,
    generator: torch.Generator | None = None,
    current: float | None = None,
) -> SliceStep:
    """One ESS step from ``z`` for the oracle ``log_likelihood`` (``current``: ``L(z)`` if already known,
    not counted as an evaluation); raises ``RuntimeError`` after :data:`MAX_EVALUATIONS` rejected proposals."""
    sampler = EllipticalSlice(z.shape[-1], prior_scale, dtype=z.dtype)
    extra = 0
    if current is None:
        current, extra = float(log_likelihood(z)), 1
    sampler.reset(z, current)
    proposal = sampler.begin(generator)
    while not sampler.observe(float(log_likelihood(proposal)), generator):
        if int(sampler.evaluations) >= MAX_EVALUATIONS:
            raise RuntimeError(
                f"elliptical_slice_step: no proposal accepted in {MAX_EVALUATIONS} log-likelihood evaluations; the "
                "bracket shrank to nothing around the current point, whose log-likelihood should clear the slice "
                "threshold (is the log-likelihood NaN, or not the same at z on every call?)"
            )
        proposal = sampler.proposal()
    return SliceStep(sampler.z.clone(), float(sampler.log_likelihood), float(sampler.threshold),
                     int(sampler.evaluations) + extra)
