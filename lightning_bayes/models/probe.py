"""A linear head on any feature extractor: the MAP counterpart of a post-hoc last-layer method."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..checks import check_features, is_int
from .frozen import frozen_or_trained


class LinearProbe(nn.Module):
    """``Linear(num_features, num_classes)`` on ``backbone(x)`` (features ``[B, num_features]``).

    Args:
        backbone: the feature extractor; it must have ``num_features``.
        num_classes: width of the linear head.
        freeze_backbone: wrap the extractor in a :class:`FrozenFeatures`, so a frozen LLM or a pretrained CNN is
            compared with, e.g., a VBLL head on exactly the same features.
        cache_features: keep each example's features after their first computation (see :class:`FrozenFeatures`);
            needs ``freeze_backbone``.
        feature_cache_dir: also keep them on disk in this folder, for later runs.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        freeze_backbone: bool = True,
        cache_features: bool = False,
        feature_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        width = getattr(backbone, "num_features", None)
        if not is_int(width) or width < 1 or num_classes < 1:
            raise ValueError(
                f"LinearProbe needs backbone.num_features >= 1 and num_classes >= 1; got "
                f"{type(backbone).__name__}.num_features={width!r}, num_classes={num_classes}"
            )
        self.backbone = frozen_or_trained(backbone, freeze_backbone, cache_features, feature_cache_dir)
        self.num_features = width
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Any) -> Tensor:
        features = self.backbone(x)
        check_features(features, self.num_features, "LinearProbe")  # a backbone's head gave "mat1 and mat2" before
        return self.head(features.to(self.head.weight.dtype))  # e.g. a bf16 LLM's features into a float32 head
