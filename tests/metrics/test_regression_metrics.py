"""Regression metrics against scipy: mixture densities, quadrature CRPS and root-found quantiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metric_references import crps_by_integration, mixture_log_density, mixture_quantile

from lightning_bayes.metrics import CRPS, RMSE, GaussianNLL, IntervalCoverage, gaussian_mixture_crps, regression_metrics
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive


def mixture(
    seed: int = 0, samples: int = 3, batch: int = 12, outputs: int = 2
) -> tuple[GaussianPredictive, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(samples, batch, outputs, generator=generator, dtype=torch.float64)
    variance = 0.05 + torch.rand(samples, batch, outputs, generator=generator, dtype=torch.float64)
    target = torch.randn(batch, outputs, generator=generator, dtype=torch.float64) * 1.5
    return GaussianPredictive(mean, variance), target


def test_crps_closed_form_equals_quadrature() -> None:
    """Closed form vs ``int (F - 1[z >= y])^2`` by adaptive quadrature (tolerance 1e-12): agree to 1e-9."""
    predictive, target = mixture()
    crps = gaussian_mixture_crps(predictive, target).numpy()
    mean, std = predictive.mean_samples.numpy(), predictive.variance_samples.sqrt().numpy()
    for b in range(target.shape[0]):
        for d in range(target.shape[1]):
            expected = crps_by_integration(float(target[b, d]), mean[:, b, d], std[:, b, d])
            assert crps[b, d] == pytest.approx(expected, abs=1e-9)


def test_crps_in_blocks_of_sample_pairs_equals_all_pairs_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """All S^2 B D pair values at once took 3.8 GB at S = 1000, B = 128: blocks of 3 rows of s (a ragged last one of
    S = 7) give the one-block value to rounding."""
    from lightning_bayes.metrics import regression

    predictive, target = mixture(samples=7, batch=5, outputs=2)
    whole = gaussian_mixture_crps(predictive, target)
    monkeypatch.setattr(regression, "_PAIR_ELEMENTS", 3 * predictive.mean_samples.numel())
    torch.testing.assert_close(gaussian_mixture_crps(predictive, target), whole, rtol=1e-14, atol=1e-15)
    monkeypatch.setattr(regression, "_PAIR_ELEMENTS", 1)  # one row at a time
    torch.testing.assert_close(gaussian_mixture_crps(predictive, target), whole, rtol=1e-14, atol=1e-15)


def test_crps_of_a_single_gaussian_known_value() -> None:
    """N(0, 1) at y = 0: CRPS = sigma (2 phi(0) - 1/sqrt(pi)) = 2/sqrt(2 pi) - 1/sqrt(pi) (Gneiting & Raftery, 2007)."""
    predictive = GaussianPredictive(torch.zeros(1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64))
    expected = 2.0 / np.sqrt(2.0 * np.pi) - 1.0 / np.sqrt(np.pi)
    assert gaussian_mixture_crps(predictive, torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(
        expected, rel=1e-14
    )


def test_collection_equals_explicit_computations_over_batches() -> None:
    predictive, target = mixture(seed=1, samples=4, batch=30, outputs=2)
    mean, var = predictive.mean_samples.numpy(), predictive.variance_samples.numpy()
    std, y = np.sqrt(var), target.numpy()
    expected_nll = -np.mean([mixture_log_density(y[b], mean[:, b], var[:, b]) for b in range(30)])
    expected_rmse = np.sqrt(np.mean((mean.mean(0) - y) ** 2))
    expected_crps = np.mean(
        [crps_by_integration(y[b, d], mean[:, b, d], std[:, b, d]) for b in range(30) for d in range(2)]
    )
    lower = np.array([[mixture_quantile(0.05, mean[:, b, d], std[:, b, d]) for d in range(2)] for b in range(30)])
    upper = np.array([[mixture_quantile(0.95, mean[:, b, d], std[:, b, d]) for d in range(2)] for b in range(30)])
    inside = (y >= lower) & (y <= upper)
    margin = np.minimum(np.abs(y - lower), np.abs(y - upper)).min()
    assert margin > 1e-6  # no target on an interval end, where bisection round-off could flip it
    assert 0.5 < inside.mean() < 1.0

    collection = regression_metrics("test/reg/").set_dtype(torch.float64)
    for chunk in torch.arange(30).split(7):
        part = GaussianPredictive(predictive.mean_samples[:, chunk], predictive.variance_samples[:, chunk])
        collection.update(part, target[chunk])
    values = collection.compute()
    assert set(values) == {"test/reg/nll", "test/reg/rmse", "test/reg/crps", "test/reg/coverage90"}
    assert values["test/reg/nll"].item() == pytest.approx(expected_nll, rel=1e-12)
    assert values["test/reg/rmse"].item() == pytest.approx(expected_rmse, rel=1e-12)
    assert values["test/reg/crps"].item() == pytest.approx(expected_crps, abs=1e-9)
    assert values["test/reg/coverage90"].item() == pytest.approx(inside.mean(), abs=1e-15)


def test_coverage_of_a_calibrated_gaussian_is_near_the_level() -> None:
    """y ~ N(mu, 1), predictive N(mu, 1): coverage ~ Binomial(20000, 0.9)/20000, std 0.0021; allow 5 std."""
    generator = torch.Generator().manual_seed(3)
    mu = torch.randn(1, 20000, 1, generator=generator)
    y = mu[0] + torch.randn(20000, 1, generator=generator)
    metric = IntervalCoverage(level=0.9)
    metric.update(GaussianPredictive(mu, torch.ones_like(mu)), y)
    assert metric.compute().item() == pytest.approx(0.9, abs=5 * np.sqrt(0.9 * 0.1 / 20000))


def test_the_interval_is_closed_at_both_ends() -> None:
    """Targets exactly on their lower and upper bounds (the same quantile computation) count as inside."""
    predictive = GaussianPredictive(
        torch.tensor([[[0.3], [-1.0]]], dtype=torch.float64), torch.tensor([[[0.5], [2.0]]], dtype=torch.float64)
    )
    on_bounds = torch.cat([predictive.quantile(0.05)[:1], predictive.quantile(0.95)[1:]])
    metric = IntervalCoverage(level=0.9)
    metric.update(predictive, on_bounds)
    assert metric.compute().item() == 1.0


def test_one_dimensional_targets_are_accepted_when_d_is_one() -> None:
    predictive = GaussianPredictive(torch.zeros(2, 3, 1), torch.ones(2, 3, 1))
    for metric in (GaussianNLL(), RMSE(), CRPS(), IntervalCoverage()):
        metric.update(predictive, torch.zeros(3))
    rmse = RMSE()
    rmse.update(predictive, torch.tensor([3.0, 4.0, 0.0]))
    assert rmse.compute().item() == pytest.approx(np.sqrt(25.0 / 3.0), rel=1e-6)


def test_wrong_inputs_name_the_argument() -> None:
    predictive = GaussianPredictive(torch.zeros(1, 3, 2), torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match=r"target of shape \[B, D\]=\(3, 2\); got \(3,\)"):
        CRPS().update(predictive, torch.zeros(3))
    with pytest.raises(TypeError, match="GaussianPredictive"):
        GaussianNLL().update(CategoricalPredictive(torch.zeros(1, 3, 2)), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="level must lie in"):
        IntervalCoverage(level=1.5)
    for build in (IntervalCoverage, regression_metrics):  # a str failed in '<' ("not supported between instances")
        with pytest.raises(ValueError, match=r"level must lie in \(0, 1\); got '0.9'"):
            build(level="0.9")  # type: ignore[arg-type]


def test_a_bf16_predictive_is_scored_in_float32():
    """The metrics cast the targets to the predictive's dtype: in bf16, targets near 100 lost their digits (RMSE
    0.378 against 0.298)."""
    generator = torch.Generator().manual_seed(0)
    mean = (100 + torch.randn(3, 40, 1, generator=generator)).bfloat16()
    variance = torch.full((3, 40, 1), 0.25).bfloat16()
    target = 100 + torch.randn(40, 1, generator=generator)
    upcast = GaussianPredictive(mean.float(), variance.float())
    for metric in (RMSE, GaussianNLL, CRPS, IntervalCoverage):
        low, wide = metric(), metric()
        low.update(GaussianPredictive(mean, variance), target)
        wide.update(upcast, target)
        assert float(low.compute()) == float(wide.compute()), metric.__name__
    with pytest.raises(RuntimeError, match="NaN or infinite predictive mean or variance"):
        RMSE().update(GaussianPredictive(torch.full((1, 2, 1), float("nan")), torch.ones(1, 2, 1)), torch.zeros(2, 1))
