"""Callbacks that work with any LightningModule exposing ``predictive(x, num_samples)``."""

from .calibration import CalibrationMetrics
from .swa_subspace import SWASubspace

__all__ = ["CalibrationMetrics", "SWASubspace"]
