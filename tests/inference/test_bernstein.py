"""The Bernstein-flow chain against closed forms and autograd (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_bayes.inference.bernstein import (
    BernsteinFlow,
    bernstein_polynomial,
    monotone_coefficients,
)
from lightning_bayes.inference.mean_field_gaussian import MeanFieldGaussian
from lightning_bayes.inference.reparameterised_vi import fit_reparameterised, kl_to_posterior

pytestmark = pytest.mark.usefixtures("single_thread")


def random_flow(degree: int, final_affine: bool = True, seed: int = 0, shape: tuple[int, ...] = (3,)) -> BernsteinFlow:
    torch.manual_seed(seed)
    flow = BernsteinFlow(shape, degree=degree, support=(-2.0, 3.0), final_affine=final_affine).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def basis(u: torch.Tensor, degree: int) -> torch.Tensor:
    """``b_{k,M}(u)`` ``[len(u), M + 1]``: the polynomial whose coefficients are the identity's rows."""
    return bernstein_polynomial(u[:, None], torch.eye(degree + 1, dtype=u.dtype))[0]


def test_basis_sums_to_one_and_matches_the_binomial_formula():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    basis_7 = basis(u, 7)
    assert torch.allclose(basis_7.sum(-1), torch.ones_like(u), atol=1e-12)
    k = 3
    assert torch.allclose(basis_7[:, k], math.comb(7, k) * u**k * (1 - u) ** (7 - k), atol=1e-12)


def test_polynomial_slope_is_its_derivative_and_large_degrees_stay_finite():
    """Inside (0, 1) ``h'`` from the degree ``M - 1`` basis equals autograd's ``dh/du``; at ``M = 300`` in
    float32, where ``C(300, 150) ~ 1e89`` overflows, the log-space basis is finite and sums to one."""
    torch.manual_seed(0)
    theta = monotone_coefficients(torch.randn(4, 13, dtype=torch.float64))
    u = torch.linspace(1e-3, 1 - 1e-3, 201, dtype=torch.float64)[:, None].expand(-1, 4).clone().requires_grad_(True)
    h, slope = bernstein_polynomial(u, theta)
    (dh_du,) = torch.autograd.grad(h.sum(), u)
    torch.testing.assert_close(slope, dh_du, rtol=1e-12, atol=1e-12)
    basis_300 = basis(torch.linspace(0, 1, 101), 300)
    assert torch.isfinite(basis_300).all()
    torch.testing.assert_close(basis_300.sum(-1), torch.ones(101), rtol=0, atol=1e-4)


def test_polynomial_is_increasing_with_exact_end_points():
    flow = random_flow(10)
    u = torch.linspace(0, 1, 10_001, dtype=torch.float64)[:, None].expand(-1, 3)
    h, slope = flow.polynomial(u)
    theta = flow.coefficients()
    assert (h.diff(dim=0) > 0).all() and (slope > 0).all()
    assert torch.allclose(h[0], theta[:, 0], rtol=0, atol=1e-15)
    assert torch.allclose(h[-1], theta[:, -1], rtol=0, atol=1e-12)
    assert (monotone_coefficients(flow.raw_coefficients).diff(dim=-1) > 0).all()


@pytest.mark.parametrize("final_affine", [True, False])
def test_analytic_log_density_equals_autograd(final_affine: bool):
    flow = random_flow(12, final_affine)
    z = torch.randn(50, 3, dtype=torch.float64, requires_grad=True)
    w, log_q = flow(z)
    (dw_dz,) = torch.autograd.grad(w.sum(), z)  # elementwise map: the Jacobian is diagonal
    reference = -0.5 * z.square() - 0.5 * math.log(2 * math.pi) - torch.log(dw_dz)
    assert torch.allclose(log_q, reference, rtol=1e-10, atol=1e-10)


def test_density_integrates_to_one_over_w():
    flow = random_flow(20, seed=1, shape=(1,))
    z = torch.linspace(-9, 9, 200_001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        w, log_q = flow(z)
    total = torch.trapezoid(log_q.exp()[:, 0], w[:, 0])
    assert abs(total.item() - 1) < 1e-6


@pytest.mark.parametrize("final_affine", [True, False])
def test_density_is_the_derivative_of_the_base_cdf(final_affine: bool):
    """``w`` increases with ``z``, so ``P(W <= w(z)) = Phi(z)`` and ``q(w) = dPhi(z(w)) / dw``: the analytic density
    against central differences of the standard normal CDF along the grid (no autograd), per entry, and its
    trapezoid over w. The differences' O(h^2) error (h = 1e-4) was measured at 3e-8 relative over |z| < 4 (beyond,
    ``1 - Phi`` loses its digits); the quadrature misses 1e-15 of mass beyond |z| = 8 and was 1 to 3e-10."""
    flow = random_flow(12, final_affine, seed=3)
    z = torch.linspace(-8, 8, 160_001, dtype=torch.float64)[:, None].expand(-1, 3)
    with torch.no_grad():
        w, log_q = flow(z)
    cdf = torch.special.ndtr(z)
    difference = (cdf[2:] - cdf[:-2]) / (w[2:] - w[:-2])
    central = z[1:-1, 0].abs() < 4
    assert ((difference / log_q[1:-1].exp() - 1)[central].abs() < 1e-6).all()
    torch.testing.assert_close(torch.trapezoid(log_q.exp(), w, dim=0), torch.ones(3, dtype=torch.float64),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("final_affine", [False, True])
def test_degree_one_is_a_scaled_logit_normal(final_affine: bool):
    flow = random_flow(1, final_affine, seed=2)
    z = torch.randn(40, 3, dtype=torch.float64)
    with torch.no_grad():
        w, log_q = flow(z)
        theta = flow.coefficients()
        mu, sigma = flow.b, F.softplus(flow.a)
        outer = F.softplus(flow.alpha) if final_affine else torch.ones(3, dtype=torch.float64)
        shift = flow.beta if final_affine else torch.zeros(3, dtype=torch.float64)
        u = ((w + shift) / outer - theta[:, 0]) / (theta[:, 1] - theta[:, 0])
        logit = torch.log(u) - torch.log1p(-u)
        log_logit_normal = (
            -0.5 * ((logit - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi) - torch.log(u * (1 - u))
        )
        closed = log_logit_normal - torch.log(outer * (theta[:, 1] - theta[:, 0]))
    assert torch.allclose(log_q, closed, rtol=1e-9, atol=1e-9)


def test_initial_coefficients_span_the_support():
    flow = BernsteinFlow((2,), degree=4, support=(-5.0, 5.0)).double()
    assert torch.allclose(flow.coefficients(), torch.linspace(-5, 5, 5, dtype=torch.float64).expand(2, 5), atol=1e-6)
    # and so do the draws: the final affine starts as the identity (softplus(alpha) = 1, beta = 0), so extreme base
    # draws land at the support's ends (u clipped to 1e-5 from 0 and 1: h within slope 10 x 1e-5 of them)
    w, _ = flow(torch.tensor([[-30.0, 30.0]], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([[-5.0, 5.0]], dtype=torch.float64), rtol=0, atol=2e-4)


@pytest.mark.parametrize(("kwargs", "name"), [({"degree": 0}, "degree"), ({"support": (1.0, 1.0)}, "support")])
def test_bad_arguments_are_named(kwargs: dict, name: str):
    with pytest.raises(ValueError, match=name):
        BernsteinFlow((2,), **kwargs)


def test_base_draws_of_another_shape_are_refused_not_broadcast():
    flow = BernsteinFlow((2, 3))
    assert flow(torch.zeros(5, 2, 3))[0].shape == (5, 2, 3)
    for shape in [(5, 3), (2, 1), (3,)]:  # each broadcast against the (2, 3) parameters before
        with pytest.raises(ValueError, match=r"z must have shape \[\.\.\., 2, 3\]; got "):
            flow(torch.zeros(shape))


def _logit_beta_log_density(t: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Density of ``logit(pi)`` for ``pi ~ Beta(a, b)`` (the sigmoid's Jacobian included)."""
    beta = torch.distributions.Beta(torch.tensor(a, dtype=t.dtype), torch.tensor(b, dtype=t.dtype))
    return beta.log_prob(torch.sigmoid(t).clamp(1e-12, 1 - 1e-12)) + F.logsigmoid(t) + F.logsigmoid(-t)


def fit(degree: int, log_joint, support: tuple[float, float], generator: torch.Generator) -> BernsteinFlow:
    """Bernstein-flow VI on a 1-D target: RMSprop (lr 0.01), 3,000 steps of 1,000 draws."""
    flow = BernsteinFlow((1,), degree=degree, support=support).double()
    fit_reparameterised(flow, log_joint, generator=generator)
    return flow


def test_recovers_the_bernoulli_posterior_where_a_gaussian_cannot():
    # y = (1, 1), prior Beta(1.1, 1.1) on pi, inference on logit(pi): the exact posterior is Beta(3.1, 1.1).
    # The paper's median KL(q || posterior): Gaussian VI 0.0222, Bernstein flow M = 10 1.6e-4 (MC floor ~7e-5).
    def log_joint(t: torch.Tensor) -> torch.Tensor:
        return _logit_beta_log_density(t, 1.1, 1.1) + 2 * F.logsigmoid(t)

    def log_posterior(t: torch.Tensor) -> torch.Tensor:
        return _logit_beta_log_density(t, 3.1, 1.1)

    generator = torch.Generator().manual_seed(0)
    flow = fit(10, log_joint, (-5.0, 8.0), generator)
    gaussian = MeanFieldGaussian((1,)).double()
    fit_reparameterised(gaussian, log_joint, generator=generator)
    assert kl_to_posterior(flow, log_posterior, generator=generator) < 1e-3
    assert 0.015 < kl_to_posterior(gaussian, log_posterior, generator=generator) < 0.03


CAUCHY_DATA = torch.tensor([1.2084, -2.7329, 4.1770, 1.9711, -4.2004, -2.3850], dtype=torch.float64)


def cauchy_log_joint(prior_scale: float):
    """``log N(t; 0, prior_scale^2) + sum_i log Cauchy(y_i; t, 1)`` and the log-normaliser by quadrature."""

    def log_joint(t: torch.Tensor) -> torch.Tensor:
        prior = -0.5 * (t / prior_scale) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(prior_scale)
        return prior + (-math.log(math.pi) - torch.log1p((CAUCHY_DATA - t) ** 2)).sum(-1, keepdim=True)

    grid = torch.linspace(-15, 15, 300_001, dtype=torch.float64)[:, None]
    log_evidence = torch.logsumexp(log_joint(grid)[:, 0], 0) + math.log(float(grid[1, 0] - grid[0, 0]))
    return log_joint, lambda t: log_joint(t) - log_evidence


def local_maxima(flow: BernsteinFlow) -> int:
    with torch.no_grad():
        _, log_q = flow(torch.linspace(-6, 6, 20_001, dtype=torch.float64)[:, None])  # w increases with z
    q = log_q[:, 0]
    return int(((q[1:-1] > q[:-2]) & (q[1:-1] > q[2:])).sum())


@pytest.mark.parametrize(
    ("degree", "target"), [(10, 0.03), pytest.param(30, 0.01, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("prior_scale", [1.0, 3.0])
def test_recovers_the_six_point_cauchy_posterior(degree: int, target: float, prior_scale: float):
    # The spec's data with its prior N(0, 1), whose exact posterior is unimodal (mode 0.77), and with N(0, 3^2),
    # whose posterior is bimodal (modes -2.37 and 1.25): q must find both modes there.
    log_joint, log_posterior = cauchy_log_joint(prior_scale)
    generator = torch.Generator().manual_seed(0)
    flow = fit(degree, log_joint, (-5.0, 5.0), generator)
    assert kl_to_posterior(flow, log_posterior, generator=generator) < target
    assert local_maxima(flow) == (2 if prior_scale == 3.0 else 1)


def test_freeze_affine_keeps_a_and_b():
    flow = BernsteinFlow((4,), degree=5, freeze_affine=True).double()
    names = {name for name, _ in flow.named_parameters()}
    assert "a" not in names and "b" not in names
    w, log_q = flow.sample(8)
    (w.sum() + log_q.sum()).backward()
    assert torch.equal(flow.a, torch.zeros(4, dtype=torch.float64)) and torch.equal(flow.b, torch.zeros(4, dtype=torch.float64))
    assert flow.raw_coefficients.grad is not None
