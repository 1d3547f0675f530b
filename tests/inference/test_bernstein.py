"""The Bernstein-flow chain against closed forms and autograd (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_bayes.inference.bernstein import BernsteinFlow, bernstein_basis, monotone_coefficients

pytestmark = pytest.mark.usefixtures("single_thread")


def random_flow(degree: int, final_affine: bool = True, seed: int = 0, shape: tuple[int, ...] = (3,)) -> BernsteinFlow:
    torch.manual_seed(seed)
    flow = BernsteinFlow(shape, degree=degree, support=(-2.0, 3.0), final_affine=final_affine).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def test_basis_sums_to_one_and_matches_the_binomial_formula():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    basis = bernstein_basis(u, 7)
    assert torch.allclose(basis.sum(-1), torch.ones_like(u), atol=1e-12)
    k = 3
    assert torch.allclose(basis[:, k], math.comb(7, k) * u**k * (1 - u) ** (7 - k), atol=1e-12)


def test_polynomial_is_increasing_with_exact_end_points():
    flow = random_flow(10)
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)[:, None].expand(-1, 3)
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


def test_degree_one_is_a_scaled_logit_normal():
    flow = random_flow(1, seed=2)
    z = torch.randn(40, 3, dtype=torch.float64)
    with torch.no_grad():
        w, log_q = flow(z)
        theta = flow.coefficients()
        mu, sigma = flow.b, F.softplus(flow.a)
        outer = F.softplus(flow.alpha)
        u = ((w + flow.beta) / outer - theta[:, 0]) / (theta[:, 1] - theta[:, 0])
        logit = torch.log(u) - torch.log1p(-u)
        log_logit_normal = (
            -0.5 * ((logit - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi) - torch.log(u * (1 - u))
        )
        closed = log_logit_normal - torch.log(outer * (theta[:, 1] - theta[:, 0]))
    assert torch.allclose(log_q, closed, rtol=1e-9, atol=1e-9)


def test_initial_coefficients_span_the_support():
    flow = BernsteinFlow((2,), degree=4, support=(-5.0, 5.0)).double()
    assert torch.allclose(flow.coefficients(), torch.linspace(-5, 5, 5, dtype=torch.float64).expand(2, 5), atol=1e-6)


@pytest.mark.parametrize(("kwargs", "name"), [({"degree": 0}, "degree"), ({"support": (1.0, 1.0)}, "support")])
def test_bad_arguments_are_named(kwargs: dict, name: str):
    with pytest.raises(ValueError, match=name):
        BernsteinFlow((2,), **kwargs)


def _logit_beta_log_density(t: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Density of ``logit(pi)`` for ``pi ~ Beta(a, b)`` (the sigmoid's Jacobian included)."""
    beta = torch.distributions.Beta(torch.tensor(a, dtype=t.dtype), torch.tensor(b, dtype=t.dtype))
    return beta.log_prob(torch.sigmoid(t).clamp(1e-12, 1 - 1e-12)) + F.logsigmoid(t) + F.logsigmoid(-t)


def test_recovers_the_bernoulli_posterior_where_a_gaussian_cannot():
    # y = (1, 1), prior Beta(1.1, 1.1) on pi, inference on logit(pi): the exact posterior is Beta(3.1, 1.1).
    # The paper's median KL(q || posterior): Gaussian VI 0.0222, Bernstein flow M = 10 1.6e-4 (MC floor ~7e-5).
    def log_joint(t: torch.Tensor) -> torch.Tensor:
        return _logit_beta_log_density(t, 1.1, 1.1) + 2 * F.logsigmoid(t)

    generator = torch.Generator().manual_seed(0)
    flow = BernsteinFlow((1,), degree=10, support=(-5.0, 8.0)).double()
    optimizer = torch.optim.RMSprop(flow.parameters(), lr=0.01)
    for _ in range(3000):
        w, log_q = flow.sample(1000, generator)
        loss = (log_q - log_joint(w)).mean()  # the negative ELBO up to log p(y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mean = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    raw_scale = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.RMSprop([mean, raw_scale], lr=0.01)

    def gaussian(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = F.softplus(raw_scale)
        return mean + scale * z, -0.5 * z**2 - 0.5 * math.log(2 * math.pi) - torch.log(scale)

    for _ in range(3000):
        w, log_q = gaussian(torch.randn(1000, 1, generator=generator, dtype=torch.float64))
        loss = (log_q - log_joint(w)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        w, log_q = flow.sample(200_000, generator)
        kl_flow = (log_q - _logit_beta_log_density(w, 3.1, 1.1)).mean().item()
        w, log_q = gaussian(torch.randn(200_000, 1, generator=generator, dtype=torch.float64))
        kl_gauss = (log_q - _logit_beta_log_density(w, 3.1, 1.1)).mean().item()
    assert kl_flow < 1e-3
    assert 0.015 < kl_gauss < 0.03
