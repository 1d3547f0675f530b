"""Classification metrics against explicit numpy computations on random logit samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metric_references import classification

from lightning_bayes.metrics import (
    CRPS,
    RMSE,
    Accuracy,
    AdaptiveCalibrationError,
    BrierScore,
    ExpectedCalibrationError,
    GaussianNLL,
    IntervalCoverage,
    MaxCalibrationError,
    MeanEntropy,
    MeanMutualInformation,
    NegativeLogLikelihood,
    classification_metrics,
)
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive

METRICS = {
    "acc": Accuracy,
    "nll": NegativeLogLikelihood,
    "brier": BrierScore,
    "ece": ExpectedCalibrationError,
    "mce": MaxCalibrationError,
    "aece": AdaptiveCalibrationError,
    "entropy": MeanEntropy,
    "mi": MeanMutualInformation,
}


def random_problem(
    seed: int = 0, samples: int = 4, batch: int = 203, classes: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 logits ``[S, B, C]`` with varied confidence (some saturated to probability exactly 1) and labels."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 6.0, batch, dtype=torch.float64).reshape(1, batch, 1)
    logits = torch.randn(samples, batch, classes, generator=generator, dtype=torch.float64) * scale
    logits[:, :7, 0] += 1000.0  # softmax saturates: confidence is exactly 1.0 for the first 7 examples
    labels = torch.randint(0, classes, (batch,), generator=generator)
    labels[:3] = 0  # saturated and right; examples 3..6 are saturated and (most likely) wrong
    return logits, labels


@pytest.mark.parametrize("name", list(METRICS))
def test_metric_equals_numpy_over_several_batches(name: str) -> None:
    logits, labels = random_problem()
    expected = classification(logits.numpy(), labels.numpy())[name]
    metric = METRICS[name]().set_dtype(torch.float64)
    for chunk in torch.arange(len(labels)).split(50):  # batches of 50, 50, 50, 50, 3
        metric.update(CategoricalPredictive(logits[:, chunk]), labels[chunk])
    # float64 states throughout: agreement to round-off
    assert metric.compute().item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_saturated_confidence_counts_in_the_last_bin() -> None:
    """Confidence exactly 1 joins [14/15, 1] as in the standard definition, not a 16th bin of its own.

    10 examples at confidence 0.95, all right, and 10 saturated at 1.0, half right, share the last bin:
    ECE = |15/20 - 0.975| = 0.225 (a separate bin for 1.0 would give 0.5 * 0.05 + 0.5 * 0.5 = 0.275).
    """
    confident = torch.log(torch.tensor([0.95, 0.05], dtype=torch.float64)).expand(10, 2)
    saturated = torch.tensor([1000.0, 0.0], dtype=torch.float64).expand(10, 2)
    logits = torch.cat([confident, saturated]).unsqueeze(0)
    labels = torch.tensor([0] * 10 + [0, 1] * 5)
    assert (torch.softmax(logits[0, 10:], -1).max(-1).values == 1.0).all()
    ece, mce = ExpectedCalibrationError().set_dtype(torch.float64), MaxCalibrationError().set_dtype(torch.float64)
    for metric in (ece, mce):
        metric.update(CategoricalPredictive(logits), labels)
    assert ece.compute().item() == pytest.approx(0.225, rel=1e-12)
    assert mce.compute().item() == pytest.approx(0.225, rel=1e-12)


def test_float32_inputs_agree_with_float64_reference() -> None:
    """The default float32 states: accumulation over 203 examples loses at most ~203 * 2^-24 relative."""
    logits, labels = random_problem(seed=1)
    expected = classification(logits.numpy(), labels.numpy())
    collection = classification_metrics("val/cal/")
    collection.update(CategoricalPredictive(logits.float()), labels)
    values = collection.compute()
    assert set(values) == {f"val/cal/{name}" for name in METRICS}
    for name in ("acc", "nll", "brier", "entropy", "mi", "aece", "ece", "mce"):
        assert values[f"val/cal/{name}"].item() == pytest.approx(expected[name], rel=2e-5, abs=2e-6), name


def test_accuracy_and_nll_known_values() -> None:
    """Two samples that disagree: the average decides (accuracy) and NLL is of the average, not averaged."""
    logits = torch.log(torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.6, 0.4]]], dtype=torch.float64))
    labels = torch.tensor([0, 0])
    # averages: [0.7, 0.3] (right), [0.4, 0.6] (wrong)
    accuracy, nll = Accuracy(), NegativeLogLikelihood().set_dtype(torch.float64)
    accuracy.update(CategoricalPredictive(logits), labels)
    nll.update(CategoricalPredictive(logits), labels)
    assert accuracy.compute().item() == 0.5
    assert nll.compute().item() == pytest.approx(-(np.log(0.7) + np.log(0.4)) / 2, rel=1e-12)


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_adaptive_bins_put_wrong_before_right_among_equal_confidences(order: list[int]) -> None:
    """Three predictions at confidence 0.8, two wrong, one right, in 2 equal-mass bins (sizes 2 and 1): wrong first
    gives bins (W, W | R) and (2 * 0.8 + 0.2) / 3 = 0.6, in any arrival order (right first would give 0.4667)."""
    logits = torch.log(torch.tensor([[0.8, 0.2]] * 3, dtype=torch.float64)).unsqueeze(0)
    labels = torch.tensor([1, 1, 0])[order]
    aece = AdaptiveCalibrationError(n_bins=2).set_dtype(torch.float64)
    aece.update(CategoricalPredictive(logits), labels)
    assert aece.compute().item() == pytest.approx(0.6, rel=1e-12)


def test_brier_of_a_perfect_and_a_uniform_prediction() -> None:
    logits = torch.tensor([[[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    brier = BrierScore()
    brier.update(CategoricalPredictive(logits), torch.tensor([0, 2]))
    # perfect: 0; uniform over 3 with label 2: (1/3)^2 * 2 + (2/3)^2 = 2/3
    assert brier.compute().item() == pytest.approx((0.0 + 2.0 / 3.0) / 2, rel=1e-6)


def test_wrong_inputs_name_the_argument() -> None:
    predictive = CategoricalPredictive(torch.zeros(1, 4, 3))
    with pytest.raises(TypeError, match="CategoricalPredictive"):
        Accuracy().update(GaussianPredictive(torch.zeros(1, 4, 1), torch.ones(1, 4, 1)), torch.zeros(4))
    with pytest.raises(ValueError, match=r"integer class labels of shape \[B\]=\(4,\)"):
        ExpectedCalibrationError().update(predictive, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class labels"):
        BrierScore().update(predictive, torch.zeros(4))


@pytest.mark.parametrize("metric", [ExpectedCalibrationError, MaxCalibrationError, AdaptiveCalibrationError, Accuracy,
                                    NegativeLogLikelihood, BrierScore, MeanEntropy, MeanMutualInformation, RMSE,
                                    GaussianNLL, CRPS, IntervalCoverage])
def test_a_metric_of_no_examples_says_so(metric: type) -> None:
    """torchmetrics alone raised "No samples to concatenate" (calibration errors), which names neither the metric nor
    the cause, or gave NaN (means, RMSE)."""
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(
        ValueError, match=f"{metric.__name__}.compute needs at least one example"
    ):
        metric().compute()


def test_adaptive_calibration_with_fewer_examples_than_bins() -> None:
    """3 examples, 15 bins: each example is its own bin, so adaptive ECE = mean |correct - confidence|."""
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0])  # right (0.6), wrong (0.7), right (0.9)
    metric = AdaptiveCalibrationError().set_dtype(torch.float64)
    metric.update(CategoricalPredictive(probs.log().unsqueeze(0)), labels)
    assert metric.compute().item() == pytest.approx((0.4 + 0.7 + 0.1) / 3, rel=1e-12)


def test_a_class_of_probability_zero_adds_no_entropy():
    """A logit of -inf (a masked class) gave 0 * -inf = NaN entropy and mutual information."""
    predictive = CategoricalPredictive(torch.tensor([[[0.0, -float("inf")], [0.0, 1.0]]], dtype=torch.float64))
    p = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    expected = torch.stack([torch.zeros((), dtype=torch.float64), -(p * p.log() + (1 - p) * (1 - p).log())])
    torch.testing.assert_close(predictive.entropy, expected, rtol=1e-14, atol=0)
    assert predictive.mutual_information.abs().max() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_infinite_logits_and_labels_outside_the_classes_are_refused(bad: float):
    """NaN logits left ECE and MCE finite and wrong (torchmetrics squashed the batch through a sigmoid); a label 10
    of 10 classes counted as wrong in accuracy and broke NLL with an indexing error."""
    logits = torch.zeros(2, 3, 10)
    logits[0, 1, 2] = bad
    with pytest.raises(RuntimeError, match="got NaN or \\+inf logits"):
        ExpectedCalibrationError().update(CategoricalPredictive(logits), torch.zeros(3, dtype=torch.long))
    clean = CategoricalPredictive(torch.zeros(2, 3, 10))
    for label in (-1, 10):
        with pytest.raises(RuntimeError, match=r"expects labels in \[0, 10\)"):
            Accuracy().update(clean, torch.tensor([0, label, 1]))
    with pytest.raises(ValueError, match="integer class labels"):
        Accuracy().update(clean, torch.ones(3, dtype=torch.bool))
    CategoricalPredictive(torch.full((2, 3, 10), -float("inf")).index_fill(-1, torch.tensor([0]), 0.0))  # fine


def test_adaptive_ece_does_not_depend_on_the_order_of_tied_examples():
    """Tied confidences were binned by arrival order, which under DDP is rank by rank (0.5 against 0.2749 here)."""
    confident = torch.tensor([[10.0, 0.0]]).expand(8, 2)
    unsure = torch.stack([torch.linspace(0.1, 0.8, 8), torch.zeros(8)], -1)
    logits = torch.cat([confident, unsure]).unsqueeze(0)
    labels = torch.tensor([0] * 4 + [1] * 4 + [0, 1, 1, 0, 0, 1, 0, 1])  # the tied ones: 4 right, then 4 wrong
    interleaved = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7, *range(8, 16)])
    values = []
    for order in (torch.arange(16), torch.arange(16).flip(0), interleaved):
        metric = AdaptiveCalibrationError(n_bins=4)
        metric.update(CategoricalPredictive(logits[:, order]), labels[order])
        values.append(float(metric.compute()))
    assert values[0] == values[1] == values[2]


def test_a_synced_state_of_one_example_is_scored() -> None:
    """Under DDP ``compute`` sees each ``cat`` state gathered into one tensor, not a list: one pooled example (the
    other ranks had none) is enough to compute, as it is on one process."""
    metric = ExpectedCalibrationError(n_bins=10, sync_on_compute=False)
    metric.update(CategoricalPredictive(torch.tensor([[[2.0, 0.0]]])), torch.tensor([1]))
    metric.sync(dist_sync_fn=lambda tensor, group=None: [tensor], distributed_available=lambda: True)  # one rank
    assert isinstance(metric.confidences, torch.Tensor) and metric.confidences.numel() == 1
    confidence = torch.tensor([2.0, 0.0]).softmax(-1)[0].item()
    assert metric.compute().item() == pytest.approx(confidence)  # wrong with certainty `confidence`
