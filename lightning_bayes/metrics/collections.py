"""Ready-made ``MetricCollection``s of the metrics, keyed by the short names the callback logs."""

from __future__ import annotations

from torchmetrics import Metric, MetricCollection

from .classification import (
    Accuracy,
    AdaptiveCalibrationError,
    BrierScore,
    ExpectedCalibrationError,
    MaxCalibrationError,
    MeanEntropy,
    MeanMutualInformation,
    NegativeLogLikelihood,
)
from .legacy import LegacyExpectedCalibrationError, LegacyMaxCalibrationError, LegacyNegativeLogLikelihood
from .ood import FPR95, OODAUROC, OODScore
from .regression import CRPS, RMSE, GaussianNLL, IntervalCoverage


def classification_metrics(prefix: str = "", n_bins: int = 15, legacy: bool = False) -> MetricCollection:
    """``acc, nll, brier, ece, mce, aece, entropy, mi``, and with ``legacy`` the reference code's
    ``legacy_nll, legacy_ece, legacy_mce`` (:mod:`~lightning_bayes.metrics.legacy`); ``update(predictive, target)``."""
    metrics: dict[str, Metric | MetricCollection] = {
        "acc": Accuracy(),
        "nll": NegativeLogLikelihood(),
        "brier": BrierScore(),
        "ece": ExpectedCalibrationError(n_bins=n_bins),
        "mce": MaxCalibrationError(n_bins=n_bins),
        "aece": AdaptiveCalibrationError(n_bins=n_bins),
        "entropy": MeanEntropy(),
        "mi": MeanMutualInformation(),
    }
    if legacy:
        metrics |= {
            "legacy_nll": LegacyNegativeLogLikelihood(),
            "legacy_ece": LegacyExpectedCalibrationError(),
            "legacy_mce": LegacyMaxCalibrationError(),
        }
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def ood_metrics(prefix: str = "", score: OODScore = "entropy") -> MetricCollection:
    """``auroc, fpr95``; ``update(predictive, is_ood)``."""
    return MetricCollection(
        {"auroc": OODAUROC(score=score), "fpr95": FPR95(score=score)}, prefix=prefix, compute_groups=False
    )


def regression_metrics(prefix: str = "", level: float = 0.9) -> MetricCollection:
    """``nll, rmse, crps, coverage{100 level}``; ``update(predictive, target)``."""
    coverage = IntervalCoverage(level=level)  # checks level before it names the metric
    return MetricCollection(
        {"nll": GaussianNLL(), "rmse": RMSE(), "crps": CRPS(), f"coverage{round(100 * level)}": coverage},
        prefix=prefix,
        compute_groups=False,
    )
