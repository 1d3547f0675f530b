"""A point estimate in the variational-family interface: ``q = delta_{theta}``, a deterministic parameter.

SSVI keeps biases deterministic (Li et al., ICLR 2024, Sec. 5): inside a
:class:`~lightning_bayes.inference.variational_layers.VariationalLayer` such a parameter has ``scale = 0`` (no
noise in the local reparameterisation) and adds nothing to the KL, because it is a parameter of the model
(maximum likelihood), not of ``q``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .mean_field_gaussian import initial_tensor


class PointMass(nn.Module):
    """A deterministic tensor ``mean`` (a Parameter) with zero ``scale`` and no KL term.

    Args:
        init_mean: its initial value.
    """

    def __init__(self, init_mean: Tensor) -> None:
        super().__init__()
        self.mean = nn.Parameter(initial_tensor(init_mean).clone())

    @property
    def scale(self) -> Tensor:
        return torch.zeros_like(self.mean)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, 0)`` broadcast to the base draws ``z``: every draw is the point, with log-density 0 with respect
        to the point mass itself."""
        return self.mean.expand_as(z), torch.zeros_like(z)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``num_samples`` copies ``[S, *shape]`` of the point and zero log-densities."""
        return self(torch.zeros(num_samples, *self.mean.shape, dtype=self.mean.dtype, device=self.mean.device))

    def kl_to_prior(self, prior_scale: float) -> Tensor:
        """0: a point estimate is outside ``q`` and adds no KL term (the argument is accepted for the interface)."""
        return self.mean.new_zeros(())
