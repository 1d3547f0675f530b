"""A network that ``torch.func.vmap`` cannot batch, for the tests of the per-example Jacobian's loop fallback."""

import torch
from torch import nn


class CheckedInputs(nn.Sequential):
    """An ``nn.Sequential`` behind an input check, data-dependent Python control flow that vmap rejects (as the
    causal-LM classifier's padding check and transformers' mask code are)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite")
        return super().forward(x)
