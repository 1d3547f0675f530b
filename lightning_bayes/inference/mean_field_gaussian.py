"""Mean-field Gaussian over a tensor of parameters, ``w = mu + s(rho) z``: the baseline VI family.

The scale map ``s`` is ``softplus`` (Blundell et al.) or ``square`` (BLoB's ``Omega = rho^2``, whose KL gradient
``-2 / rho`` grows as the scale shrinks); it matters to an optimiser that steps ``rho``, not to the family.

Same interface as :class:`~lightning_bayes.inference.bernstein.BernsteinFlow` (``sample`` returns draws and
their elementwise log-densities), plus the closed-form KL to a zero-mean isotropic Gaussian prior,
``KL = sum [log(s_p / s) + (s^2 + mu^2) / (2 s_p^2) - 1/2]``. Reference: Blundell et al., "Weight Uncertainty
in Neural Networks", ICML 2015.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import is_finite
from .softplus import inverse_softplus_value

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
ScaleMap = Literal["softplus", "square"]
SCALE_MAPS = ("softplus", "square")


def initial_tensor(value: Tensor | float) -> Tensor:
    """``value`` as a tensor: a floating tensor keeps its dtype (float64 trained weights stay exact), anything else
    takes torch's default."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach()
    return torch.as_tensor(value, dtype=torch.get_default_dtype())


def initial_parameters(
    shape: tuple[int, ...] | torch.Size, init_mean: Tensor | float, init_scale: float, scale_map: ScaleMap = "softplus"
) -> tuple[nn.Parameter, nn.Parameter]:
    """``(mu, rho)`` of ``shape`` with ``mu = init_mean`` (a number or a tensor of ``shape``), ``s(rho) = init_scale``."""
    if not (is_finite(init_scale) and init_scale > 0):
        raise ValueError(f"init_scale must be a finite number > 0; got {init_scale!r}")
    if scale_map not in SCALE_MAPS:
        raise ValueError(f"scale_map must be one of {SCALE_MAPS}; got {scale_map!r}")
    shape = tuple(shape)
    mean = initial_tensor(init_mean)
    if mean.ndim and tuple(mean.shape) != shape:
        raise ValueError(f"init_mean must be a number or have shape {shape}; got {tuple(mean.shape)}")
    raw = inverse_softplus_value(init_scale) if scale_map == "softplus" else math.sqrt(init_scale)
    return nn.Parameter(mean.expand(shape).clone()), nn.Parameter(torch.full(shape, raw, dtype=mean.dtype))


class MeanFieldGaussian(nn.Module):
    """Independent Gaussians ``N(mu, s(rho)^2)`` for a tensor of ``shape`` parameters.

    Args:
        shape: shape of the parameter tensor.
        init_mean: initial means (a tensor of ``shape``, e.g. trained weights, or a number).
        init_scale: initial standard deviation (> 0).
        scale_map: ``s``: ``"softplus"`` or ``"square"`` (``s(rho) = rho^2``).
    """

    def __init__(
        self, shape: tuple[int, ...] | torch.Size, init_mean: Tensor | float = 0.0, init_scale: float = 1.0,
        scale_map: ScaleMap = "softplus",
    ) -> None:
        super().__init__()
        self.mean, self.raw_scale = initial_parameters(shape, init_mean, init_scale, scale_map)
        self.scale_map = scale_map

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype, as a layer's weight reports it (peft casts LoRA inputs to ``lora_A.weight.dtype``)."""
        return self.mean.dtype

    @property
    def scale(self) -> Tensor:
        return F.softplus(self.raw_scale) if self.scale_map == "softplus" else self.raw_scale.square()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(w, log q(w))`` for base draws ``z`` ``[..., *shape]``."""
        scale = self.scale
        return self.mean + scale * z, -0.5 * z.square() - _LOG_SQRT_2PI - torch.log(scale)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``num_samples`` draws ``[S, *shape]`` and their log-densities (reparameterised)."""
        z = torch.randn(num_samples, *self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self(z)

    def kl_to_prior(self, prior_scale: float) -> Tensor:
        """Closed-form ``KL(q || N(0, prior_scale^2 I))``, summed over the tensor."""
        variance_ratio = (self.scale / prior_scale).square()
        return 0.5 * (variance_ratio + (self.mean / prior_scale).square() - 1 - torch.log(variance_ratio)).sum()
