"""Mean-field Gaussian on a support mask: ``q(w_i) = gamma_i N(mu_i, sigma_i^2) + (1 - gamma_i) delta_0``.

The family of sparse subspace VI (SSVI): ``sigma = softplus(rho) * gamma`` is exactly 0 off the mask and every
consumer reads ``mean = mu * gamma``, so off-mask ``mu`` and ``rho`` have no effect on outputs, on the KL or (by
the chain rule, ``dL/dmu = gamma * dL/dw``) on their own gradients. The KL to ``N(0, s_p^2)`` is the closed form
summed over active entries, ``sum_{gamma_i = 1} [log(s_p / sigma_i) + (sigma_i^2 + mu_i^2) / (2 s_p^2) - 1/2]``.
Reference: Li, Miao, Qiu & Zhang, "Training Bayesian Neural Networks with Sparse Subspace Variational
Inference", ICLR 2024 (arXiv 2402.11025).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mean_field_gaussian import initial_parameters

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SparseGaussian(nn.Module):
    """Independent Gaussians ``N(mu, softplus(rho)^2)`` on the entries where the ``mask`` buffer is true, zero elsewhere.

    Parameters ``loc`` (``mu``) and ``raw_scale`` (``rho``); ``mask`` is a bool buffer (a checkpoint carries it).
    Starts dense (every entry active); :func:`~lightning_bayes.inference.ssvi_topology.initialise_support` draws
    a support of a given density.

    While ``record_dense_gradient`` is true, every backward through :attr:`mean` adds ``dL/dw`` of the masked
    mean ``w = mu * gamma`` (dense: nonzero off the mask too) to ``dense_gradient``, the growth score of SSVI.

    Args:
        shape: shape of the parameter tensor.
        init_mean: initial means (a tensor of ``shape`` or a number).
        init_scale: initial standard deviation (> 0).
    """

    # buffers (register_buffer), typed for readers and checkers
    mask: Tensor

    def __init__(self, shape: tuple[int, ...] | torch.Size, init_mean: Tensor | float = 0.0, init_scale: float = 1.0) -> None:
        super().__init__()
        self.loc, self.raw_scale = initial_parameters(shape, init_mean, init_scale)
        self.register_buffer("mask", torch.ones(tuple(shape), dtype=torch.bool))
        self.record_dense_gradient = False
        self.dense_gradient: Tensor | None = None

    @property
    def mean(self) -> Tensor:
        """``mu * gamma``: the weight mean every layer reads."""
        mean = self.loc * self.mask
        if self.record_dense_gradient and mean.requires_grad:
            mean.register_hook(self._accumulate_dense_gradient)
        return mean

    def _accumulate_dense_gradient(self, gradient: Tensor) -> None:
        self.dense_gradient = gradient.detach().clone() if self.dense_gradient is None else self.dense_gradient + gradient

    @property
    def scale(self) -> Tensor:
        """``softplus(rho) * gamma``: exactly 0 off the mask."""
        return F.softplus(self.raw_scale) * self.mask

    @property
    def num_active(self) -> int:
        return int(self.mask.sum())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(w, log q(w))`` for base draws ``z`` ``[..., *shape]``; off the mask ``w = 0`` and the log-density is
        that of the point mass ``delta_0`` with respect to itself, 0."""
        active_scale = F.softplus(self.raw_scale)
        log_q = -0.5 * z.square() - _LOG_SQRT_2PI - torch.log(active_scale)
        return self.mean + self.scale * z, torch.where(self.mask, log_q, torch.zeros_like(log_q))

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``num_samples`` draws ``[S, *shape]`` and their elementwise log-densities (reparameterised)."""
        z = torch.randn(num_samples, *self.loc.shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        return self(z)

    def kl_to_prior(self, prior_scale: float) -> Tensor:
        """Closed-form ``KL(q_active || N(0, prior_scale^2))``, summed over the active entries only."""
        variance_ratio = (F.softplus(self.raw_scale) / prior_scale).square()  # unmasked: finite, no 0 * inf gradients
        terms = 0.5 * (variance_ratio + (self.loc / prior_scale).square() - 1 - torch.log(variance_ratio))
        return torch.where(self.mask, terms, torch.zeros_like(terms)).sum()
