"""Callbacks that work with any LightningModule exposing ``predictive(x, num_samples)``."""

from .calibration import CalibrationMetrics
from .coefficient_posterior import CoefficientPosterior
from .curve_training import CurveTraining
from .prediction_writer import PredictionWriter
from .swa_subspace import SWASubspace

__all__ = ["CalibrationMetrics", "CoefficientPosterior", "CurveTraining", "PredictionWriter", "SWASubspace"]
