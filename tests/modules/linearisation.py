"""The first-order expansion of a network in its parameters, shared by module tests of linearised predictives: a dense
Jacobian by ``torch.func.jacrev``, independent of the forward-mode products the modules use."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_bayes.inference.linalg import ParameterFunction


def first_order_outputs(function: ParameterFunction, x: Tensor, theta_hat: Tensor, deltas: Tensor) -> Tensor:
    """``f(theta_hat, x) + J(x) delta_s`` for each row ``delta_s`` of ``deltas`` ``[S, P]``: ``[S, B, C]``."""
    jacobian = torch.func.jacrev(lambda theta: function.outputs(theta, x))(theta_hat)  # [B, C, P]
    return function.outputs(theta_hat, x) + torch.einsum("bcp,sp->sbc", jacobian, deltas)
