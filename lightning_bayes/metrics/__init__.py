"""Metrics of a Predictive: torchmetrics ``Metric``s whose ``update`` takes ``(predictive, target)``."""

from .classification import (
    Accuracy,
    AdaptiveCalibrationError,
    BrierScore,
    ExpectedCalibrationError,
    MaxCalibrationError,
    MeanEntropy,
    MeanMutualInformation,
    NegativeLogLikelihood,
    top_label,
)
from .collections import classification_metrics, ood_metrics, regression_metrics
from .legacy import LegacyExpectedCalibrationError, LegacyMaxCalibrationError, LegacyNegativeLogLikelihood
from .ood import FPR95, OOD_SCORES, OODAUROC, OODScore, ood_score
from .regression import CRPS, RMSE, GaussianNLL, IntervalCoverage, gaussian_mixture_crps

__all__ = [
    "CRPS",
    "FPR95",
    "OODAUROC",
    "OOD_SCORES",
    "RMSE",
    "Accuracy",
    "AdaptiveCalibrationError",
    "BrierScore",
    "ExpectedCalibrationError",
    "GaussianNLL",
    "IntervalCoverage",
    "LegacyExpectedCalibrationError",
    "LegacyMaxCalibrationError",
    "LegacyNegativeLogLikelihood",
    "MaxCalibrationError",
    "MeanEntropy",
    "MeanMutualInformation",
    "NegativeLogLikelihood",
    "OODScore",
    "classification_metrics",
    "gaussian_mixture_crps",
    "ood_metrics",
    "ood_score",
    "regression_metrics",
    "top_label",
]
