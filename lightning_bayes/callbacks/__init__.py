"""Callbacks that work with any LightningModule exposing ``predictive(x, num_samples)``."""

from .calibration import CalibrationMetrics

__all__ = ["CalibrationMetrics"]
