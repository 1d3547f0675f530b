"""The variational Linear layer: local reparameterisation against weight sampling, KL terms, errors (float64)."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from lightning_bayes.inference.variational_linear import VariationalLinear

pytestmark = pytest.mark.usefixtures("single_thread")


def gaussian_layer(local: bool) -> VariationalLinear:
    torch.manual_seed(0)
    layer = VariationalLinear(4, 3, init_scale=0.3, local_reparameterization=local).double()
    with torch.no_grad():
        layer.weight.raw_scale.add_(0.3 * torch.randn(3, 4, dtype=torch.float64))
    return layer


def test_local_reparameterisation_output_moments_match_weight_sampling():
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    local, sampled = gaussian_layer(True), gaussian_layer(False)
    draws = 20_000
    torch.manual_seed(2)
    with torch.no_grad():
        by_output = torch.stack([local(x) for _ in range(draws)])
        by_weight = torch.stack([sampled(x) for _ in range(draws)])
    mean = x @ local.weight.mean.T + local.bias.mean  # closed form of both
    variance = x.square() @ local.weight.scale.square().T + local.bias.scale.square()
    for outputs in (by_output, by_weight):
        standard_error = (variance / draws).sqrt()
        assert ((outputs.mean(0) - mean).abs() < 5 * standard_error).all()
        # the sample variance of a Gaussian has relative standard error sqrt(2 / (n - 1))
        assert ((outputs.var(0) / variance - 1).abs() < 5 * math.sqrt(2 / (draws - 1))).all()


def test_gaussian_kl_is_closed_form_and_bernstein_kl_is_the_draws_log_ratio():
    layer = gaussian_layer(True)
    prior = Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    expected = sum(
        torch.distributions.kl_divergence(Normal(family.mean, family.scale), prior).sum() for family in (layer.weight, layer.bias)
    )
    assert torch.allclose(layer.kl(), expected, rtol=1e-12)
    flow = VariationalLinear(4, 3, family="bernstein", degree=5, prior_scale=0.5, local_reparameterization=False).double()
    with pytest.raises(RuntimeError, match="forward"):
        flow.kl()
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.manual_seed(3)
    z_w, z_b = torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    torch.manual_seed(3)  # the forward draws the same base noise, weight first
    flow(x)
    weight, log_q_w = flow.weight(z_w)
    bias, log_q_b = flow.bias(z_b)
    prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    log_prior = prior.log_prob(weight).sum() + prior.log_prob(bias).sum()
    assert torch.allclose(flow.kl(), log_q_w.sum() + log_q_b.sum() - log_prior, rtol=1e-12)


def test_means_start_from_a_trained_linear_layer():
    trained = nn.Linear(4, 3).double()
    layer = VariationalLinear(4, 3, init_from=trained).double()
    assert torch.equal(layer.weight.mean, trained.weight) and torch.equal(layer.bias.mean, trained.bias)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"family": "student"}, "family"), ({"prior_scale": 0.0}, "prior_scale"),
     ({"family": "bernstein"}, "local_reparameterization"), ({"init_from": nn.Linear(3, 3)}, "init_from")],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VariationalLinear(4, 3, **kwargs)
