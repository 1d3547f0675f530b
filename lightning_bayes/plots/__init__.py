"""PNG plots from tensors, arrays and Predictives (never modules), drawn without touching pyplot's backend."""

from .regression import predictive_band
from .reliability import ReliabilityBins, reliability_bins, reliability_diagram

__all__ = ["ReliabilityBins", "predictive_band", "reliability_bins", "reliability_diagram"]
