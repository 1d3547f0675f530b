"""The inverse of ``softplus(x) = log(1 + e^x)``: ``softplus^-1(y) = log(e^y - 1) = y + log(1 - e^-y)`` for ``y > 0``;
the second form is finite for every ``y`` (``log(expm1(y))`` overflows a float beyond ``y`` of about 709) and keeps
the precision of small ``y`` (``expm1``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def inverse_softplus(y: Tensor) -> Tensor:
    """``softplus^-1(y)`` elementwise, for ``y > 0``."""
    return y + torch.log(-torch.expm1(-y))


def inverse_softplus_value(y: float) -> float:
    """``softplus^-1(y)`` of a number ``y > 0``."""
    return y + math.log(-math.expm1(-y))
