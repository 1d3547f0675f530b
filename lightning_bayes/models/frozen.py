"""A feature extractor held fixed, for post-hoc heads (VBLL, linear probes) on pretrained backbones."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class FrozenFeatures(nn.Module):
    """Wraps ``backbone`` so it never changes: no gradients, always in eval mode (no dropout noise,
    BatchNorm statistics untouched), and run without an autograd graph. ``num_features`` is kept."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.num_features = getattr(backbone, "num_features", None)
        self.eval()

    def train(self, mode: bool = True) -> FrozenFeatures:
        return super().train(False)  # frozen: eval mode whatever the surrounding module asks

    def forward(self, x: Any) -> Tensor:
        with torch.no_grad():
            return self.backbone(x)
