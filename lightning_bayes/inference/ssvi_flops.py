"""Counted weight FLOPs of SSVI training against dense mean-field VI (counted from nonzeros, never timed).

A layer with ``k`` active weights and ``P`` output positions per example (1 for a linear layer, ``H_out W_out``
for a convolution) costs ``2 k P`` FLOPs per example on the mean path and as much again on the variance path of
the local reparameterisation, ``layer(x^2, sigma^2)``: forward ``f = sum_l 2 (1 + r) k_l P_l`` with ``r = 1`` under
local reparameterisation. A training iteration costs ``3 f`` (forward, gradients to the inputs and to the
weights); a support-update iteration costs ``2 f_sparse + f_dense``, since its weight gradient is dense (RigL,
Evci et al., ICML 2020, App. H). The ratio to dense VI over ``T`` iterations with ``U`` updates is

    [(T - U) 3 f_sparse + U (2 f_sparse + f_dense)] / (T 3 f_dense).

Reference: Li, Miao, Qiu & Zhang, ICLR 2024, Sec. 5 (training FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """One layer's weight count: ``active`` nonzeros of ``total`` weights, ``positions`` outputs per example per unit."""

    active: int
    total: int
    positions: int


def forward_flops(layers: Sequence[LayerCost], dense: bool = False, local_reparameterization: bool = True) -> int:
    """Weight FLOPs of one forward per example: ``sum_l 2 (1 + r) k_l P_l`` (``k_l = total`` when ``dense``)."""
    paths = 2 if local_reparameterization else 1
    return sum(2 * paths * (layer.total if dense else layer.active) * layer.positions for layer in layers)


def update_iterations(total: int, every: int, end: int) -> int:
    """Support updates among iterations ``1..total``: the multiples of ``every`` below ``min(end, total + 1)``."""
    return (min(end, total + 1) - 1) // every


def training_flops_ratio(
    layers: Sequence[LayerCost], total: int, every: int, end: int, local_reparameterization: bool = True
) -> float:
    """SSVI's training weight FLOPs over dense VI's for ``total`` iterations (see the module docstring)."""
    if total < 1:
        raise ValueError(f"total must be a positive number of iterations; got {total!r}")
    sparse = forward_flops(layers, False, local_reparameterization)
    dense = forward_flops(layers, True, local_reparameterization)
    updates = update_iterations(total, every, end)
    return ((total - updates) * 3 * sparse + updates * (2 * sparse + dense)) / (total * 3 * dense)
