import math

import pytest
import torch
import torch.nn.functional as F

from lightning_bayes.inference.likelihoods import CategoricalLikelihood, GaussianLikelihood, build_likelihood
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive


def test_categorical_loss_is_mean_cross_entropy_and_predictive_keeps_samples():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    lik = CategoricalLikelihood()
    expected = -torch.log_softmax(logits, -1)[torch.arange(6), y].mean()
    torch.testing.assert_close(lik.loss(logits, y), expected, rtol=0, atol=1e-6)
    pred = lik.predictive(logits.unsqueeze(0))
    assert isinstance(pred, CategoricalPredictive)
    torch.testing.assert_close(pred.probs, torch.softmax(logits, -1))


def test_homoscedastic_gaussian_loss_matches_the_density():
    torch.manual_seed(0)
    lik = GaussianLikelihood(output_dim=2, init_noise=0.7)
    mean, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    var = 0.7**2 + 1e-6
    expected = (0.5 * math.log(2 * math.pi * var) + (y - mean) ** 2 / (2 * var)).sum(-1).mean()
    torch.testing.assert_close(lik.loss(mean, y).double(), expected, rtol=1e-6, atol=0)
    pred = lik.predictive(mean.float().unsqueeze(0))
    assert isinstance(pred, GaussianPredictive)
    torch.testing.assert_close(pred.variance, torch.full((5, 2), var), rtol=1e-6, atol=0)


def test_heteroscedastic_gaussian_reads_the_scale_from_the_outputs():
    lik = GaussianLikelihood(output_dim=1, heteroscedastic=True, init_noise=1.0)
    raw = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    mean, var = lik.mean_and_variance(raw)
    # raw scale 0 maps to init_noise; the offset is softplus^{-1}(1)
    offset = math.log(math.expm1(1.0))
    expected_std = F.softplus(torch.tensor([[0.0], [2.0]]) + offset)
    torch.testing.assert_close(var, expected_std**2 + 1e-6)
    torch.testing.assert_close(mean, raw[:, :1])


def test_wrong_output_width_and_unknown_names_are_explained():
    with pytest.raises(ValueError, match="expects 2 outputs"):
        GaussianLikelihood(output_dim=1, heteroscedastic=True).loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="likelihood must be"):
        build_likelihood("poisson")
    with pytest.raises(ValueError, match="labels"):
        CategoricalLikelihood().loss(torch.zeros(3, 2), torch.zeros(4))
