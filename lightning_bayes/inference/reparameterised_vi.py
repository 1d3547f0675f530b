"""Fitting a reparameterised variational family to an unnormalised log-density (black-box VI).

Minimises the Monte Carlo negative ELBO ``mean_t [log q(w_t) - log p(w_t, D)]``, ``w_t = f(z_t)``, with
RMSprop, for any family whose ``sample(num_samples, generator)`` returns draws and their log-densities
(:class:`~lightning_bayes.inference.bernstein.BernsteinFlow`,
:class:`~lightning_bayes.inference.mean_field_gaussian.MeanFieldGaussian`). For low-dimensional
posteriors (the BF-VI recovery problems); networks train through Lightning modules instead. Log-densities are
summed over the parameter dimensions per draw, so elementwise (mean-field) and joint families meet any target.
Reference: Ranganath, Gerrish & Blei, "Black Box Variational Inference", AISTATS 2014; Kingma & Welling 2014.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

LogDensity = Callable[[Tensor], Tensor]


class ReparameterisedFamily(Protocol):
    """A variational family: trainable parameters and reparameterised draws with their log-densities."""

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]: ...


def _per_draw(log_density: Tensor, num_draws: int) -> Tensor:
    """``[S, ...] -> [S]``: a log-density summed over the parameter dimensions of each draw."""
    return log_density.reshape(num_draws, -1).sum(-1)


def fit_reparameterised(
    family: ReparameterisedFamily,
    log_joint: LogDensity,
    steps: int = 3000,
    num_samples: int = 1000,
    lr: float = 0.01,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train ``family`` in place on ``log_joint`` (``[S, *shape] -> [S]`` or ``[S, ...]``); return the losses."""
    if steps < 1 or num_samples < 1:
        raise ValueError(f"steps and num_samples must be >= 1; got steps={steps}, num_samples={num_samples}")
    optimizer = torch.optim.RMSprop(family.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        w, log_q = family.sample(num_samples, generator)
        loss = (_per_draw(log_q, num_samples) - _per_draw(log_joint(w), num_samples)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def kl_to_posterior(family: ReparameterisedFamily, log_posterior: LogDensity, num_samples: int = 10_000,
                    generator: torch.Generator | None = None) -> float:
    """Monte Carlo ``KL(q || p) = E_q [log q(w) - log p(w)]`` against a normalised ``log_posterior``."""
    with torch.no_grad():
        w, log_q = family.sample(num_samples, generator)
        return float((_per_draw(log_q, num_samples) - _per_draw(log_posterior(w), num_samples)).mean())
