"""LeNet-5 as used for MNIST in the Laplace literature (Immer et al. 2021; Daxberger et al. 2021)."""

from __future__ import annotations

from torch import Tensor, nn

from ..checks import check_inputs, is_int


class LeNet5(nn.Module):
    """conv(6, 5) -> ReLU -> pool -> conv(16, 5) -> ReLU -> pool -> 120 -> 84 -> classes (44,426 parameters).

    Args:
        num_classes: width of the classification head; ``0`` returns the 84-dimensional features.
        in_channels: channels of the 28 x 28 input images.
        dropout: ``> 0`` adds dropout of this rate after the two hidden linear layers (for MC dropout).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if not (is_int(num_classes) and is_int(in_channels)):
            raise ValueError(f"num_classes and in_channels must be ints; got {num_classes!r} and {in_channels!r}")
        if num_classes < 0 or in_channels < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"expected num_classes >= 0, in_channels >= 1, 0 <= dropout < 1; "
                f"got num_classes={num_classes}, in_channels={in_channels}, dropout={dropout}"
            )
        def hidden(i: int, o: int) -> list[nn.Module]:
            return [nn.Linear(i, o), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), *hidden(256, 120), *hidden(120, 84),
        )  # fmt: skip
        self.num_features, self.in_channels = 84, in_channels
        self.head = nn.Linear(84, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        channels = self.in_channels  # the first layer may be a variational method's stand-in by now
        check_inputs(x, "LeNet5", f"images [B, {channels}, 28, 28]",
                     lambda shape: len(shape) == 4 and tuple(shape[1:]) == (channels, 28, 28),
                     getattr(self.features[0], "weight", None))
        return self.head(self.features(x))
