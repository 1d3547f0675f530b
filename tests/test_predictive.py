"""Identities of the Predictive types against explicit numpy / scipy computations."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch
from scipy import integrate, optimize
from scipy.special import logsumexp
from scipy.stats import norm

from lightning_bayes.metrics import classification_metrics, ood_metrics
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive, concatenate


def categorical(seed: int = 0) -> CategoricalPredictive:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, 40, 1, generator=generator, dtype=torch.float64) * 5
    return CategoricalPredictive(torch.randn(6, 40, 4, generator=generator, dtype=torch.float64) * scale)


def gaussian(seed: int = 0, samples: int = 4, weight_variances: bool = False) -> GaussianPredictive:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(samples, 10, 2, generator=generator, dtype=torch.float64) * 2
    variance = 0.1 + torch.rand(samples, 10, 2, generator=generator, dtype=torch.float64)
    share = torch.rand(samples, 10, 2, generator=generator, dtype=torch.float64)
    return GaussianPredictive(mean, variance, variance * share if weight_variances else None)


def test_categorical_probabilities_are_the_model_average() -> None:
    predictive = categorical()
    logits = predictive.logits.numpy()
    per_sample = np.exp(logits - logsumexp(logits, -1, keepdims=True))
    np.testing.assert_allclose(predictive.probs.numpy(), per_sample.mean(0), rtol=1e-12)
    y = torch.arange(40) % 4
    np.testing.assert_allclose(
        predictive.log_prob(y).numpy(), np.log(per_sample.mean(0)[np.arange(40), y.numpy()]), rtol=1e-12
    )


def test_mutual_information_is_entropy_minus_expected_entropy_and_nonnegative() -> None:
    predictive = categorical(1)
    logits = predictive.logits.numpy()
    per_sample = np.exp(logits - logsumexp(logits, -1, keepdims=True))
    bma = per_sample.mean(0)
    total = -(bma * np.log(bma)).sum(-1)
    aleatoric = -(per_sample * np.log(per_sample)).sum(-1).mean(0)
    np.testing.assert_allclose(predictive.entropy.numpy(), total, rtol=1e-12)
    np.testing.assert_allclose(predictive.expected_entropy.numpy(), aleatoric, rtol=1e-12)
    np.testing.assert_allclose(predictive.mutual_information.numpy(), total - aleatoric, atol=1e-12)
    assert (predictive.mutual_information >= 0).all()
    # one sample: no epistemic part
    assert torch.equal(
        CategoricalPredictive(predictive.logits[:1]).mutual_information, torch.zeros(40, dtype=torch.float64)
    )


def test_mixture_variance_is_mean_of_variances_plus_variance_of_means() -> None:
    """Against the mixture's second moment ``E[X^2] = mean_s (v_s + mu_s^2)`` and against quadrature."""
    predictive = gaussian()
    mean, var = predictive.mean_samples.numpy(), predictive.variance_samples.numpy()
    second_moment = (var + mean**2).mean(0)
    np.testing.assert_allclose(predictive.mean.numpy(), mean.mean(0), rtol=1e-12)
    np.testing.assert_allclose(predictive.variance.numpy(), second_moment - mean.mean(0) ** 2, rtol=1e-10)
    m, s = mean[:, 0, 0], np.sqrt(var[:, 0, 0])
    mu = integrate.quad(lambda z: z * norm.pdf(z, m, s).mean(), -40, 40, epsabs=1e-12)[0]
    variance = integrate.quad(lambda z: (z - mu) ** 2 * norm.pdf(z, m, s).mean(), -40, 40, epsabs=1e-12)[0]
    assert predictive.variance[0, 0].item() == pytest.approx(variance, rel=1e-9)


@pytest.mark.parametrize("samples", [1, 4])
def test_quantile_inverts_the_cdf(samples: int) -> None:
    predictive = gaussian(2, samples)
    mean, std = predictive.mean_samples.numpy(), predictive.variance_samples.sqrt().numpy()
    for q in (0.05, 0.5, 0.9):
        quantile = predictive.quantile(q)
        np.testing.assert_allclose(predictive.cdf(quantile).numpy(), q, atol=1e-12)
        for b, d in ((0, 0), (3, 1), (9, 1)):
            m, s = mean[:, b, d], std[:, b, d]
            expected = optimize.brentq(lambda z, m=m, s=s, q=q: norm.cdf(z, m, s).mean() - q, -30, 30, xtol=1e-14)
            assert quantile[b, d].item() == pytest.approx(expected, abs=1e-10)


def test_a_far_tail_quantile_is_finite_in_float32() -> None:
    """``erfinv(2q - 1)`` met 2q - 1 rounded to -1 in float32 below q = 3e-8: -inf at q = 1e-8 (exactly -5.6120)."""
    standard = GaussianPredictive(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    for q in (1e-8, 1e-7, 0.05):  # (near 1, float32 itself keeps q only to 6e-8)
        assert standard.quantile(q).item() == pytest.approx(norm.ppf(q), rel=2e-6)


def test_gaussian_log_prob_equals_the_explicit_mixture_density() -> None:
    predictive = gaussian(3)
    y = torch.linspace(-2, 2, 20, dtype=torch.float64).reshape(10, 2)
    np.testing.assert_allclose(predictive.log_prob(y).numpy(), np.log(density_of(predictive, y)), rtol=1e-12)
    scalar = GaussianPredictive(predictive.mean_samples[..., :1], predictive.variance_samples[..., :1])
    targets = y[:, 0]  # a one-output model accepts [B] targets as [B, 1]
    np.testing.assert_allclose(scalar.log_prob(targets).numpy(), np.log(density_of(scalar, targets[:, None])), rtol=1e-12)
    with pytest.raises(ValueError, match=r"y must have shape \[B, D\]"):
        predictive.log_prob(y[:, 0])


def density_of(predictive: GaussianPredictive, y: torch.Tensor) -> np.ndarray:
    mean, std = predictive.mean_samples.numpy(), predictive.variance_samples.sqrt().numpy()
    return np.prod(norm.pdf(y.numpy(), mean, std), axis=-1).mean(0)


def test_a_closed_form_predictives_weight_variance_is_epistemic() -> None:
    """``w_s`` of each component's variance ``v_s`` is the weights' share: epistemic ``Var_s mu_s + E_s w_s``,
    aleatoric ``E_s (v_s - w_s)``, the total unchanged; kept through every way a predictive is rebuilt, and pooled
    with zeros for members that have none."""
    plain, split = gaussian(samples=3), gaussian(samples=3, weight_variances=True)
    mean, variance, weight = split.mean_samples, split.variance_samples, split.weight_variance_samples
    torch.testing.assert_close(split.epistemic_variance, mean.var(0, unbiased=False) + weight.mean(0), rtol=0, atol=0)
    torch.testing.assert_close(split.aleatoric_variance, (variance - weight).mean(0), rtol=0, atol=0)
    torch.testing.assert_close(split.variance, plain.variance, rtol=1e-14, atol=0)
    assert torch.equal(split.first_examples(4).weight_variance_samples, weight[:, :4])
    assert torch.equal(split.detach().weight_variance_samples, weight)
    assert split.to(torch.float32).weight_variance_samples.dtype == torch.float32
    pooled = concatenate([split, plain])
    assert torch.equal(pooled.weight_variance_samples, torch.cat([weight, torch.zeros_like(weight)]))
    assert concatenate([plain, plain]).weight_variance_samples is None
    with pytest.raises(ValueError, match=r"weight_variance_samples must match mean_samples \(3, 10, 2\); got "
                       r"\(3, 10\)"):
        GaussianPredictive(mean, variance, weight[..., 0])


def test_concatenate_pools_samples_into_one_mixture() -> None:
    first, second = gaussian(0, 2), gaussian(1, 3)
    pooled = concatenate([first, second])
    assert pooled.num_samples == 5
    expected = (2 * first.mean + 3 * second.mean) / 5
    np.testing.assert_allclose(pooled.mean.numpy(), expected.numpy(), rtol=1e-12)
    with pytest.raises(TypeError, match="different types"):
        concatenate([first, categorical()])


def test_to_moves_every_tensor_and_lightning_moves_predictives_with_it() -> None:
    from lightning.fabric.utilities import move_data_to_device

    for predictive in (categorical(), gaussian(weight_variances=True)):
        cast = predictive.to(torch.float32)
        assert type(cast) is type(predictive)
        for name, value in vars(cast).items():
            assert value.dtype == torch.float32 and torch.equal(value, getattr(predictive, name).float()), name
        moved = move_data_to_device([predictive], torch.device("cpu"))[0]  # the predict loop's transfer
        assert all(torch.equal(value, getattr(predictive, name)) for name, value in vars(moved).items())


def test_model_average_probabilities_never_exceed_one() -> None:
    """``exp(logsumexp - log S)`` of 7 agreeing confident samples rounded to 1.0000001 in float32, which the
    reliability diagram then refused as a confidence."""
    predictive = CategoricalPredictive(torch.tensor([[[100.0, 0.0, 0.0]]]).repeat(7, 1, 1))
    assert predictive.max_prob.item() == 1.0 and predictive.log_probs.max().item() == 0.0


def test_class_labels_must_be_integers_in_range() -> None:
    """A float label 0.7 was read as class 0 (``long()`` truncates) by the predictive and the training loss."""
    from lightning_bayes.inference.likelihoods import CategoricalLikelihood

    predictive, logits = CategoricalPredictive(torch.zeros(2, 3, 4)), torch.zeros(3, 4)
    for bad in (torch.tensor([0.7, 1.9, 3.2]), torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match=r"log_prob\(y\) expects integer class labels of shape \[B\]=\(3,\)"):
            predictive.log_prob(bad)
        with pytest.raises(ValueError, match="CategoricalLikelihood.loss expects integer class labels"):
            CategoricalLikelihood().loss(logits, bad)
    with pytest.raises(RuntimeError, match=r"log_prob\(y\) expects labels in \[0, 4\) \(the network gives 4 outputs\)"):
        predictive.log_prob(torch.tensor([0, 4, 1]))
    for bad in (-1, -100, 4):  # -100 is cross_entropy's default ignore_index: it was skipped, not refused
        with pytest.raises(RuntimeError, match=r"CategoricalLikelihood.loss expects labels in \[0, 4\)"):
            CategoricalLikelihood().loss(logits, torch.tensor([0, bad, 1]))
    assert predictive.log_prob(torch.tensor([0, 3, 1], dtype=torch.int32)).dtype == torch.float32


def test_gaussian_metrics_refuse_non_positive_variances_and_the_predictive_computes_in_float32() -> None:
    """Variance 0 or -1 gave NaN log densities and quantiles silently; a bf16 predictive computed its log density in
    bf16 (-6.375 against -6.3572 for the same bf16 inputs in float64)."""
    from lightning_bayes.metrics import GaussianNLL

    mean = torch.zeros(1, 2, 1)
    for bad in (0.0, -1.0):
        with pytest.raises(RuntimeError, match="GaussianNLL.update got a predictive variance of 0 or less"):
            GaussianNLL().update(GaussianPredictive(mean, torch.full_like(mean, bad)), torch.zeros(2))
    mixed = GaussianPredictive(mean, torch.ones(1, 2, 1, dtype=torch.float64))
    assert mixed.mean_samples.dtype == mixed.variance_samples.dtype == torch.float64
    integer = GaussianPredictive(torch.zeros(1, 2, 1, dtype=torch.long), torch.ones(1, 2, 1, dtype=torch.long))
    assert integer.variance_samples.dtype == torch.get_default_dtype()
    variances = torch.rand(3, 1, 2, 1) + 0.5  # under vmap (a torch.func transform over the variances)
    log_probs = torch.vmap(lambda v: GaussianPredictive(mean, v).log_prob(torch.zeros(2)))(variances)
    torch.testing.assert_close(log_probs[1], GaussianPredictive(mean, variances[1]).log_prob(torch.zeros(2)))
    mean16, variance16 = torch.tensor([[[3.3]]], dtype=torch.bfloat16), torch.tensor([[[0.01]]], dtype=torch.bfloat16)
    half = GaussianPredictive(mean16, variance16)
    wide = GaussianPredictive(mean16.double(), variance16.double())
    y = torch.tensor([[0.0]])
    assert half.mean_samples.dtype == half.variance_samples.dtype == torch.float32
    torch.testing.assert_close(half.log_prob(y).double(), wide.log_prob(y), rtol=1e-6, atol=0)


def test_gaussian_loss_refuses_targets_of_another_layout() -> None:
    """A transposed [D, B] target was reshaped to [B, D] and trained on scrambled (x, y) pairs."""
    from lightning_bayes.inference.likelihoods import GaussianLikelihood

    likelihood, outputs = GaussianLikelihood(output_dim=2), torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"expects y of the means' shape \[B, D\]=\(3, 2\).*got \(2, 3\)"):
        likelihood.loss(outputs, torch.zeros(2, 3))
    single = GaussianLikelihood(output_dim=1)
    outputs = torch.zeros(3, 1)
    torch.testing.assert_close(single.loss(outputs, torch.ones(3)), single.loss(outputs, torch.ones(3, 1)))


def test_categorical_log_probabilities_are_computed_once_for_a_whole_metric_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every metric of the collection and the OOD score read one log-softmax; where a gradient is wanted it is
    computed afresh (the metrics' kept values have no graph), also after a backward pass."""
    calls = []
    log_softmax = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda *args, **kwargs: calls.append(1) or log_softmax(*args, **kwargs))
    logits = categorical().logits.requires_grad_()
    predictive, y = CategoricalPredictive(logits), torch.arange(40) % 4
    classification_metrics().update(predictive, y)
    ood_metrics(score="mutual_information").update(predictive, False)
    assert len(calls) == 1
    (gradient,) = torch.autograd.grad(-predictive.log_prob(y).sum(), logits)
    per_sample = logits.detach().softmax(-1)  # d(-log mean_s p_s(y)) / dz_s = w_s (p_s - onehot(y)), w_s ∝ p_s(y)
    picked = per_sample[:, torch.arange(40), y]
    weights = (picked / picked.sum(0)).unsqueeze(-1)
    expected = weights * (per_sample - torch.nn.functional.one_hot(y, 4).to(per_sample))
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-14)
    (again,) = torch.autograd.grad(-predictive.log_prob(y).sum(), logits)
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=1e-14)


def test_categorical_values_are_not_kept_where_they_could_not_be_used_later(fresh_dynamo: None) -> None:
    """Nothing is kept while torch.compile traces (it cannot replay the write: a compiled validation step failed),
    inside a torch.func transform (its wrapped tensors die with it) or under inference mode for outside logits (an
    inference tensor cannot be saved for a later backward); detach() of logits without a graph keeps what is kept."""
    logits, y = categorical().logits, torch.arange(40) % 4

    def evaluate(z: torch.Tensor) -> tuple[CategoricalPredictive, torch.Tensor]:  # the shape of a validation step
        predictive = CategoricalPredictive(z)
        return predictive, -predictive.log_prob(y).mean()

    compiled, nll = torch.compile(evaluate)(logits)
    torch.testing.assert_close(nll, evaluate(logits)[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(compiled.log_probs, evaluate(logits)[0].log_probs, rtol=0, atol=0)
    outside = CategoricalPredictive(logits)
    torch.func.vmap(lambda a: outside.log_probs.sum() * a)(torch.ones(3))
    assert "log_probs" not in outside.__dict__
    trainable = logits.clone().requires_grad_()
    predictive = CategoricalPredictive(trainable)
    with torch.inference_mode():
        assert predictive.entropy.is_inference()
    (gradient,) = torch.autograd.grad(predictive.entropy.sum(), trainable)
    assert torch.isfinite(gradient).all() and "entropy" not in predictive.__dict__
    kept = CategoricalPredictive(logits)
    assert kept.log_probs is kept.log_probs and kept.detach() is kept and predictive.detach() is not predictive


def test_a_pickled_categorical_predictive_holds_its_logits_alone() -> None:
    """What a read keeps is left out of a pickle (and a copy): a read predictive pickled at twice its logits' size."""
    predictive = categorical()
    fresh = len(pickle.dumps(predictive))
    classification_metrics().update(predictive, torch.arange(40) % 4)
    assert "log_probs_per_sample" in vars(predictive) and len(pickle.dumps(predictive)) == fresh
    restored = pickle.loads(pickle.dumps(predictive))
    assert set(vars(restored)) == {"logits"} and torch.equal(restored.logits, predictive.logits)
    torch.testing.assert_close(restored.log_probs, predictive.log_probs, rtol=0, atol=0)
    assert set(vars(copy.deepcopy(predictive))) == {"logits"}

    @dataclasses.dataclass(frozen=True)
    class Tempered(CategoricalPredictive):  # a subclass's fields are pickled too
        temperature: float = 1.0

    assert copy.deepcopy(Tempered(predictive.logits, temperature=2.0)).temperature == 2.0  # through __getstate__


def test_an_affine_map_of_a_gaussian_mixture_changes_its_density_by_the_jacobian():
    """``shift + scale y``: means ``shift + scale mu``, variances and their weight part times ``scale^2``; the
    density at the mapped point is the density at ``y`` over ``scale`` (per output)."""
    generator = torch.Generator().manual_seed(0)
    mean, variance = torch.randn(3, 5, 2, generator=generator), torch.rand(3, 5, 2, generator=generator) + 0.1
    predictive = GaussianPredictive(mean, variance, 0.5 * variance)
    shift, scale = torch.tensor([-28.5, 3.0]), torch.tensor([49.5, 0.2])
    mapped = predictive.affine(shift, scale)
    y = torch.randn(5, 2, generator=generator)
    torch.testing.assert_close(mapped.log_prob(shift + scale * y), predictive.log_prob(y) - scale.log().sum())
    torch.testing.assert_close(mapped.mean, shift + scale * predictive.mean)
    torch.testing.assert_close(mapped.epistemic_variance, scale**2 * predictive.epistemic_variance)
    with pytest.raises(ValueError, match="scale must be > 0"):
        predictive.affine(0.0, torch.tensor([1.0, 0.0]))
