"""Elliptical slice sampling leaves a known Gaussian invariant: chains started at exact posterior draws of a
conjugate 2-D Gaussian stay exact (moments within 3 standard errors of the analytic posterior); a flat
likelihood gives prior draws with one evaluation per step; every accepted point clears its slice threshold."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_bayes.inference.elliptical_slice import (
    MAX_EVALUATIONS,
    EllipticalSlice,
    elliptical_slice_step,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PRIOR_SCALE = 1.5
OBSERVATION = torch.tensor([1.0, -2.0], dtype=torch.float64)
LIKELIHOOD_PRECISION = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)


def log_likelihood(z: torch.Tensor) -> float:
    r = z - OBSERVATION
    return float(-0.5 * r @ LIKELIHOOD_PRECISION @ r)


def posterior() -> tuple[torch.Tensor, torch.Tensor]:
    """N(m, C) with C = (Lambda + I / sigma_p^2)^-1 and m = C Lambda y."""
    covariance = torch.linalg.inv(LIKELIHOOD_PRECISION + torch.eye(2, dtype=torch.float64) / PRIOR_SCALE**2)
    return covariance @ LIKELIHOOD_PRECISION @ OBSERVATION, covariance


def run_chains(starts: torch.Tensor, steps: int, oracle, seed: int) -> tuple[torch.Tensor, list]:
    generator = torch.Generator().manual_seed(seed)
    ends, results = [], []
    for z in starts:
        for _ in range(steps):
            result = elliptical_slice_step(z, oracle, PRIOR_SCALE, generator)
            z = result.z
            results.append(result)
        ends.append(z)
    return torch.stack(ends), results


def assert_moments(draws: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> None:
    """Sample mean and covariance within 3 standard errors: sqrt(C_ii / n) for means and
    sqrt((C_ii C_jj + C_ij^2) / n) for covariances of a Gaussian."""
    n = draws.shape[0]
    mean_error = (draws.mean(0) - mean).abs() / (covariance.diagonal() / n).sqrt()
    assert mean_error.max() < 3, mean_error
    sample_covariance = torch.cov(draws.T)
    spread = ((covariance.diagonal()[:, None] * covariance.diagonal()[None, :] + covariance**2) / n).sqrt()
    assert ((sample_covariance - covariance).abs() / spread).max() < 3


def test_chains_started_at_the_posterior_stay_at_the_posterior() -> None:
    mean, covariance = posterior()
    generator = torch.Generator().manual_seed(0)
    starts = mean + torch.randn(2500, 2, dtype=torch.float64, generator=generator) @ torch.linalg.cholesky(covariance).T
    ends, results = run_chains(starts, steps=2, oracle=log_likelihood, seed=1)
    assert_moments(ends, mean, covariance)
    assert all(r.log_likelihood > r.threshold for r in results)
    assert all(r.log_likelihood == pytest.approx(log_likelihood(r.z), abs=1e-12) for r in results[:50])
    assert sum(r.evaluations for r in results) / len(results) > 1.2  # the bracket did shrink


def test_a_chain_from_zero_converges_to_the_posterior() -> None:
    mean, covariance = posterior()
    generator = torch.Generator().manual_seed(2)
    z, draws = torch.zeros(2, dtype=torch.float64), []
    for _ in range(4000):
        z = elliptical_slice_step(z, log_likelihood, PRIOR_SCALE, generator).z
        draws.append(z)
    thinned = torch.stack(draws[500::5])  # burn-in dropped; thinning by 5 leaves nearly independent draws
    assert_moments(thinned, mean, covariance)


def test_a_flat_likelihood_gives_prior_draws_in_one_evaluation() -> None:
    starts = PRIOR_SCALE * torch.randn(2500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ends, results = run_chains(starts, steps=1, oracle=lambda z: 0.0, seed=4)
    assert all(r.evaluations == 2 for r in results)  # L(z) once, then the first proposal is accepted
    assert_moments(ends, torch.zeros(2, dtype=torch.float64), PRIOR_SCALE**2 * torch.eye(2, dtype=torch.float64))


def test_known_current_log_likelihood_is_not_re_evaluated() -> None:
    calls = []

    def counting(z: torch.Tensor) -> float:
        calls.append(z)
        return log_likelihood(z)

    z = torch.zeros(2, dtype=torch.float64)
    result = elliptical_slice_step(z, counting, PRIOR_SCALE, torch.Generator().manual_seed(0), current=log_likelihood(z))
    assert result.evaluations == len(calls) >= 1


def test_rejections_shrink_the_bracket_around_the_current_point() -> None:
    # Murray, Adams & MacKay (2010), figure 2: the first angle is uniform on [0, 2 pi) with bracket
    # [angle - 2 pi, angle]; each rejection moves the bracket end on the angle's side to it and draws the next angle
    # uniformly inside, so angle 0 (the current point) stays in a bracket that shrinks at every rejection (the first
    # angle is the bracket's upper end: its rejection leaves the bracket as it was)
    sampler = EllipticalSlice(2, PRIOR_SCALE)
    sampler.reset(torch.zeros(2, dtype=torch.float64), 0.0)
    generator = torch.Generator().manual_seed(6)
    sampler.begin(generator)
    angle, width = float(sampler.angle), float(sampler.upper - sampler.lower)
    assert 0 <= angle < 2 * math.pi and width == pytest.approx(2 * math.pi) and float(sampler.upper) == angle
    for _ in range(30):
        assert not sampler.observe(-math.inf, generator)
        low, angle, high = float(sampler.lower), float(sampler.angle), float(sampler.upper)
        assert low <= angle <= high and low <= 0 <= high and high - low <= width
        width = high - low
    assert width < 1e-3


def test_a_nan_log_likelihood_stops_at_the_evaluation_cap_instead_of_looping() -> None:
    """No proposal clears a threshold against NaN: the step raises after MAX_EVALUATIONS evaluations, not hangs."""
    calls = []

    def nan_oracle(z: torch.Tensor) -> float:
        calls.append(1)
        return math.nan

    with pytest.raises(RuntimeError, match=f"{MAX_EVALUATIONS} log-likelihood evaluations.*NaN"):
        elliptical_slice_step(torch.ones(2, dtype=torch.float64), nan_oracle, PRIOR_SCALE, current=0.0)
    assert len(calls) == MAX_EVALUATIONS


def test_the_state_machine_survives_a_state_dict_round_trip_mid_step() -> None:
    def drive(sampler: EllipticalSlice, generator: torch.Generator, rounds: int) -> None:
        for _ in range(rounds):
            if sampler.observe(log_likelihood(sampler.proposal()), generator):
                sampler.begin(generator)

    straight = EllipticalSlice(2, PRIOR_SCALE)
    straight.reset(torch.zeros(2, dtype=torch.float64), log_likelihood(torch.zeros(2, dtype=torch.float64)))
    generator = torch.Generator().manual_seed(5)
    straight.begin(generator)
    drive(straight, generator, 7)
    state, generator_state = {k: v.clone() for k, v in straight.state_dict().items()}, generator.get_state()
    drive(straight, generator, 9)
    resumed = EllipticalSlice(2, PRIOR_SCALE)
    resumed.load_state_dict(state)
    generator.set_state(generator_state)
    drive(resumed, generator, 9)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="prior_scale must be > 0"):
        EllipticalSlice(2, prior_scale=0.0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        EllipticalSlice(0)
    sampler = EllipticalSlice(2)
    with pytest.raises(ValueError, match="call reset"):
        sampler.begin()
    with pytest.raises(ValueError, match=r"z must have shape \(2,\)"):
        sampler.reset(torch.zeros(3, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="must be finite"):
        sampler.reset(torch.zeros(2, dtype=torch.float64), -math.inf)
