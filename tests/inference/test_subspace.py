"""Subspaces w(z) = w_hat + P^T z: the PCA basis against a dense eigendecomposition and planted directions,
random and curve bases against their definitions, and the variational Gaussian's KL against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_bayes.inference.subspace import (
    DiagonalGaussian,
    Subspace,
    curve_subspace,
    pca_subspace,
    random_subspace,
)
from lightning_bayes.inference.swag import SWAGMoments

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pca_basis_reproduces_the_rank_k_swag_covariance() -> None:
    """P^T P equals the best rank-k approximation of D^T D / (K - 1) (dense eigendecomposition)."""
    generator = torch.Generator().manual_seed(0)
    deviations = torch.randn(8, 30, dtype=torch.float64, generator=generator)
    subspace = pca_subspace(deviations, torch.zeros(30, dtype=torch.float64), k=3)
    values, vectors = torch.linalg.eigh(deviations.T @ deviations / 7)
    top = vectors[:, -3:]
    torch.testing.assert_close(subspace.basis.T @ subspace.basis, top @ torch.diag(values[-3:]) @ top.T, rtol=0, atol=1e-12)
    assert subspace.dim == 3


def test_pca_recovers_planted_directions_and_variances() -> None:
    """Iterates theta_n = mu + sum_j sqrt(lambda_j) a_nj u_j + small isotropic noise: the SWAG deviations'
    top-3 PCA rows span the planted u_j (largest principal angle < 5 degrees) with s_j^2 within 10% of lambda_j
    (2000 deviations: a variance estimate's relative standard error is sqrt(2/2000) = 3%)."""
    generator = torch.Generator().manual_seed(1)
    size, n = 40, 2000
    planted, _ = torch.linalg.qr(torch.randn(size, 3, dtype=torch.float64, generator=generator))
    variances = torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64)
    coefficients = torch.randn(n, 3, dtype=torch.float64, generator=generator) * variances.sqrt()
    noise = 0.01 * torch.randn(n, size, dtype=torch.float64, generator=generator)
    thetas = 5.0 + coefficients @ planted.T + noise
    moments = SWAGMoments(size, max_rank=n, dtype=torch.float64)
    for theta in thetas:
        moments.update(theta)
    subspace = pca_subspace(moments.deviation_rows(), moments.mean, k=3)
    found, _ = torch.linalg.qr(subspace.basis.T)
    cosines = torch.linalg.svdvals(planted.T @ found)
    assert math.degrees(math.acos(float(cosines.min().clamp(max=1.0)))) < 5.0
    squared = subspace.basis.norm(dim=1).square()
    torch.testing.assert_close(squared, variances, rtol=0.10, atol=0)


def test_random_rows_are_orthogonal_and_of_the_target_norm() -> None:
    subspace = random_subspace(torch.zeros(50, dtype=torch.float64), k=4, norm=2.5,
                               generator=torch.Generator().manual_seed(2))
    gram = subspace.basis @ subspace.basis.T
    torch.testing.assert_close(gram, 2.5**2 * torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)


def test_curve_plane_holds_its_three_points_with_u_perpendicular_to_v() -> None:
    generator = torch.Generator().manual_seed(3)
    w0, w_half, w2 = torch.randn(3, 20, dtype=torch.float64, generator=generator)
    subspace = curve_subspace(w0, w_half, w2)
    points = torch.stack([w0, w_half, w2])
    z = subspace.coordinates(points)
    torch.testing.assert_close(subspace(z), points, rtol=0, atol=1e-12)  # zero residual: they lie in the plane
    u, v = subspace.basis
    assert abs(float(u @ v)) < 1e-12 * float(u.norm() * v.norm())
    torch.testing.assert_close(u, (w2 - w0) / math.sqrt(3.0), rtol=0, atol=0)
    torch.testing.assert_close(z[:, 1], torch.tensor([-0.5, 1.0, -0.5], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(subspace.shift, points.mean(0), rtol=0, atol=1e-15)


def test_subspace_maps_batches_of_coordinates() -> None:
    shift, basis = torch.arange(3.0), torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    subspace = Subspace(shift, basis)
    z = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    torch.testing.assert_close(subspace(z), torch.tensor([[1.0, 3.0, 4.0], [0.0, 0.0, 2.0]]))
    with pytest.raises(ValueError, match="z must end in the subspace dimension 2"):
        subspace(torch.zeros(3))


def test_diagonal_gaussian_kl_is_the_closed_form() -> None:
    q = DiagonalGaussian(3, init_scale=0.7)
    torch.testing.assert_close(q.sigma, torch.full((3,), 0.7, dtype=torch.float64), rtol=0, atol=1e-12)
    with torch.no_grad():
        q.mu.copy_(torch.tensor([0.5, -1.0, 2.0]))
    sigma, mu, prior = q.sigma, q.mu, 2.0
    expected = (torch.log(prior / sigma) + (sigma**2 + mu**2) / (2 * prior**2) - 0.5).sum()
    torch.testing.assert_close(q.kl(prior), expected, rtol=0, atol=1e-12)
    noise = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(q.reparameterize(noise), mu + sigma * noise)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pca_subspace(torch.zeros(4, 5), torch.zeros(5), k=4), r"k must be an int in \[1, K - 1\] = \[1, 3\]"),
        (lambda: pca_subspace(torch.zeros(4, 6), torch.zeros(5), k=1), r"deviations must be \[K, P\] with P=5"),
        (lambda: random_subspace(torch.zeros(5), k=2, norm=0.0), "norm must be > 0"),
        (lambda: curve_subspace(torch.zeros(3), torch.ones(3), torch.zeros(3)), "w0 and w2 coincide"),
        (lambda: curve_subspace(torch.zeros(3), torch.ones(3), 2 * torch.ones(3)), "lies on the line"),
        (lambda: Subspace(torch.zeros(3), torch.zeros(2, 4)), r"shift must be \[P\] and basis \[k, P\]"),
        (lambda: DiagonalGaussian(0), "dim must be a positive int"),
    ],
)
def test_bad_input_is_named(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()
