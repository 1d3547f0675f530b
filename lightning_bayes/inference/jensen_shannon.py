"""The generalised Jensen-Shannon divergence of J categorical distributions with equal weights.

``JS(p_1, ..., p_J) = H[1/J sum_j p_j] - 1/J sum_j H[p_j] >= 0`` (Lin, 1991, "Divergence measures based on
the Shannon entropy"). For the members of an ensemble it is the ensemble's mutual information between
the prediction and the member, so LoRA-Curve (Dold et al., 2026) uses ``-lambda JS`` between points on
a curve to raise the curve ensemble's epistemic uncertainty.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def jensen_shannon(log_probs: Tensor) -> Tensor:
    """``H[mean_j p_j] - mean_j H[p_j]`` per example from log-probabilities ``[J, B, C]``; returns ``[B]``.

    Differentiable (no clamping), so ``-lambda * jensen_shannon(...).mean()`` can be minimised directly.
    """
    if not isinstance(log_probs, Tensor) or log_probs.ndim != 3:
        shape = tuple(log_probs.shape) if isinstance(log_probs, Tensor) else type(log_probs).__name__
        raise ValueError(f"log_probs must be a tensor of shape [J, B, C] (members, batch, classes); got {shape}")
    mixture = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
    mixture_entropy = -(mixture.exp() * mixture).sum(-1)
    member_entropy = -(log_probs.exp() * log_probs).sum(-1).mean(0)
    return mixture_entropy - member_entropy
