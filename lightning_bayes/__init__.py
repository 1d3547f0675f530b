"""lightning_bayes: Bayesian deep learning methods as PyTorch Lightning modules and callbacks.

Every method answers ``module.predictive(x, num_samples)`` with a :mod:`~lightning_bayes.predictive`
object; metrics, callbacks and plots consume only that.
"""

from .params import select_parameters
from .predictive import CategoricalPredictive, GaussianPredictive, Predictive, concatenate

__all__ = ["CategoricalPredictive", "GaussianPredictive", "Predictive", "concatenate", "select_parameters"]
__version__ = "0.1.0"
