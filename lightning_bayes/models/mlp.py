"""Multilayer perceptron backbone; ``out_features=0`` gives the feature extractor (timm's convention)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..checks import check_inputs, is_int

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    """``Flatten -> [Linear -> activation -> Dropout] x len(hidden) -> Linear(out_features)``.

    Args:
        in_features: width of the (flattened) input.
        out_features: width of the output layer; ``0`` returns the last hidden layer's features.
        hidden: widths of the hidden layers.
        dropout: dropout rate after every hidden activation (``0``: none).
        activation: ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"silu"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: list[int] = [256, 256],  # noqa: B006 - read only, and LightningCLI shows the default
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        if not (is_int(in_features) and is_int(out_features)):
            raise ValueError(f"in_features and out_features must be ints; got {in_features!r} and {out_features!r}")
        if not isinstance(hidden, (list, tuple)) or not all(is_int(size) for size in hidden):
            raise ValueError(f"hidden must be a list of layer widths (ints), e.g. [256, 256]; got {hidden!r}")
        if in_features < 1 or out_features < 0 or not hidden or min(hidden) < 1:
            raise ValueError(
                f"expected in_features >= 1, out_features >= 0 and positive hidden widths; "
                f"got in_features={in_features}, out_features={out_features}, hidden={hidden}"
            )
        self.in_features = in_features
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.features = nn.Sequential(*layers)
        self.num_features = width
        self.head = nn.Linear(width, out_features) if out_features > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        width = self.in_features
        check_inputs(x, "MLP", f"inputs [B, {width}] (or [B, ...] of {width} values each)",
                     lambda shape: len(shape) >= 2 and math.prod(shape[1:]) == width,
                     getattr(self.features[1], "weight", None))  # a variational stand-in by now, perhaps
        return self.head(self.features(x))
