"""SWAGMoments against closed forms: running moments and deviations of a known sequence of iterates (numpy,
1e-12), the ring buffer, and the covariance of the draws by chi-square tests on quadratic forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_bayes.inference.swag import SWAGMoments

pytestmark = pytest.mark.usefixtures("single_thread")


def iterates(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size)) * rng.uniform(0.5, 2.0, size=size) + rng.normal(size=size)


def collected(thetas: np.ndarray, max_rank: int) -> SWAGMoments:
    moments = SWAGMoments(thetas.shape[1], max_rank, dtype=torch.float64)
    for theta in thetas:
        moments.update(torch.from_numpy(theta))
    return moments


def test_moments_and_deviations_equal_the_closed_form_of_a_known_sequence() -> None:
    thetas = iterates(13, 7)
    moments = collected(thetas, max_rank=5)
    np.testing.assert_allclose(moments.mean.numpy(), thetas.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(moments.sq_mean.numpy(), (thetas**2).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(moments.variance().numpy(), thetas.var(0), rtol=0, atol=1e-12)
    # row i: theta_i minus the mean of theta_1..theta_i (after adding it); the last K = 5, oldest first
    expected = np.stack([thetas[i] - thetas[: i + 1].mean(0) for i in range(8, 13)])
    np.testing.assert_allclose(moments.deviation_rows().numpy(), expected, rtol=0, atol=1e-12)
    assert moments.count.item() == 13 and moments.rank == 5 and moments.position.item() == 13 % 5


def test_before_the_buffer_fills_only_the_collected_deviations_are_used() -> None:
    thetas = iterates(3, 4)
    moments = collected(thetas, max_rank=5)
    expected = np.stack([thetas[i] - thetas[: i + 1].mean(0) for i in range(3)])
    np.testing.assert_allclose(moments.deviation_rows().numpy(), expected, rtol=0, atol=1e-12)
    assert moments.rank == 3


def test_variance_is_clamped_at_1e_30() -> None:
    moments = collected(np.ones((4, 3)), max_rank=2)
    assert torch.equal(moments.variance(), torch.full((3,), 1e-30, dtype=torch.float64))


def _chi_square_p_value(errors: torch.Tensor, covariance: torch.Tensor, scale: float) -> float:
    """Two-sided p-value of sum_s e_s^T (scale C)^+ e_s against chi^2 with S * rank(C) degrees of freedom."""
    precision = torch.linalg.pinv(scale * covariance, hermitian=True, rtol=1e-10)
    statistic = float(torch.einsum("sp,pq,sq->", errors, precision, errors))
    dof = errors.shape[0] * int(torch.linalg.matrix_rank(covariance, hermitian=True, rtol=1e-10))
    cdf = stats.chi2.cdf(statistic, dof)
    return 2 * min(cdf, 1 - cdf)


def test_low_rank_draws_have_covariance_d_d_transpose_over_k_minus_1() -> None:
    thetas = iterates(30, 12, seed=1)
    moments = collected(thetas, max_rank=6)
    draws = moments.sample(scale=1.0, num_samples=20000, diagonal=False, generator=torch.Generator().manual_seed(0))
    d = moments.deviation_rows()
    covariance = d.T @ d / (6 - 1)
    errors = draws - moments.mean
    assert _chi_square_p_value(errors, covariance, 1.0) > 1e-3
    assert _chi_square_p_value(errors, covariance, 1.2) < 1e-6  # the test has the power to see a 20% error


def test_before_the_buffer_fills_the_low_rank_part_divides_by_the_stored_rank() -> None:
    """3 snapshots in a buffer of K = 8: covariance D^T D / (3 - 1), not / (K - 1) (7/2 times too small)."""
    moments = collected(iterates(3, 6, seed=4), max_rank=8)
    assert moments.rank == 3
    draws = moments.sample(scale=1.0, num_samples=20000, diagonal=False, generator=torch.Generator().manual_seed(3))
    d = moments.deviation_rows()
    errors = draws - moments.mean
    assert _chi_square_p_value(errors, d.T @ d / 2, 1.0) > 1e-3
    assert _chi_square_p_value(errors, d.T @ d / 7, 1.0) < 1e-6


def test_swag_draws_at_scale_one_half_have_half_the_full_covariance() -> None:
    """sqrt(s), not s: at s = 0.5 the covariance is 0.5 (Sigma_diag + D^T D / (K - 1)), not 0.25 of it."""
    thetas = iterates(30, 8, seed=2)
    moments = collected(thetas, max_rank=5)
    draws = moments.sample(scale=0.5, num_samples=20000, generator=torch.Generator().manual_seed(1))
    d = moments.deviation_rows()
    covariance = torch.diag(moments.variance()) + d.T @ d / 4
    errors = draws - moments.mean
    assert _chi_square_p_value(errors, covariance, 0.5) > 1e-3
    assert _chi_square_p_value(errors, covariance, 0.25) < 1e-6


def test_scale_zero_is_the_swa_mean_and_diagonal_only_draws_are_independent() -> None:
    moments = collected(iterates(10, 5, seed=3), max_rank=4)
    torch.testing.assert_close(moments.sample(scale=0.0, num_samples=3), moments.mean.expand(3, -1), rtol=0, atol=0)
    draws = moments.sample(scale=1.0, num_samples=40000, low_rank=False, generator=torch.Generator().manual_seed(2))
    errors = draws - moments.mean
    assert _chi_square_p_value(errors, torch.diag(moments.variance()), 1.0) > 1e-3
    single = moments.sample(generator=torch.Generator().manual_seed(0))
    assert single.shape == (5,)


def test_the_same_generator_seed_gives_the_same_draws() -> None:
    moments = collected(iterates(6, 5), max_rank=3)
    first = moments.sample(num_samples=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, moments.sample(num_samples=4, generator=torch.Generator().manual_seed(7)))


def test_state_dict_round_trip_continues_identically() -> None:
    thetas = iterates(9, 4)
    straight = collected(thetas, max_rank=3)
    half = collected(thetas[:5], max_rank=3)
    resumed = SWAGMoments(4, 3, dtype=torch.float64)
    resumed.load_state_dict(half.state_dict())
    for theta in thetas[5:]:
        resumed.update(torch.from_numpy(theta))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.update(torch.zeros(3)), r"theta must have shape \(4,\); got \(3,\)"),
        (lambda m: m.sample(), "no snapshot collected yet"),
        (lambda m: (m.update(torch.zeros(4)), m.sample()), "needs at least 2 stored deviations"),
        (lambda m: (m.update(torch.zeros(4)), m.sample(scale=-1.0)), "scale must be a number >= 0"),
        (lambda m: (m.update(torch.zeros(4)), m.sample(num_samples=0, low_rank=False)), "num_samples must be"),
    ],
)
def test_bad_input_is_named(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call(SWAGMoments(4, max_rank=3))


def test_bad_construction_is_named() -> None:
    with pytest.raises(ValueError, match="size must be a positive int"):
        SWAGMoments(0)
    with pytest.raises(ValueError, match="max_rank must be an int >= 0"):
        SWAGMoments(3, max_rank=-1)


def test_max_rank_zero_is_diagonal_swag() -> None:
    moments = collected(iterates(5, 3), max_rank=0)
    assert moments.rank == 0 and moments.deviation_rows().shape == (0, 3)
    assert math.isfinite(float(moments.sample(generator=torch.Generator().manual_seed(0)).sum()))
