"""The mean-field Gaussian family against torch.distributions (float64)."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from lightning_bayes.inference.mean_field_gaussian import MeanFieldGaussian


@pytest.mark.parametrize("scale_map", ["softplus", "square"])
def test_log_density_and_kl_match_torch_distributions(scale_map):
    torch.manual_seed(0)
    family = MeanFieldGaussian((3, 4), init_mean=torch.randn(3, 4), init_scale=0.3, scale_map=scale_map).double()
    with torch.no_grad():
        family.raw_scale.add_(0.2 * torch.randn(3, 4, dtype=torch.float64))
    w, log_q = family.sample(5)
    reference = Normal(family.mean, family.scale)
    assert torch.allclose(log_q, reference.log_prob(w), atol=1e-12)
    prior = Normal(torch.zeros(3, 4, dtype=torch.float64), torch.full((3, 4), 0.7, dtype=torch.float64))
    assert torch.allclose(family.kl_to_prior(0.7), kl_divergence(reference, prior).sum(), rtol=1e-12)


def test_initial_values_and_errors():
    family = MeanFieldGaussian((2,), init_mean=torch.tensor([1.0, -1.0]), init_scale=0.1)
    assert torch.allclose(family.scale, torch.full((2,), 0.1)) and torch.equal(family.mean.detach(), torch.tensor([1.0, -1.0]))
    square = MeanFieldGaussian((2,), init_scale=0.01, scale_map="square")
    assert torch.allclose(square.raw_scale, torch.full((2,), 0.1)) and torch.allclose(square.scale, square.raw_scale**2)
    with pytest.raises(ValueError, match="scale_map"):
        MeanFieldGaussian((2,), scale_map="exp")
    with pytest.raises(ValueError, match="init_scale"):
        MeanFieldGaussian((2,), init_scale=0.0)
    with pytest.raises(ValueError, match="init_mean"):
        MeanFieldGaussian((2,), init_mean=torch.zeros(3))
