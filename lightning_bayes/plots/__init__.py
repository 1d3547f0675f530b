"""PNG plots from tensors, arrays and Predictives (never modules), drawn without touching pyplot's backend."""

from .coefficients import coefficient_posterior
from .curve import loss_along_curve
from .regression import predictive_band
from .reliability import ReliabilityBins, reliability_bins, reliability_diagram, reliability_grid

__all__ = ["ReliabilityBins", "coefficient_posterior", "loss_along_curve", "predictive_band", "reliability_bins", "reliability_diagram", "reliability_grid"]
