"""Input checks shared by the metrics: the right Predictive type and targets of the right shape."""

from __future__ import annotations

from torch import Tensor

from ..predictive import CategoricalPredictive, GaussianPredictive


def categorical(predictive: object, metric: str) -> CategoricalPredictive:
    """``predictive`` if it is a :class:`CategoricalPredictive`, else a ``TypeError`` naming ``metric``."""
    if not isinstance(predictive, CategoricalPredictive):
        raise TypeError(f"{metric}.update expects predictive=CategoricalPredictive; got {type(predictive).__name__}")
    return predictive


def gaussian(predictive: object, metric: str) -> GaussianPredictive:
    """``predictive`` if it is a :class:`GaussianPredictive`, else a ``TypeError`` naming ``metric``."""
    if not isinstance(predictive, GaussianPredictive):
        raise TypeError(f"{metric}.update expects predictive=GaussianPredictive; got {type(predictive).__name__}")
    return predictive


def class_labels(predictive: CategoricalPredictive, target: Tensor, metric: str) -> Tensor:
    """Integer labels ``[B]`` matching the predictive's batch, as int64."""
    batch = predictive.logits.shape[1]
    if not isinstance(target, Tensor) or target.shape != (batch,) or target.is_floating_point():
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{metric}.update expects target=int labels of shape [B]=({batch},); got {shape}")
    return target.long()


def regression_targets(predictive: GaussianPredictive, target: Tensor, metric: str) -> Tensor:
    """Targets ``[B, D]`` (``[B]`` accepted when D = 1) in the predictive's dtype."""
    expected = tuple(predictive.mean_samples.shape[1:])
    if isinstance(target, Tensor) and target.ndim == 1 and expected[1] == 1:
        target = target.unsqueeze(-1)
    if not isinstance(target, Tensor) or tuple(target.shape) != expected:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{metric}.update expects target of shape [B, D]={expected}; got {shape}")
    return target.to(predictive.mean_samples.dtype)
