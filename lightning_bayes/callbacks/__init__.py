"""Callbacks that work with any LightningModule exposing ``predictive(x, num_samples)``."""

from .calibration import CalibrationMetrics
from .curve_training import CurveTraining
from .swa_subspace import SWASubspace

__all__ = ["CalibrationMetrics", "CurveTraining", "SWASubspace"]
