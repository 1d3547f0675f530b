"""Null-space (projected) Laplace posterior ``N(theta_hat, alpha^-1 P)``, ``P = I - J^T (J J^T)^+ J``.

Samples are drawn by alternating projections (von Neumann): with ``ker J = cap_b ker J_b``,
``P = lim_t (P_B ... P_1)^t`` where ``P_b v = v - J_b^T (J_b J_b^T)^+ J_b v``. Starting from
``eps_s ~ N(0, I_P)``, every sweep projects each sample onto the kernel of every micro-batch in a fixed
order; after a sweep ``Q`` from ``v_0`` an optional extrapolation (Gearhart & Koshy, 1989)
``t = <v_0, v_0 - Q v_0> / ||v_0 - Q v_0||^2``, ``v = t Q v_0 + (1 - t) v_0`` speeds up convergence.

Since ``E ||eps||^2 - eps^T P eps = tr(I - P) = rank J``, ``r = mean_s(||eps_s||^2 - eps_s^T v_s)``
estimates the rank (variance ``2r/S``, free of the cancellation of ``P - mean eps^T v``).
Prior precision rules: ``"evidence"`` ``alpha = r / ||theta_hat||^2`` (the Laplace-evidence fixed point
when the image directions are fully determined) or ``"reference_code"`` ``alpha = ||theta_hat||^2 / r``.

Reference: Miani, Roy & Hauberg, "Bayes without Underfitting: Fully Correlated Deep Learning Posteriors
via Alternating Projections", AISTATS 2025 (arXiv 2410.16901).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..checks import check_flags, check_seed
from .kernel_projection import DenseSystem, project
from .linalg import GramFactor, gram
from .wide_buffers import WideBuffers

PRECISION_RULES = ("evidence", "reference_code")


class AlternatingProjections(WideBuffers):
    """Samples ``v_s`` of ``N(0, P)`` refined one micro-batch at a time; its state lives in buffers.

    ``noise`` (the draws ``eps``), ``samples`` (the current ``v``), ``sweep_start`` (``v_0`` for the
    extrapolation) and ``sweeps_done`` are persistent buffers, so a checkpoint resumes exactly. The
    per-batch Gram factors are a cache (``theta_hat`` is fixed): recomputed, bit for bit, after a resume.

    Args:
        num_parameters: P.
        num_samples: S.
        seed: seed of the draws ``eps``.
        rtol: eigenvalues of ``J_b J_b^T`` below ``rtol * lambda_max`` count as zero.
        atol: absolute cutoff instead of ``rtol`` (the reference code uses ``1e-3``).
        accelerate: extrapolate at the end of every sweep (``end_sweep(extrapolate=False)`` skips it once).
        cache: keep each micro-batch's Gram factor (float64, ``M_b^2`` numbers per batch) across sweeps.
        dtype: dtype of the samples.
    """

    # buffers (register_buffer), typed for readers and checkers
    noise: Tensor
    samples: Tensor
    sweep_start: Tensor
    sweeps_done: Tensor
    sweep_residual: Tensor

    def __init__(
        self,
        num_parameters: int,
        num_samples: int,
        seed: int = 0,
        rtol: float = 1e-5,
        atol: float | None = None,
        accelerate: bool = True,
        cache: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if num_parameters < 1 or num_samples < 1:
            raise ValueError(f"num_parameters and num_samples must be >= 1; got {num_parameters}, {num_samples}")
        if not 0 < rtol < 1:
            raise ValueError(f"rtol must be in (0, 1); got {rtol}")
        if atol is not None and not 0 < atol < math.inf:
            raise ValueError(f"atol must be None or a finite number > 0; got {atol}")
        check_seed(seed)
        check_flags(accelerate=accelerate, cache=cache)
        self.rtol, self.atol, self.accelerate, self.use_cache = rtol, atol, accelerate, cache
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(num_samples, num_parameters, generator=generator, dtype=torch.float64).to(dtype)
        self.register_buffer("noise", noise)
        self.register_buffer("samples", noise.clone())
        self.register_buffer("sweep_start", noise.clone())
        self.register_buffer("sweeps_done", torch.zeros((), dtype=torch.long))
        # this sweep's sum of ||J_b v|| / ||v|| over the (batch, sample) pairs met before projecting, and their count;
        # not saved: a resumed sweep's mean covers the batches since the resume (a diagnostic)
        self.register_buffer("sweep_residual", torch.zeros(2, dtype=torch.float64), persistent=False)
        self._factors = GramFactorCache()

    def begin_sweep(self) -> None:
        """Keep the samples as the sweep finds them (the extrapolation's start) and clear its residual sum."""
        self.sweep_start.copy_(self.samples)
        self.sweep_residual.zero_()

    def factor(self, jacobian: Tensor, key: int | None = None) -> GramFactor:
        """Pseudo-inverse factor of ``J_b J_b^T``, cached under ``key`` and checked against ``J_b``."""
        # the row norms in J's dtype: another, rescaled or reordered batch changes them; 0.7 ms for LeNet-5's 160 x
        # 44,426 float32 rows, where float64 accumulation (sum and norm) took 60 ms on a CPU
        fingerprint = torch.linalg.vector_norm(jacobian.detach(), dim=1).double().cpu()
        cached = self._factors.get(key) if self.use_cache and key is not None else None
        if cached is not None:
            stored, factor = cached
            if stored.shape == fingerprint.shape and torch.allclose(stored, fingerprint, rtol=1e-6, atol=0.0):
                return factor
            raise RuntimeError(
                f"micro-batch {key} differs from the one seen in an earlier sweep; the sweeps need the same "
                "batches in the same order every epoch (turn off shuffling of the training loader)"
            )
        factor = GramFactor.of(gram(jacobian), rtol=self.rtol, atol=self.atol)
        if self.use_cache and key is not None:
            self._factors.put(key, fingerprint, factor)
        return factor

    def project(self, jacobian: Tensor, key: int | None = None, rows: slice = slice(None)) -> None:
        """Project the samples ``rows`` (all by default) onto ``ker J_b`` for one micro-batch's dense Jacobian
        ``[M_b, P]``; each sample's projection is independent of the others'."""
        system = DenseSystem(jacobian, factor=self.factor(jacobian, key))
        samples = self.samples[rows]
        constraint = system.apply(samples)
        if len(samples):
            ratio = torch.linalg.vector_norm(constraint, dim=-1) / torch.linalg.vector_norm(samples, dim=-1)
            self.sweep_residual += torch.stack([ratio.double().sum(), torch.tensor(len(ratio), dtype=torch.float64)])
        self.samples[rows] = project(system, samples, constraint)[0]

    def mean_sweep_residual(self) -> float:
        """The mean over this sweep's micro-batches and samples of ``||J_b v|| / ||v||`` as the samples reached
        them (before their projection): zero once the samples lie in the kernel of every training batch."""
        total, count = self.sweep_residual.tolist()
        return total / count if count else float("nan")

    def end_sweep(self, extrapolate: bool = True) -> None:
        """Extrapolate along ``v_0 -> Q v_0`` (if ``accelerate`` and ``extrapolate``) and count the sweep.

        ``t`` is the exact line search towards ``P v_0`` (``v_0 - Q v_0`` is orthogonal to ``ker J``); it is
        skipped (``t = 1``) once the sweep's step is too small for ``t`` to be computed accurately. The step
        overshoots along the row space (it mixes ``v_0`` back in), so the last sweep before the samples are
        used should not extrapolate: on the digits MLP, 9 sweeps left ``||J v|| / ||v||`` on the training
        batches at 0.39 with every sweep extrapolated, 0.14 with the ninth plain (0.17 with none extrapolated).
        """
        if self.accelerate and extrapolate:
            start, end = self.sweep_start.double(), self.samples.double()
            step = start - end
            step_norm = step.square().sum(-1)
            # <v_0, d> carries a rounding error ~ u ||v_0||^2, so t is reliable only while ||d||^2 >> u ||v_0||^2
            reliable = step_norm > 100 * torch.finfo(self.samples.dtype).eps * start.square().sum(-1)
            t = torch.where(reliable, (start * step).sum(-1) / step_norm.clamp_min(1e-300), torch.ones_like(step_norm))
            self.samples.copy_((t[:, None] * end + (1 - t[:, None]) * start).to(self.samples.dtype))
        self.sweeps_done += 1

    def rank_estimate(self) -> Tensor:
        """``r = mean_s(||eps_s||^2 - eps_s^T v_s)``, unbiased for ``rank J`` once ``v_s = P eps_s``."""
        eps, v = self.noise.double(), self.samples.double()
        return (eps.square().sum(-1) - (eps * v).sum(-1)).mean()

    def residual(self, jacobian: Tensor | Callable[[Tensor], Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """``||J v_s|| / ||v_s||`` per sample: zero once the samples lie in ``ker J``. ``jacobian``: the dense ``J``
        or ``v -> J v`` for vectors ``[S, P]`` in ``dtype`` (e.g. forward-mode products, no ``M x P`` matrix)."""
        if isinstance(jacobian, Tensor):
            dense = jacobian
            dtype, jacobian = dense.dtype, lambda vectors: vectors @ dense.T
        v = self.samples.to(dtype)
        return torch.linalg.vector_norm(jacobian(v), dim=-1) / torch.linalg.vector_norm(v, dim=-1)


def prior_precision(rule: str | float, rank: Tensor | float, theta_hat: Tensor) -> float:
    """``alpha`` from a rule (``"evidence"``: ``r/||theta||^2``; ``"reference_code"``: ``||theta||^2/r``) or as given."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if not 0 < rule < math.inf:
            raise ValueError(f"alpha must be a finite number > 0 or one of {PRECISION_RULES}; got {rule}")
        return float(rule)
    if rule not in PRECISION_RULES:
        raise ValueError(f"alpha must be a positive number or one of {PRECISION_RULES}; got {rule!r}")
    r = float(rank)
    norm2 = float(theta_hat.double().square().sum())
    if r <= 0 or norm2 <= 0:
        raise ValueError(f"alpha={rule!r} needs a positive rank estimate and ||theta_hat||; got rank {r:.3g}, norm^2 {norm2:.3g}")
    return r / norm2 if rule == "evidence" else norm2 / r


def largest_scale(
    nll_at: Callable[[float], float],
    tolerance: float = 0.01,
    start: float = 1.0,
    steps: int = 12,
    refinements: int = 4,
) -> float:
    """Largest sample scale ``c`` with ``nll(c) <= nll(0) + tolerance |nll(0)|``: doubling/halving from ``start``
    (at most ``steps`` times), then ``refinements`` bisections in log space. ``nll_at(c)`` is the training NLL
    of the predictive whose samples are ``theta_hat + c (theta_s - theta_hat)``; 0 if no tried scale passes."""
    if not 0 < tolerance < math.inf:
        raise ValueError(f"tolerance must be a finite number > 0; got {tolerance}")
    reference = nll_at(0.0)
    bound = reference + tolerance * abs(reference)  # a Gaussian's NLL may be negative

    def ok(c: float) -> bool:
        value = nll_at(c)
        return math.isfinite(value) and value <= bound

    low, high = (start, None) if ok(start) else (None, start)
    for _ in range(steps):
        if low is None and high is not None:
            c = high / 2
            low, high = (c, high) if ok(c) else (None, c)
        elif high is None and low is not None:
            c = low * 2
            low, high = (c, None) if ok(c) else (low, c)
        else:
            break
    if low is None:
        return 0.0  # even start / 2**steps raises the NLL too much: no spread
    if high is None:
        return low
    for _ in range(refinements):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low


class GramFactorCache:
    """Gram factors ``(V_b, lambda_b^+)`` by micro-batch key, copied into large preallocated float64 blocks.

    Thousands of small long-lived tensors allocated between the large transient Jacobians fragment the
    C heap (resident memory then grows by the Jacobian's size per batch); blocks of at least 64 MB are
    mapped separately by the allocator and keep the cache at its nominal ``N/B * M_b^2`` numbers.
    """

    BLOCK_BYTES = 1 << 26

    def __init__(self) -> None:
        self._vectors: list[Tensor] = []
        self._inverses: list[Tensor] = []
        self._free = 0  # next free slot in the last block
        self._entries: dict[int, tuple[int, int, int, Tensor]] = {}  # key -> (block, slot, rows, fingerprint)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: int) -> tuple[Tensor, GramFactor] | None:
        """The fingerprint and factor kept under ``key``, or ``None``."""
        if key not in self._entries:
            return None
        block, slot, rows, fingerprint = self._entries[key]
        vectors = self._vectors[block][slot, :rows, :rows]
        return fingerprint, GramFactor(vectors, self._inverses[block][slot, :rows])

    def put(self, key: int, fingerprint: Tensor, factor: GramFactor) -> None:
        rows = factor.eigenvectors.shape[0]
        if not self._vectors or self._free == len(self._vectors[-1]) or rows > self._vectors[-1].shape[1]:
            slots = max(1, self.BLOCK_BYTES // (8 * rows * rows))
            device = factor.eigenvectors.device
            self._vectors.append(torch.empty(slots, rows, rows, dtype=torch.float64, device=device))
            self._inverses.append(torch.empty(slots, rows, dtype=torch.float64, device=device))
            self._free = 0
        block, slot = len(self._vectors) - 1, self._free
        self._vectors[block][slot, :rows, :rows] = factor.eigenvectors
        self._inverses[block][slot, :rows] = factor.inverse_eigenvalues
        self._entries[key] = (block, slot, rows, fingerprint)
        self._free += 1
