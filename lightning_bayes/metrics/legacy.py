"""The legacy metrics of the VIKING and null-space Laplace reference code, for reproducing its tables only.

Our metrics score the Bayesian model average with 15 equal-width bins over every prediction
(:mod:`~lightning_bayes.metrics.classification`). The reference evaluation (``vp/eval.py`` and
``vp/ood_functions/metrics.py`` of eugene/viking-paper-experiments, adapted from laplace-redux) differs twice:

* ``LegacyNegativeLogLikelihood``: ``-1/N sum_n 1/S sum_s log p_s(y_n|x_n)``, the per-sample NLL averaged over the
  samples, which is at least the model average's ``-1/N sum_n log 1/S sum_s p_s(y_n|x_n)`` (Jensen); equal at S = 1.
* ``LegacyExpectedCalibrationError`` / ``LegacyMaxCalibrationError``: 100 equal-width bins of the top-label
  confidence of the model average, whose edges are ``numpy.histogram``'s (``k * 0.01`` in the confidences' float
  type; a confidence falls in ``[edge_k, edge_{k+1})``), of which only the first 99 are scored: every prediction at
  a confidence of ``edge_99`` (0.99) or more is dropped. ECE is ``sum_b (n_b / N_kept) |acc_b - conf_b|`` over the
  kept predictions (NaN when none is kept, as the reference's ``numpy.average``), MCE the largest
  ``|acc_b - conf_b|`` over the 99 bins, an empty bin counting 0.

Dropping the confident predictions is why the reference's MAP on MNIST reports an ECE of 0.247 (Fadel et al.,
VIKING, NeurIPS 2025, main table): what is left are the hard examples. Use these only next to the paper's numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..predictive import CategoricalPredictive
from ._inputs import categorical, class_labels, pooled
from ._mean import MeanOverValues
from .classification import _TopLabelCalibrationError

LEGACY_BINS = 100  # the reference's M
LEGACY_SCORED_BINS = 99  # its loop scores digitize indices 0..99, i.e. the bins below the edge at 0.99


class LegacyNegativeLogLikelihood(MeanOverValues):
    """Mean over examples of ``-1/S sum_s log p_s(y|x)``, the reference's NLL (not the model average's)."""

    higher_is_better = False

    def update(self, predictive: CategoricalPredictive, target: Tensor) -> None:  # type: ignore[override]
        predictive = categorical(predictive, type(self).__name__)
        labels = class_labels(predictive, target, type(self).__name__)
        per_sample = predictive.log_probs_per_sample  # [S, B, C]
        index = labels.expand(per_sample.shape[0], -1).unsqueeze(-1)
        super().update(-per_sample.gather(-1, index).squeeze(-1).mean(0))


def legacy_bin_gaps(confidences: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """``(|acc_b - conf_b|, n_b)`` of the reference's 99 scored bins (``[99]`` each; an empty bin's gap is 0)."""
    edges = (torch.arange(LEGACY_BINS + 1, dtype=torch.float64) * 0.01).to(confidences)
    edges[-1] = 1.0
    index = torch.bucketize(confidences, edges, right=True) - 1  # edge_k <= c < edge_{k+1}, as numpy.digitize
    kept = (index >= 0) & (index < LEGACY_SCORED_BINS)
    index, confidences, correct = index[kept], confidences[kept].double(), correct[kept].double()
    counts = torch.zeros(LEGACY_SCORED_BINS, dtype=torch.float64, device=confidences.device)
    counts.index_add_(0, index, torch.ones_like(confidences))
    sums = torch.zeros(2, LEGACY_SCORED_BINS, dtype=torch.float64, device=confidences.device)
    sums.index_add_(1, index, torch.stack([confidences, correct]))
    means = sums / counts.clamp_min(1.0)
    return (means[0] - means[1]).abs(), counts


class _LegacyCalibrationError(_TopLabelCalibrationError):
    """The reference's top-label calibration error over its 99 scored bins (confidence and correctness kept as
    torchmetrics ``cat`` states, so the value under DDP is the pooled one)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(n_bins=LEGACY_BINS, norm="l1", **kwargs)

    def _gaps(self) -> tuple[Tensor, Tensor]:
        confidences = pooled(self.confidences, type(self).__name__)
        return legacy_bin_gaps(confidences, pooled(self.accuracies, type(self).__name__))


class LegacyExpectedCalibrationError(_LegacyCalibrationError):
    """``sum_b (n_b / N_kept) |acc_b - conf_b|`` over the bins below a confidence of 0.99 (NaN if all are above)."""

    def compute(self) -> Tensor:
        gaps, counts = self._gaps()
        return (gaps * counts).sum() / counts.sum()


class LegacyMaxCalibrationError(_LegacyCalibrationError):
    """``max_b |acc_b - conf_b|`` over the 99 bins below a confidence of 0.99, an empty bin counting 0."""

    def compute(self) -> Tensor:
        return self._gaps()[0].max()
