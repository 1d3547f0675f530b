"""Semi-structured regression: an interpretable linear part on chosen inputs next to a deep part on the rest.

``f(x) = deep(x_rest) + x_S beta^T``, where ``x_S`` are the ``structured_features`` columns and ``x_rest`` the
others, so ``beta`` keeps its meaning (the effect of one unit of each chosen input, all else fixed) while the
deep part models everything else. The linear part is the submodule ``linear`` (no bias; the deep part has
one), so ``params="linear.*"`` puts a posterior on ``beta`` alone. Reference: Ruegamer, Kolb & Klein,
"Semi-Structured Distributional Regression", The American Statistician 2024; the melanoma model of Duerr et
al., "Bernstein flows for flexible posteriors in variational Bayes", AStA 2024, section 5.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_inputs


class SemiStructured(nn.Module):
    """``deep(x[:, rest]) + linear(x[:, structured_features])`` for inputs ``[B, in_features]``.

    Args:
        in_features: number of input columns.
        structured_features: column indices of the interpretable linear part (distinct, in range).
        deep: the network on the remaining ``in_features - len(structured_features)`` columns, with
            ``out_features`` outputs (e.g. ``MLP(in_features=8, out_features=1)``).
        out_features: outputs of both parts (1 for a mean; the likelihood decides the meaning).
    """

    # buffers (register_buffer), typed for readers and checkers
    structured_index: Tensor
    rest_index: Tensor

    def __init__(self, in_features: int, structured_features: list[int], deep: nn.Module, out_features: int = 1) -> None:
        super().__init__()
        chosen = list(structured_features)
        if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= i < in_features for i in chosen):
            raise ValueError(
                f"structured_features must be distinct column indices in [0, {in_features}); got {structured_features!r}"
            )
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1; got {out_features}")
        self.structured_features = chosen
        self.register_buffer("structured_index", torch.tensor(chosen))
        self.register_buffer("rest_index", torch.tensor([i for i in range(in_features) if i not in chosen]))
        self.deep = deep
        self.linear = nn.Linear(len(chosen), out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        width = len(self.structured_index) + len(self.rest_index)
        check_inputs(x, "SemiStructured", f"inputs [B, in_features={width}]",
                     lambda shape: len(shape) == 2 and shape[1] == width, self.linear.weight)
        return self.deep(x.index_select(1, self.rest_index)) + self.linear(x.index_select(1, self.structured_index))
