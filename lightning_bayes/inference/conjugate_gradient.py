"""Conjugate gradients with full reorthogonalisation, a fixed number of steps and no host synchronisation.

Solves ``G lam = r`` for a symmetric positive semi-definite ``G`` given only ``p -> G p``, for a stack of
right-hand sides at once (every row its own system). Each step

    q = G p,  a = rho^T rho / p^T q,  lam += a p,  rho -= a q,
    rho <- rho - Q (Q^T rho)  (twice, classical Gram-Schmidt against the normalised earlier residuals Q),
    b = rho_new^T rho_new / rho_old^T rho_old,  p = rho + b p,

runs exactly ``iterations`` times: no data-dependent exit and no ``.item()``, a converged system is frozen
by ``torch.where`` masks instead (relative residual below ``tolerance``). Reorthogonalisation restores the
exact-arithmetic property that the residuals are mutually orthogonal, so after ``j`` steps ``lam`` is the
``G``-norm minimiser of the error over the Krylov space ``K_j(G, r)``; for a consistent rank-deficient
system every iterate stays in ``range(G)`` (the minimum-norm solution). Vectors are kept in float64.

Reference: Hestenes & Stiefel (1952); Golub & Van Loan, *Matrix Computations*, 4th ed., section 11.3;
the reorthogonalised variant is the default solver of VIKING (Fadel et al., NeurIPS 2025).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..checks import is_int

MatVec = Callable[[Tensor], Tensor]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def conjugate_gradient(matvec: MatVec, rhs: Tensor, iterations: int = 10, tolerance: float = 1e-14) -> Tensor:
    """Approximate solutions ``lam`` of ``G lam = rhs`` for ``rhs`` of shape ``[S, M]`` (float64).

    Args:
        matvec: ``[S, M] -> [S, M]``, row ``s`` mapped to ``G p_s``; called exactly ``iterations`` times.
        rhs: right-hand sides, one per row.
        iterations: fixed number of steps (``M`` steps solve an ``M x M`` system up to rounding).
        tolerance: a row whose residual norm falls below ``tolerance * ||rhs||`` stops changing.
    """
    if rhs.ndim != 2:
        raise ValueError(f"rhs must have shape [S, M]; got {tuple(rhs.shape)}")
    if not is_int(iterations) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1; got {iterations!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1); got {tolerance}")
    r = rhs.double()
    floor = (tolerance**2) * _dot(r, r)
    solution = torch.zeros_like(r)
    residual, direction = r.clone(), r.clone()
    rr = _dot(residual, residual)
    basis = [_normalised(residual, rr)]
    for _ in range(iterations):
        active = rr > floor
        q = matvec(direction).double()
        pq = _dot(direction, q)
        step = torch.where(active & (pq > 0), rr / torch.where(pq > 0, pq, 1.0), 0.0)
        solution = solution + step[:, None] * direction
        residual = residual - step[:, None] * q
        stacked = torch.stack(basis, dim=1)  # [S, j, M], orthonormal rows per system
        for _ in range(2):
            residual = residual - torch.einsum("sj,sjm->sm", torch.einsum("sjm,sm->sj", stacked, residual), stacked)
        rr_new = _dot(residual, residual)
        beta = torch.where(active & (rr > 0), rr_new / torch.where(rr > 0, rr, 1.0), 0.0)
        direction = torch.where(active[:, None], residual + beta[:, None] * direction, direction)
        rr = torch.where(active, rr_new, rr)
        basis.append(torch.where(active[:, None], _normalised(residual, rr_new), 0.0))
    return solution


def _normalised(vectors: Tensor, squared_norms: Tensor) -> Tensor:
    norms = squared_norms.sqrt()
    return torch.where(norms[:, None] > 0, vectors / torch.where(norms > 0, norms, 1.0)[:, None], 0.0)
