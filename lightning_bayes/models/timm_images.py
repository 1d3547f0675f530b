"""A timm network that takes images as datasets hold them: pixels in [0, 1], any size, grey or RGB.

Pretrained networks expect their training input: a fixed size, three channels and the mean / std of their
pretraining. :class:`TimmImageModel` reads those from the network's pretrained configuration (timm's
``resolve_model_data_config``) and adapts each batch in the forward pass: every image is resized to ``input_size``
with the configuration's interpolation and PIL's kernel, as timm's evaluation transform does (bicubic for
EfficientNet-Lite0; values clamped to [0, 1], as PIL keeps them), grey images are repeated over the channels, and
all are normalised. Adapting in the forward, not in the dataset, keeps a 28 px dataset at 28 px in memory, and a
:class:`FrozenFeatures` cache keys on the small image (a resized copy of Fashion-MNIST at 112 px would take 3 GB).
The whole image is resized (no centre crop: small datasets fill their frame).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional

from ..checks import check_flags, is_int
from ..extras import needs_extra
from ..torch_func_state import inside_torch_func
from .timm import fixed_input_size, timm_backbone

with needs_extra("vision"):
    import timm

_MODES = ("bicubic", "bilinear", "nearest")  # timm configurations name these (and PIL's others: bilinear then)


class TimmImageModel(nn.Module):
    """``timm_backbone(name, num_classes, pretrained, drop_rate)`` behind its input adaptation.

    Args:
        name: a timm model name, e.g. ``"tf_efficientnet_lite0"``.
        num_classes: ``0`` for a pooled feature extractor (``num_features`` wide), else a fresh linear head.
        pretrained: as in :func:`~lightning_bayes.models.timm.timm_backbone` (``"packaged"``: the EfficientNet-Lite0
            ImageNet weights of a pip package).
        input_size: the side images are resized to; ``None``: the pretrained size (224 for EfficientNet-Lite0). A
            network built for one size (a ViT) is built for this one (timm resamples pretrained position
            embeddings).
            Smaller sides are much cheaper on a CPU (EfficientNet-Lite0 on 2 threads: 1.1 ms an image at 64 px,
            4.5 ms at 112 px).
        drop_rate: dropout before the head.
        channels_last: hold the network's weights and its inputs in the NHWC layout, the fast path of oneDNN and
            cuDNN convolutions (EfficientNet-Lite0 on one CPU thread: 2.0 against 3.2 ms an image at 64 px, 7.9
            against 12.1 at 112 px); the outputs agree to float rounding.

    Inputs: ``[B, C, H, W]`` with ``C`` 1 or the network's channel count, values in [0, 1].
    """

    def __init__(
        self,
        name: str,
        num_classes: int = 0,
        pretrained: bool | str = False,
        input_size: int | None = None,
        drop_rate: float = 0.0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if input_size is not None and not (is_int(input_size) and input_size >= 8):
            raise ValueError(f"input_size must be None or an int >= 8 (pixels); got {input_size!r}")
        check_flags(channels_last=channels_last)
        img_size = input_size if input_size is not None and fixed_input_size(name) else None
        self.network = timm_backbone(name, num_classes, pretrained=pretrained, drop_rate=drop_rate, img_size=img_size)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network.to(memory_format=self.memory_format)
        config = timm.data.resolve_model_data_config(self.network)
        channels, height, width = config["input_size"]
        self.channels = int(channels)
        self.input_size = (input_size, input_size) if input_size is not None else (int(height), int(width))
        self.mode = config["interpolation"] if config["interpolation"] in _MODES else "bilinear"
        self.mean, self.std = tuple(config["mean"]), tuple(config["std"])  # made in the input's dtype at each call
        self.num_features = cast(int, self.network.num_features)
        self._pixels_checked = False

    def extra_repr(self) -> str:
        """The adaptation, part of the repr and so of a feature cache's backbone identity (:mod:`.identity`); ``pil``
        names the resize (PIL's kernels; features cached before it came from torch's sharper upsampling)."""
        return (
            f"input_size={self.input_size}, mode={self.mode!r}, resize='pil', channels={self.channels}, "
            f"mean={self.mean}, std={self.std}"
        )

    @torch.compiler.disable  # a compiled forward checks its first batch too (eagerly)
    def _check_pixels(self, images: Tensor) -> None:
        """Until a batch passes (outside ``torch.func`` transforms, where values cannot be read): standardised
        pixels, the likely mistake, are refused by name."""
        if self._pixels_checked or inside_torch_func():
            return
        low, high = images.min().item(), images.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"images must hold pixels in [0, 1] (TimmImageModel normalises them itself: give the datamodule "
                f"normalize=False); got values in [{low:.3g}, {high:.3g}]"
            )
        self._pixels_checked = True

    def adapt(self, images: Tensor) -> Tensor:
        """``[B, 1 or C, H, W]`` in [0, 1] -> the network's input ``[B, C, *input_size]``, normalised.

        The resize is PIL's, as in timm's evaluation transform: torch's antialiased kernels, which equal PIL's when
        enlarging too (bicubic ``a = -0.5``; without antialiasing torch upsamples with ``a = -0.75``), in float32
        for half-precision images (a CPU has no half-precision antialiased resize)."""
        if images.ndim != 4 or images.shape[1] not in (1, self.channels):
            raise ValueError(
                f"images must be [B, 1 or {self.channels}, H, W] with values in [0, 1]; got shape {tuple(images.shape)}"
            )
        self._check_pixels(images)
        if tuple(images.shape[-2:]) != self.input_size:
            wide = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
            antialias = self.mode != "nearest"  # interpolate's antialias covers (bi)linear and bicubic
            resized = functional.interpolate(wide, self.input_size, mode=self.mode, antialias=antialias)
            images = resized.clamp(0, 1).to(images.dtype)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        images = (images.expand(-1, self.channels, -1, -1) - mean) / std  # grey: resized once, then repeated
        if self.memory_format is torch.contiguous_format or torch.compiler.is_compiling():
            return images.contiguous()
        if inside_torch_func():  # vmap keeps no layout (its weights are views of a flat vector too)
            return images
        return images.contiguous(memory_format=self.memory_format)

    def forward(self, images: Tensor) -> Tensor:
        return self.network(self.adapt(images))
