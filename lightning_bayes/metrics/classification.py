"""Classification metrics of a :class:`CategoricalPredictive`, computed on the Bayesian model average.

Every metric's ``update(predictive, target)`` takes the predictive of a batch and its integer labels
``[B]``; states are sums or concatenations with torchmetrics' ``dist_reduce_fx``, so the value under
DDP equals the value on the pooled data.

* ``Accuracy``: ``1/N sum_n [argmax_c p(c|x_n) = y_n]``.
* ``NegativeLogLikelihood``: ``-1/N sum_n log p(y_n|x_n)`` of the model average.
* ``BrierScore``: ``1/N sum_n sum_c (p(c|x_n) - [c = y_n])^2`` (Brier, 1950).
* ``ExpectedCalibrationError`` / ``MaxCalibrationError``: top-label calibration error with equal-width
  confidence bins (Guo et al., 2017), L1-weighted mean / maximum over bins of ``|accuracy - confidence|``.
* ``AdaptiveCalibrationError``: the same L1 error with equal-mass bins (Nixon et al., 2019; Mukhoti et
  al., 2020).
* ``MeanEntropy`` / ``MeanMutualInformation``: ``1/N sum_n H[p(y|x_n)]`` and the epistemic part
  ``1/N sum_n (H[p(y|x_n)] - E_s H[p_s(y|x_n)])`` (Houlsby et al., 2011; Depeweg et al., 2018).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics.classification import BinaryCalibrationError

from ..checks import is_int
from ..predictive import CategoricalPredictive
from ._inputs import categorical, class_labels, pooled
from ._mean import MeanOverValues


class Accuracy(MeanOverValues):
    """Fraction of examples whose label is the argmax of the model-average probabilities."""

    higher_is_better = True

    def update(self, predictive: CategoricalPredictive, target: Tensor) -> None:  # type: ignore[override]
        predictive = categorical(predictive, type(self).__name__)
        labels = class_labels(predictive, target, type(self).__name__)
        super().update((predictive.log_probs.argmax(-1) == labels).float())


class NegativeLogLikelihood(MeanOverValues):
    """Mean of ``-log p(y|x)`` under the model average (not the average of per-sample NLLs)."""

    higher_is_better = False

    def update(self, predictive: CategoricalPredictive, target: Tensor) -> None:  # type: ignore[override]
        predictive = categorical(predictive, type(self).__name__)
        labels = class_labels(predictive, target, type(self).__name__)
        super().update(-predictive.log_prob(labels))


class BrierScore(MeanOverValues):
    """Mean over examples of ``sum_c (p_c - onehot_c)^2``; lies in ``[0, 2]``."""

    higher_is_better = False

    def update(self, predictive: CategoricalPredictive, target: Tensor) -> None:  # type: ignore[override]
        predictive = categorical(predictive, type(self).__name__)
        labels = class_labels(predictive, target, type(self).__name__)
        probs = predictive.probs
        onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
        super().update((probs - onehot).pow(2).sum(-1))


class MeanEntropy(MeanOverValues):
    """Mean predictive entropy ``H[p(y|x)]`` (nats) of the model average; ``target`` is ignored."""

    higher_is_better = False

    def update(self, predictive: CategoricalPredictive, target: Tensor | None = None) -> None:  # type: ignore[override]
        super().update(categorical(predictive, type(self).__name__).entropy)


class MeanMutualInformation(MeanOverValues):
    """Mean mutual information between label and parameters (nats); ``target`` is ignored."""

    higher_is_better = False

    def update(self, predictive: CategoricalPredictive, target: Tensor | None = None) -> None:  # type: ignore[override]
        super().update(categorical(predictive, type(self).__name__).mutual_information)


def top_label(predictive: CategoricalPredictive, target: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Top-label confidence ``max_c p(c|x)`` in ``[0, 1]`` and the correctness indicator (int64), ``[B]`` each."""
    predictive = categorical(predictive, metric)
    labels = class_labels(predictive, target, metric)
    log_conf, predicted = predictive.log_probs.max(-1)  # at most 0: torchmetrics reads any value above 1 as a logit
    return log_conf.exp(), (predicted == labels).long()


class _TopLabelCalibrationError(BinaryCalibrationError):
    """Multiclass top-label calibration error as the binary one on (confidence, correct).

    Top-label ECE of a C-class predictor is exactly the binary calibration error of the pairs
    ``(max_c p_c, [argmax_c p_c = y])``; torchmetrics keeps both as ``cat`` states. Bins are
    ``[k/n, (k+1)/n)`` and the last one ``[1 - 1/n, 1]``: torchmetrics alone would give a confidence of
    exactly 1 (common for a saturated softmax) a bin of its own, so it is nudged one ulp below 1.
    """

    def __init__(self, n_bins: int, norm: Literal["l1", "l2", "max"], **kwargs: Any) -> None:
        if not is_int(n_bins) or n_bins < 1:  # torchmetrics takes True as one bin
            raise ValueError(f"n_bins must be an int >= 1; got {n_bins!r}")
        super().__init__(n_bins=n_bins, norm=norm, **kwargs)

    def update(self, predictive: CategoricalPredictive, target: Tensor) -> None:  # type: ignore[override]
        confidence, correct = top_label(predictive, target, type(self).__name__)
        below_one = torch.nextafter(confidence.new_ones(()), confidence.new_zeros(()))
        super().update(confidence.clamp_max(below_one), correct)

    def compute(self) -> Tensor:
        pooled(self.confidences, type(self).__name__)
        return super().compute()


class ExpectedCalibrationError(_TopLabelCalibrationError):
    """``sum_b (n_b / N) |acc_b - conf_b|`` over ``n_bins`` equal-width confidence bins."""

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(n_bins=n_bins, norm="l1", **kwargs)


class MaxCalibrationError(_TopLabelCalibrationError):
    """``max_b |acc_b - conf_b|`` over the non-empty equal-width confidence bins."""

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(n_bins=n_bins, norm="max", **kwargs)


class AdaptiveCalibrationError(_TopLabelCalibrationError):
    """``sum_b (n_b / N) |acc_b - conf_b|`` over ``n_bins`` equal-mass bins of the sorted confidences.

    The N examples, sorted by confidence and, among equal confidences, wrong before right (so that the value
    depends on the examples only, not on the order they arrived in: under DDP that order is rank by rank), are
    split into ``n_bins`` consecutive groups whose sizes differ by at most one, the larger groups first
    (``torch.tensor_split``, as ``np.array_split``).
    """

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(n_bins=n_bins, norm="l1", **kwargs)

    def compute(self) -> Tensor:
        confidences = pooled(self.confidences, type(self).__name__)
        accuracies = pooled(self.accuracies, type(self).__name__).to(confidences.dtype)
        by_correctness = torch.sort(accuracies, stable=True).indices
        order = by_correctness[torch.sort(confidences[by_correctness], stable=True).indices]
        total = confidences.new_zeros(())
        for members in torch.tensor_split(order, self.n_bins):
            if members.numel():
                gap = (accuracies[members].mean() - confidences[members].mean()).abs()
                total = total + members.numel() * gap
        return total / confidences.numel()
