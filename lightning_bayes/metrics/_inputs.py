"""Input checks shared by the metrics: the right Predictive type and targets of the right shape."""

from __future__ import annotations

import torch
from torch import Tensor

from torchmetrics.utilities.data import dim_zero_cat

from ..checks import class_labels as checked_labels
from ..predictive import CategoricalPredictive, GaussianPredictive


def pooled(state: Tensor | list[Tensor], metric: str) -> Tensor:
    """A ``cat`` state's examples as one tensor; an error naming ``metric`` when ``update`` never saw one."""
    empty = sum(t.numel() for t in state) == 0 if isinstance(state, list) else state.numel() == 0
    if empty:
        raise ValueError(f"{metric}.compute needs at least one example; update was never given any")
    return dim_zero_cat(state)


def categorical(predictive: object, metric: str) -> CategoricalPredictive:
    """``predictive`` if it is a :class:`CategoricalPredictive` without NaN or ``+inf`` logits (``-inf``, a class of
    probability 0, is fine), else an error naming ``metric``. On a GPU the value check is asynchronous."""
    if not isinstance(predictive, CategoricalPredictive):
        raise TypeError(f"{metric}.update expects predictive=CategoricalPredictive; got {type(predictive).__name__}")
    logits = predictive.logits
    torch._assert_async(
        ~(logits.isnan() | logits.isposinf()).any(),
        f"{metric}.update got NaN or +inf logits (a diverged model?); every other metric would be NaN or wrong",
    )
    return predictive


def gaussian(predictive: object, metric: str) -> GaussianPredictive:
    """``predictive`` if it is a :class:`GaussianPredictive` with finite means and positive finite variances (a
    variance of 0 or less has no density: NaN log densities and quantiles), else an error naming ``metric``."""
    if not isinstance(predictive, GaussianPredictive):
        raise TypeError(f"{metric}.update expects predictive=GaussianPredictive; got {type(predictive).__name__}")
    mean, variance = predictive.mean_samples, predictive.variance_samples
    torch._assert_async(
        (mean.isfinite().all() & variance.isfinite().all()),
        f"{metric}.update got a NaN or infinite predictive mean or variance (a diverged model?)",
    )
    torch._assert_async((variance > 0).all(), f"{metric}.update got a predictive variance of 0 or less")
    return predictive


def class_labels(predictive: CategoricalPredictive, target: Tensor, metric: str) -> Tensor:
    """Integer labels ``[B]`` in ``[0, C)`` matching the predictive's batch, as int64 (the range check is
    asynchronous on a GPU)."""
    batch, classes = predictive.logits.shape[1:]
    return checked_labels(target, batch, classes, f"{metric}.update")


def regression_targets(predictive: GaussianPredictive, target: Tensor, metric: str) -> Tensor:
    """Finite targets ``[B, D]`` (``[B]`` accepted when D = 1) in the predictive's dtype (the value check is
    asynchronous on a GPU)."""
    expected = tuple(predictive.mean_samples.shape[1:])
    if isinstance(target, Tensor) and target.ndim == 1 and expected[1] == 1:
        target = target.unsqueeze(-1)
    if not isinstance(target, Tensor) or tuple(target.shape) != expected:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{metric}.update expects target of shape [B, D]={expected}; got {shape}")
    target = target.to(predictive.mean_samples.dtype)
    torch._assert_async(target.isfinite().all(), f"{metric}.update got a NaN or infinite target")
    return target
