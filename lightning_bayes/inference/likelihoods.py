"""Observation models shared by every method: how network outputs become a loss and a Predictive.

* ``CategoricalLikelihood``: outputs are logits ``[B, C]``; loss is the mean cross-entropy.
* ``GaussianLikelihood``: outputs are means ``[B, D]`` with a learned homoscedastic noise
  ``sigma = softplus(rho)`` per output, or ``[B, 2D]`` (mean, raw scale) when heteroscedastic;
  loss is the mean negative log density ``1/2 log(2 pi sigma^2) + (y - mu)^2 / (2 sigma^2)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_flags, class_labels, is_finite, is_int
from ..predictive import CategoricalPredictive, GaussianPredictive, Predictive, at_least_float32
from .softplus import inverse_softplus_value

_MIN_VARIANCE = 1e-6


class Likelihood(nn.Module, ABC):
    """Maps raw network outputs to a per-batch loss and, for a stack of samples, to a Predictive."""

    @property
    def num_outputs(self) -> int | None:
        """Network outputs per example it consumes (None: any, e.g. C classes)."""
        return None

    @abstractmethod
    def loss(self, outputs: Tensor, y: Tensor) -> Tensor:
        """Mean negative log-likelihood of a batch."""

    @abstractmethod
    def predictive(self, output_samples: Tensor) -> Predictive:
        """Predictive from output samples ``[S, B, outputs]``."""


class CategoricalLikelihood(Likelihood):
    """Softmax cross-entropy on logits ``[B, C]``; its predictive is a :class:`CategoricalPredictive`."""

    def loss(self, outputs: Tensor, y: Tensor) -> Tensor:
        if outputs.ndim != 2:
            raise ValueError(f"CategoricalLikelihood.loss expects logits [B, C]; got {tuple(outputs.shape)}")
        # the range is checked outside torch.func transforms and compilation (no batching rule there), where
        # cross_entropy's own error ("Target 7 is out of bounds") would not say how many logits the network gives
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        in_transform = torch.compiler.is_compiling() or wrapped(outputs) or (isinstance(y, Tensor) and wrapped(y))
        batch, classes = outputs.shape
        labels = class_labels(y, batch, classes, "CategoricalLikelihood.loss", check_range=not in_transform)
        # no ignore_index: cross_entropy would skip a label -100 (its default) instead of refusing it
        return F.cross_entropy(at_least_float32(outputs), labels, ignore_index=torch.iinfo(torch.int64).min)

    def predictive(self, output_samples: Tensor) -> CategoricalPredictive:
        return CategoricalPredictive(at_least_float32(output_samples))


class GaussianLikelihood(Likelihood):
    """Gaussian observation noise, homoscedastic (learned per output) or heteroscedastic (predicted).

    Args:
        output_dim: ``D``, the regression targets per example.
        heteroscedastic: the network predicts each example's noise: its outputs are ``[mu, raw]`` (``2 D``), the
            standard deviation ``softplus(raw + offset)``; otherwise one learned standard deviation per output.
        init_noise: the initial noise standard deviation (at ``raw = 0`` when heteroscedastic).
    """

    # buffers (register_buffer), typed for readers and checkers
    raw_offset: Tensor

    def __init__(self, output_dim: int = 1, heteroscedastic: bool = False, init_noise: float = 1.0) -> None:
        super().__init__()
        if not is_int(output_dim) or output_dim < 1:
            raise ValueError(f"output_dim must be an int >= 1; got {output_dim!r}")
        if not (is_finite(init_noise) and init_noise > 0):
            raise ValueError(f"init_noise must be a finite number > 0; got {init_noise!r}")
        check_flags(heteroscedastic=heteroscedastic)
        self.output_dim = output_dim
        self.heteroscedastic = heteroscedastic
        raw = inverse_softplus_value(init_noise)
        if heteroscedastic:
            self.register_buffer("raw_offset", torch.tensor(raw))
        else:
            self.raw_noise = nn.Parameter(torch.full((output_dim,), raw))

    @property
    def num_outputs(self) -> int:
        """How many network outputs this likelihood consumes."""
        return 2 * self.output_dim if self.heteroscedastic else self.output_dim

    def mean_and_variance(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussian's mean and variance ``[..., D]`` from the network's outputs: ``(mu, softplus(raw + offset)^2)``
        when heteroscedastic (outputs ``[mu, raw]``), else ``(outputs, softplus(raw_noise)^2)``; both plus a floor."""
        if outputs.shape[-1] != self.num_outputs:
            raise ValueError(
                f"GaussianLikelihood(output_dim={self.output_dim}, heteroscedastic={self.heteroscedastic}) "
                f"expects {self.num_outputs} outputs per example; got shape {tuple(outputs.shape)}"
            )
        outputs = at_least_float32(outputs)
        if self.heteroscedastic:
            mean, raw = outputs.split(self.output_dim, dim=-1)
            std = F.softplus(raw + self.raw_offset)
        else:
            mean, std = outputs, F.softplus(at_least_float32(self.raw_noise)).expand_as(outputs)
        return mean, std.pow(2) + _MIN_VARIANCE

    def loss(self, outputs: Tensor, y: Tensor) -> Tensor:
        mean, var = self.mean_and_variance(outputs)
        if y.shape != mean.shape and not (self.output_dim == 1 and y.shape == mean.shape[:-1]):
            raise ValueError(
                f"GaussianLikelihood.loss expects y of the means' shape [B, D]={tuple(mean.shape)} (or [B] when "
                f"D = 1); got {tuple(y.shape)}"
            )
        y = y.reshape(mean.shape).to(mean.dtype)
        return F.gaussian_nll_loss(mean, y, var, full=True, reduction="none").sum(-1).mean()

    def predictive(self, output_samples: Tensor) -> GaussianPredictive:
        mean, var = self.mean_and_variance(output_samples)
        return GaussianPredictive(mean, var)


def as_likelihood(likelihood: object) -> Likelihood:
    """``likelihood`` itself if it is a :class:`Likelihood`, built by :func:`build_likelihood` if it is a name;
    anything else (``None``, a number) is an error naming what is expected."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        return build_likelihood(likelihood)
    raise ValueError(f"likelihood must be 'categorical', 'gaussian' or a Likelihood; got {likelihood!r}")


def build_likelihood(name: str, output_dim: int = 1, heteroscedastic: bool = False) -> Likelihood:
    """``"categorical"`` or ``"gaussian"``; anything else is an error naming the choices."""
    if name == "categorical":
        return CategoricalLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(output_dim=output_dim, heteroscedastic=heteroscedastic)
    raise ValueError(f"likelihood must be 'categorical' or 'gaussian'; got {name!r}")
