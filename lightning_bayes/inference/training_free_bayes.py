"""Training-free Bayesianization (TFB) of trained LoRA factors: SVD canonical form, isotropic noise, a bisection.

For one adapted layer ``Delta W = B A`` (``B: out x r``, ``A: r x in``), the thin SVD ``B = U diag(d) V^T``
gives the canonical pair ``B' = U diag(d)``, ``A' = V^T A`` with ``B' A' = B A``. TFB keeps ``B'`` fixed and draws
``A'_ij ~ N(A'_ij, (sigma_q / d_i)^2)``, so the weight noise ``B' E = sigma_q U Z`` (``Z`` standard normal,
``r x in``) is isotropic with variance ``sigma_q^2`` on the column space of ``U``:
``Cov(vec(B' E)) = sigma_q^2 (I_in kron U U^T)`` for the column-stacked ``vec``, ``sigma_q^2 (U U^T kron I_in)``
for the row-major one (``torch``'s ``flatten``). A direction with ``d_i = 0`` has a zero
column in ``B'`` and carries no noise (its standard deviation is set to 0). peft's layer adds ``(alpha / r) B A``,
so the noise of the layer's weight is ``(alpha / r) sigma_q U Z`` (as in the reference's ``tfblora.py``: its
``sigma_q`` values carry over). One ``sigma_q`` serves all layers;
:class:`Bisection` finds the largest one meeting a feasibility test. Reference: Shi, Wang, Han, Zhang & Wang,
"Training-Free Bayesianization for Low-Rank Adapters of Large Language Models", 2024/2025.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from ..checks import is_finite


def canonical_lora(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(A', B', d)`` with ``B = U diag(d) V^T``, ``B' = U diag(d)``, ``A' = V^T A`` (so ``B' A' = B A``), computed
    in float64 and returned in ``a``'s dtype, for ``A: r x in`` and ``B: out x r``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"a must be r x in and b out x r with the same r; got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    u, d, vh = torch.linalg.svd(b.double(), full_matrices=False)
    return (vh @ a.double()).to(a.dtype), (u * d).to(a.dtype), d.to(a.dtype)


def noise_scales(d: Tensor) -> Tensor:
    """``1 / d_i``, the per-row standard deviation of ``A'`` per unit ``sigma_q``; 0 where ``d_i`` is numerically
    zero (``d_i <= r eps d_max``: the direction is absent from ``B'``)."""
    cutoff = d.numel() * torch.finfo(d.dtype).eps * d.max().clamp_min(torch.finfo(d.dtype).tiny)
    return torch.where(d > cutoff, 1.0 / d.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))


class CanonicalLoraNoise(nn.Module):
    """The TFB posterior of several LoRA layers: canonical factors as buffers, weight draws on demand.

    Args:
        factors: ``{(name_a, name_b): (A, B)}`` in any order; the names are the keys of the drawn tensors (e.g.
            parameter names for ``torch.func.functional_call``).
    """

    # buffers (register_buffer), typed for readers and checkers: the first pair's A (there is one pair at least)
    a_0: Tensor

    def __init__(self, factors: dict[tuple[str, str], tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        if not factors:
            raise ValueError("factors must hold at least one (A, B) pair; got none")
        self.names = list(factors)
        for i, (a, b) in enumerate(factors.values()):
            canonical_a, canonical_b, d = canonical_lora(a.detach(), b.detach())
            self.register_buffer(f"a_{i}", canonical_a)
            self.register_buffer(f"b_{i}", canonical_b)
            self.register_buffer(f"scale_{i}", noise_scales(d).unsqueeze(1))

    def is_degenerate(self) -> bool:
        """Whether no pair has a direction to put noise on (every ``B`` zero: ``d = 0``)."""
        return all(not bool(getattr(self, f"scale_{i}").any()) for i in range(len(self.names)))

    def draw(self, sigma: float, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One posterior draw ``{name_a: A' + sigma (1/d) Z, name_b: B'}``; ``sigma = 0`` gives the canonical factors
        and draws no random numbers."""
        return self._weights(sigma, self._standard_noise(generator) if sigma != 0 else None)

    def antithetic_pair(self, sigma: float, generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], ...]:
        """Two draws with noise ``Z`` and ``-Z``: their average has no term linear in ``sigma Z`` (Hammersley &
        Morton, 1956), so a Monte Carlo mean over pairs sees the ``O(sigma^2)`` effect of the noise only."""
        noise = self._standard_noise(generator)
        return self._weights(sigma, noise), self._weights(-sigma, noise)

    def _standard_noise(self, generator: torch.Generator | None) -> list[Tensor]:
        shapes = [getattr(self, f"a_{i}") for i in range(len(self.names))]
        return [torch.randn(a.shape, generator=generator, dtype=a.dtype, device=a.device) for a in shapes]

    def _weights(self, sigma: float, noise: list[Tensor] | None) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for i, (name_a, name_b) in enumerate(self.names):
            a, b, scale = getattr(self, f"a_{i}"), getattr(self, f"b_{i}"), getattr(self, f"scale_{i}")
            tensors[name_a], tensors[name_b] = (a if noise is None else a + sigma * scale * noise[i]), b
        return tensors


def relative_nll_change(reference: float, noisy: float) -> float:
    """``|NLL_noisy - NLL_ref| / NLL_ref``, the paper's test statistic: a candidate ``sigma`` is feasible while it is
    at most the tolerance, whichever way the noise moves the anchor NLL."""
    return abs(noisy - reference) / max(reference, torch.finfo(torch.float64).tiny)


class Bisection:
    """Largest ``sigma`` in ``[low, high]`` passing a monotone feasibility test, one test per :meth:`update`.

    The first candidate is ``high`` (feasible: done); then midpoints, ``low`` staying the largest value known
    (or assumed, at the start) to be feasible and ``high`` the smallest known infeasible one. After ``k``
    infeasible-or-bisected tests the result is within ``(high - low) / 2^(k-1)`` of the true threshold.
    The state is three numbers, so a module keeps it in buffers (see :meth:`state`).
    """

    def __init__(self, low: float, high: float, tested_high: bool = False, done: bool = False) -> None:
        valid = is_finite(low) and is_finite(high) and (0 <= low <= high if done else 0 <= low < high)
        if not valid:  # a finished search may have closed the interval
            raise ValueError(
                f"sigma_range (the search interval) must be two finite numbers 0 <= low < high; got low={low!r}, "
                f"high={high!r}"
            )
        self.low, self.high, self.tested_high, self.done = float(low), float(high), tested_high, done

    def candidate(self) -> float:
        """The next value to test."""
        return self.high if not self.tested_high else 0.5 * (self.low + self.high)

    def update(self, feasible: bool) -> None:
        """Record the test of :meth:`candidate`."""
        value = self.candidate()
        if not self.tested_high:
            self.tested_high = True
            if feasible:
                self.low, self.done = value, True
            return
        if feasible:
            self.low = value
        else:
            self.high = value

    def state(self) -> tuple[float, float, bool, bool]:
        """``(low, high, tested_high, done)``: the constructor's arguments that resume the search."""
        return self.low, self.high, self.tested_high, self.done
