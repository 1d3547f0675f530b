"""LightningModules: one per method, all implementing ``predictive(x, num_samples) -> Predictive``."""

from .base import BayesianModule
from .bernstein_vi import BernsteinVI
from .blob import BLoB
from .ensemble import DeepEnsemble
from .ivon import IVONModule
from .map import MAP
from .mc_dropout import MCDropout
from .nullspace_laplace import NullSpaceLaplace
from .ssvi import SSVI
from .subspace_inference import SubspaceInference
from .training_free_bayes import TrainingFreeBayes
from .variational_inference import VariationalInference
from .vbll import VBLLClassifier, VBLLRegressor
from .viking import VIKING

__all__ = [
    "MAP",
    "SSVI",
    "VIKING",
    "BLoB",
    "BayesianModule",
    "BernsteinVI",
    "DeepEnsemble",
    "IVONModule",
    "MCDropout",
    "NullSpaceLaplace",
    "SubspaceInference",
    "TrainingFreeBayes",
    "VBLLClassifier",
    "VBLLRegressor",
    "VariationalInference",
]
