"""Affine subspaces of weight space, ``w(z) = w_hat + P^T z`` with ``z in R^k``, for subspace inference.

* PCA: ``w_hat`` the SWA mean, rows of ``P`` the top-``k`` principal directions of the SWAG deviations
  scaled by their singular values, so ``z ~ N(0, I)`` reproduces the rank-``k`` SWAG covariance.
* Random: orthogonal Gaussian directions, each rescaled to a given norm.
* Curve: the plane through three points of a mode-connecting curve (``w_0``, ``w_1/2``, ``w_2``).

Reference: Izmailov, Maddox, Kirichenko, Garipov, Vetrov & Wilson, "Subspace Inference for Bayesian
Deep Learning", UAI 2019, section 4.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..checks import is_finite, is_int
from .softplus import inverse_softplus_value


class Subspace(nn.Module):
    """``w(z) = shift + z @ basis`` with ``shift`` ``[P]`` and ``basis`` ``[k, P]`` as buffers."""

    # buffers (register_buffer), typed for readers and checkers
    shift: Tensor
    basis: Tensor

    def __init__(self, shift: Tensor, basis: Tensor) -> None:
        super().__init__()
        if shift.ndim != 1 or basis.ndim != 2 or basis.shape[1] != shift.shape[0] or basis.shape[0] < 1:
            raise ValueError(
                f"shift must be [P] and basis [k, P] with k >= 1; got {tuple(shift.shape)} and {tuple(basis.shape)}"
            )
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("basis", basis.detach().to(shift.dtype).clone())

    @property
    def dim(self) -> int:
        """``k``, the number of coordinates."""
        return self.basis.shape[0]

    def forward(self, z: Tensor) -> Tensor:
        """``w(z)`` for ``z`` ``[k]`` or ``[S, k]``."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"z must end in the subspace dimension {self.dim}; got shape {tuple(z.shape)}")
        return self.shift + z.to(self.basis.dtype) @ self.basis

    def coordinates(self, w: Tensor) -> Tensor:
        """The least-squares ``z`` with ``w(z)`` nearest to ``w`` ``[P]`` or ``[S, P]``."""
        solution = torch.linalg.lstsq(self.basis.T, (w - self.shift).reshape(-1, self.shift.shape[0]).T).solution
        return solution.T.reshape(*w.shape[:-1], self.dim)


def pca_subspace(deviations: Tensor, shift: Tensor, k: int) -> Subspace:
    """The top-``k`` principal directions of the deviation rows ``D`` ``[K, P]``: with
    ``D / sqrt(K - 1) = U S V^T``, the basis rows are ``s_j v_j^T`` (``j <= k``), so ``z ~ N(0, I_k)`` has
    weight covariance equal to the best rank-``k`` approximation of ``D^T D / (K - 1)``.
    ``torch.linalg.svd`` of the ``K x P`` matrix costs ``O(K^2 P)``: exact, and cheap for K of a few dozen."""
    if deviations.ndim != 2 or deviations.shape[1] != shift.shape[-1]:
        raise ValueError(f"deviations must be [K, P] with P={shift.shape[-1]}; got {tuple(deviations.shape)}")
    rows = deviations.shape[0]
    if not is_int(k) or not 1 <= k <= rows - 1:
        raise ValueError(
            f"the subspace's rank k must be an int in [1, K - 1] = [1, {rows - 1}] for K={rows} deviations; got {k!r}"
        )
    _, singular_values, right = torch.linalg.svd(deviations / math.sqrt(rows - 1), full_matrices=False)
    return Subspace(shift, singular_values[:k, None] * right[:k])


def random_subspace(shift: Tensor, k: int, norm: float, generator: torch.Generator | None = None) -> Subspace:
    """``k`` orthogonal directions (QR of a Gaussian ``P x k`` matrix), each of Euclidean length ``norm``.
    The paper rescales them to the mean norm of the first PCA rows so that both priors have the same reach."""
    size = shift.shape[-1]
    if not is_int(k) or not 1 <= k <= size:
        raise ValueError(f"the subspace's rank k must be an int in [1, P={size}]; got {k!r}")
    if not norm > 0:
        raise ValueError(f"norm must be > 0; got {norm!r}")
    gaussian = torch.randn(size, k, generator=generator, dtype=shift.dtype, device=shift.device)
    orthonormal, _ = torch.linalg.qr(gaussian)
    return Subspace(shift, norm * orthonormal.T)


def curve_subspace(w0: Tensor, w_half: Tensor, w2: Tensor) -> Subspace:
    """The plane through ``w0``, ``w_half`` and ``w2`` (the ends and midpoint of a curve between two modes):
    ``w_hat`` their mean, ``u = (w2 - w0) / sqrt(3)``, ``v = ((w_half - w0) perp u) / 1.5``, so the three
    points sit at coordinates of order one (``v``-coordinates ``-1/2, 1, -1/2``)."""
    if not (w0.shape == w_half.shape == w2.shape) or w0.ndim != 1:
        raise ValueError(
            f"w0, w_half, w2 must be vectors [P] of one shape; got {tuple(w0.shape)}, {tuple(w_half.shape)}, "
            f"{tuple(w2.shape)}"
        )
    chord = w2 - w0
    if not chord.norm() > 0:
        raise ValueError("curve_subspace: w0 and w2 coincide; expected two distinct end points")
    bend = w_half - w0
    across = bend - (bend @ chord) / (chord @ chord) * chord
    if not across.norm() > 1e-12 * bend.norm().clamp_min(1e-300):
        raise ValueError("curve_subspace: w_half lies on the line through w0 and w2; expected a bent curve")
    shift = (w0 + w_half + w2) / 3
    return Subspace(shift, torch.stack([chord / math.sqrt(3.0), across / 1.5]))


class DiagonalGaussian(nn.Module):
    """``q(z) = N(mu, diag sigma^2)`` on subspace coordinates, ``sigma = softplus(rho) + 1e-6``, for variational
    inference in a subspace (Izmailov et al. 2019, section 4.2); starts at ``mu = 0``, ``sigma = init_scale``."""

    def __init__(self, dim: int, init_scale: float = 1.0) -> None:
        super().__init__()
        if not is_int(dim) or dim < 1:
            raise ValueError(f"dim must be a positive int; got {dim!r}")
        if not (is_finite(init_scale) and init_scale > 1e-6):
            raise ValueError(f"init_scale must be a finite number > 1e-6; got {init_scale!r}")
        self.mu = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.rho = nn.Parameter(torch.full((dim,), inverse_softplus_value(init_scale - 1e-6), dtype=torch.float64))

    @property
    def sigma(self) -> Tensor:
        return nn.functional.softplus(self.rho) + 1e-6

    def reparameterize(self, noise: Tensor) -> Tensor:
        """``mu + sigma * eps`` for standard normal ``noise`` ``[..., k]`` (differentiable in ``mu``, ``rho``)."""
        return self.mu + self.sigma * noise

    def kl(self, prior_scale: float) -> Tensor:
        """``KL(q || N(0, prior_scale^2 I))`` in closed form."""
        prior = torch.distributions.Normal(torch.zeros_like(self.mu), torch.full_like(self.mu, prior_scale))
        return torch.distributions.kl_divergence(torch.distributions.Normal(self.mu, self.sigma), prior).sum()
