"""The reference code's legacy NLL and calibration errors against explicit numpy computations of its definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_bayes.metrics import (
    LegacyExpectedCalibrationError,
    LegacyMaxCalibrationError,
    LegacyNegativeLogLikelihood,
    NegativeLogLikelihood,
    classification_metrics,
)
from lightning_bayes.metrics.legacy import legacy_bin_gaps
from lightning_bayes.predictive import CategoricalPredictive


def reference_calibration(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The reference's procedure in numpy: ``numpy.histogram``'s 100 edges over [0, 1] in the probabilities' dtype,
    ``numpy.digitize`` of the top-label confidence, and bins 0..99 of the digitised index scored (index 100 holds
    [0.99, 1), index 101 exactly 1: both left out); ECE weighs the scored bins by their share of the scored items."""
    edges = np.histogram(probs, 100, range=(0, 1))[1]
    confidence, predicted = probs.max(1), probs.argmax(1)
    index = np.digitize(confidence, edges)
    gaps, counts = np.zeros(100), np.zeros(100)
    for b in range(100):
        members = index == b
        counts[b] = members.sum()
        if counts[b]:
            gaps[b] = abs((predicted[members] == labels[members]).mean() - confidence[members].mean())
    ece = (gaps * counts).sum() / counts.sum() if counts.sum() else float("nan")
    return float(ece), float(gaps.max())


def spread_problem(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit samples ``[3, 400, 4]`` whose model-average confidences cover [0.25, 1], with about a fifth at or above
    0.99 (some exactly 1: saturated softmax), and labels agreeing with the top class about 70% of the time."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.0, 12.0, 400, dtype=torch.float64).reshape(1, 400, 1)
    base = torch.randn(1, 400, 4, generator=generator, dtype=torch.float64) * scale
    logits = base + 0.5 * torch.randn(3, 400, 4, generator=generator, dtype=torch.float64)  # samples that disagree
    logits[:, :10, 2] += 1000.0
    top = torch.softmax(logits, -1).mean(0).argmax(-1)
    other = torch.randint(0, 4, (400,), generator=generator)
    labels = torch.where(torch.rand(400, generator=generator) < 0.7, top, other)
    return logits.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_legacy_calibration_errors_equal_the_reference_procedure(seed: int, dtype: torch.dtype) -> None:
    logits, labels = spread_problem(seed, dtype)
    predictive = CategoricalPredictive(logits)
    confidence = predictive.probs.max(-1).values
    assert 40 < int((confidence >= 0.99).sum()) < 200 and int((confidence == 1.0).sum()) >= 10  # some are dropped
    expected_ece, expected_mce = reference_calibration(predictive.probs.numpy(), labels.numpy())
    ece, mce = LegacyExpectedCalibrationError(), LegacyMaxCalibrationError()
    for metric in (ece, mce):
        for chunk in torch.arange(400).split(64):  # cat states: batches pool to the whole set
            metric.update(CategoricalPredictive(logits[:, chunk]), labels[chunk])
    # our bin means are float64 sums; numpy's of float32 confidences are float32 ones (relative error ~1e-7)
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    assert ece.compute().item() == pytest.approx(expected_ece, rel=rel)
    assert mce.compute().item() == pytest.approx(expected_mce, rel=rel)
    # dropping the confident predictions is what makes it differ from 100 bins over all of them
    every = classification_metrics(n_bins=100)["ece"]
    every.update(predictive, labels)
    assert abs(every.compute().item() - expected_ece) > 1e-3


def test_the_bins_edges_are_numpys_in_the_confidences_float_type() -> None:
    """Confidences at and one float32 step below the edges 0.99 and 0.07 fall as ``numpy.digitize`` puts them against
    ``numpy.histogram``'s float32 edges (``[edge_k, edge_k+1)``): below 0.99 in the last scored bin, at it dropped."""
    edges = np.histogram(np.zeros(1, np.float32), 100, range=(0, 1))[1]
    assert edges.dtype == np.float32
    below = np.nextafter(edges, np.float32(0))
    confidences = np.concatenate([edges[1:], below[1:]])  # every edge and the float32 just below it
    expected = np.bincount(np.digitize(confidences, edges), minlength=102)[1:100]  # index 0 lies below 0
    gaps, counts = legacy_bin_gaps(torch.from_numpy(confidences), torch.ones(len(confidences), dtype=torch.long))
    assert counts.tolist() == expected.tolist()
    assert counts[98] == 2 and counts.sum() == 2 * 99 - 1  # 0.98 and just below 0.99; 0.99 and above dropped
    assert gaps[98] == pytest.approx(1 - (float(edges[98]) + float(below[99])) / 2, rel=1e-12)


def test_all_confident_gives_nan_ece_and_zero_mce() -> None:
    logits = torch.tensor([[[1000.0, 0.0], [0.0, 9.0]]])  # confidences 1 and 0.99988
    ece, mce = LegacyExpectedCalibrationError(), LegacyMaxCalibrationError()
    for metric in (ece, mce):
        metric.update(CategoricalPredictive(logits), torch.tensor([0, 0]))
    assert torch.isnan(ece.compute()) and mce.compute().item() == 0.0


def test_legacy_nll_averages_the_per_sample_nlls() -> None:
    logits, labels = spread_problem(3, torch.float64)
    per_sample = torch.log_softmax(logits, -1)[:, torch.arange(400), labels]  # [S, B]
    expected = -per_sample.mean().item()
    metric = LegacyNegativeLogLikelihood().set_dtype(torch.float64)
    for chunk in torch.arange(400).split(64):
        metric.update(CategoricalPredictive(logits[:, chunk]), labels[chunk])
    assert metric.compute().item() == pytest.approx(expected, rel=1e-12)
    average = NegativeLogLikelihood().set_dtype(torch.float64)
    average.update(CategoricalPredictive(logits), labels)
    assert average.compute().item() < expected - 0.02  # Jensen: the model average's NLL is lower (here by 0.04)
    one, one_average = LegacyNegativeLogLikelihood().set_dtype(torch.float64), NegativeLogLikelihood()
    one.update(CategoricalPredictive(logits[:1]), labels)
    one_average.set_dtype(torch.float64).update(CategoricalPredictive(logits[:1]), labels)
    assert one.compute().item() == pytest.approx(one_average.compute().item(), rel=1e-12)  # equal at S = 1
