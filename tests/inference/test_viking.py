"""The VIKING family against dense float64 Gaussians (P = 50, a random 8 x 50 Jacobian, as in the spec)."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from lightning_bayes.inference.kernel_projection import DenseSystem, project
from lightning_bayes.inference.viking import KernelImageGaussian, image_dimension, mix_noise

P, ROWS = 50, 8


def _kernel_projector(seed: int = 0) -> torch.Tensor:
    jacobian = torch.randn(ROWS, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.eye(P, dtype=torch.float64) - jacobian.T @ torch.linalg.solve(jacobian @ jacobian.T, jacobian)


def _family(log_alpha: float = 1.3, log_sigma_image: float = -0.7) -> KernelImageGaussian:
    return KernelImageGaussian(log_alpha, log_sigma_image).double()


def test_closed_form_kl_equals_the_dense_gaussian_kl(single_thread):
    projector = _kernel_projector()
    family = _family()
    theta_hat = torch.randn(P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha, s_ker, s_im = family.alpha.item(), family.sigma_kernel.item(), family.sigma_image.item()
    covariance = s_ker**2 * projector + s_im**2 * (torch.eye(P, dtype=torch.float64) - projector)
    q = MultivariateNormal(theta_hat, covariance_matrix=covariance)
    prior = MultivariateNormal(torch.zeros(P, dtype=torch.float64), covariance_matrix=torch.eye(P, dtype=torch.float64) / alpha)
    dense = kl_divergence(q, prior)
    closed = family.kl(theta_hat, torch.tensor(P - torch.trace(projector).item(), dtype=torch.float64))
    assert math.isclose(closed.item(), dense.item(), rel_tol=1e-10)
    assert math.isclose(s_ker, alpha**-0.5, rel_tol=1e-15)


def test_kl_gradients_reach_both_scales(single_thread):
    family = _family()
    family.kl(torch.ones(P, dtype=torch.float64), torch.tensor(8.0, dtype=torch.float64)).backward()
    assert family.log_alpha.grad.abs() > 0 and family.log_sigma_image.grad.abs() > 0


def test_sample_covariance_is_kernel_plus_image(single_thread):
    projector = _kernel_projector(2)
    family = _family()
    count = 20_000
    noise = torch.randn(count, P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theta_hat = torch.linspace(-1, 1, P, dtype=torch.float64)
    with torch.no_grad():
        samples = family.sample(theta_hat, noise, noise @ projector)
    expected = family.sigma_kernel.item() ** 2 * projector + family.sigma_image.item() ** 2 * (
        torch.eye(P, dtype=torch.float64) - projector
    )
    empirical = torch.cov(samples.T)
    assert (empirical - expected).abs().max() < 7 / math.sqrt(count) * expected.diagonal().max()
    assert (samples.mean(0) - theta_hat).abs().max() < 5 * expected.diagonal().max().sqrt() / math.sqrt(count)


def test_hutchinson_image_dimension_is_unbiased(single_thread):
    projector = _kernel_projector(4)
    draws = 2_000
    noise = torch.randn(draws, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    estimates = image_dimension(noise, noise @ projector)
    rank = P - torch.trace(projector).item()  # = 8
    assert abs(estimates.mean().item() - rank) < 4 * math.sqrt(2 * rank / draws)
    assert (estimates >= 0).all()  # e^T (I - P) e with (I - P) a projector
    assert not estimates.requires_grad


def test_hutchinson_image_dimension_is_the_rank_of_a_rank_deficient_jacobian(single_thread):
    """8 rows of which 2 repeat (scaled) earlier ones: rank 6. With the kernel part from the dense solver's
    pseudo-inverse, Hutchinson's estimate averages P - tr P = 6, not the row count 8. Its variance is 2 x 6 = 12
    (measured 12.05 over 2e5 draws), so over 20,000 draws the standard error is 0.024: 4 of them is 0.1 (the row
    count is 80 away)."""
    generator = torch.Generator().manual_seed(8)
    independent = torch.randn(6, P, generator=generator, dtype=torch.float64)
    jacobian = torch.cat([independent, 2.0 * independent[:2]])
    draws = 20_000
    noise = torch.randn(draws, P, generator=generator, dtype=torch.float64)
    kernel, _ = project(DenseSystem(jacobian), noise)
    estimates = image_dimension(noise, kernel)
    assert abs(estimates.mean().item() - 6) < 4 * math.sqrt(2 * 6 / draws)


def test_mix_noise_extremes_and_variance(single_thread):
    carried, fresh = torch.randn(3, P, dtype=torch.float64), torch.randn(3, P, dtype=torch.float64)
    assert torch.equal(mix_noise(carried, fresh, 0.0), fresh)
    assert torch.equal(mix_noise(carried, fresh, 1.0), carried)
    assert torch.allclose(mix_noise(carried, fresh, 0.36), 0.6 * carried + 0.8 * fresh, rtol=1e-15)
    with pytest.raises(ValueError, match="gamma"):
        mix_noise(carried, fresh, 1.5)


def test_bad_initial_scales_are_named():
    with pytest.raises(ValueError, match="log_alpha"):
        KernelImageGaussian(log_alpha=float("nan"))


def test_image_dimension_carries_no_gradient(single_thread):
    """The spec stops the Hutchinson estimate's gradient: the KL's theta gradient is alpha theta, as with R fixed."""
    projector = _kernel_projector(6)
    noise = torch.randn(4, P, generator=torch.Generator().manual_seed(7), dtype=torch.float64).requires_grad_(True)
    theta = torch.linspace(-1, 1, P, dtype=torch.float64).requires_grad_(True)
    kernel = (noise + 0.1 * theta) @ projector  # depends on theta, as the projected noise does in training
    estimate = image_dimension(noise, kernel)
    assert not estimate.requires_grad
    family = _family()
    (gradient,) = torch.autograd.grad(family.kl(theta, estimate.mean()), theta)
    torch.testing.assert_close(gradient, family.alpha.detach() * theta.detach(), rtol=1e-15, atol=0)
