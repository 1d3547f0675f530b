"""A feature extractor held fixed, for post-hoc heads (VBLL, linear probes) on pretrained backbones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_flags, check_folders
from .feature_cache import FeatureCache
from .identity import backbone_identity
from ..torch_func_state import inside_torch_func


def _autocast_state() -> str:
    """Which autocast is on (features computed under it differ from float32 ones): ``""`` when none is; part of a
    cache folder's name, so only characters every file system takes (``|`` is refused on Windows)."""
    return "".join(
        f"-autocast-{device}-{str(torch.get_autocast_dtype(device)).removeprefix('torch.')}"
        for device in ("cpu", "cuda")
        if torch.is_autocast_enabled(device)
    )


def frozen_or_trained(
    backbone: nn.Module, freeze_backbone: bool, cache_features: bool, feature_cache_dir: str | None
) -> nn.Module:
    """A post-hoc head's backbone: :class:`FrozenFeatures` when ``freeze_backbone``, else ``backbone`` itself, which
    trains and so has no features to cache."""
    check_flags(freeze_backbone=freeze_backbone)
    if not freeze_backbone and (cache_features or feature_cache_dir is not None):
        raise ValueError(
            f"cache_features={cache_features!r} / feature_cache_dir={feature_cache_dir!r} need freeze_backbone=True (a "
            "trained backbone's features change): give cache_features=False and feature_cache_dir=None to fine-tune"
        )
    return FrozenFeatures(backbone, cache_features, feature_cache_dir) if freeze_backbone else backbone


class FrozenFeatures(nn.Module):
    """Wraps ``backbone`` so it never changes: no gradients, always in eval mode (no dropout noise,
    BatchNorm statistics untouched), and run without an autograd graph. ``num_features`` is kept.

    Feature cache (``cache_features=True``): a frozen backbone maps the same example to the same
    features, yet every epoch and every validation, test and OOD pass would recompute them (seconds per
    batch for an LLM on a CPU). With the cache, each example's feature row is kept under a hash of its
    content (:func:`example_keys`: a tensor row's bytes, or a tokenised text's ids where ``attention_mask``
    is 1, so padding does not matter), and the backbone runs only on the examples not seen before. The
    cache is a plain attribute, never a buffer, so checkpoints do not carry it. It is dropped when the
    backbone's weights change to different values: through ``load_state_dict`` (this module's or the backbone's own),
    dtype casts, or any in-place change torch counts (``Tensor._version``; not a write through ``.data``).

    ``feature_cache_dir`` also keeps the features on disk, for later runs: a folder per backbone identity
    (:func:`backbone_identity`, so a different backbone never reads another's features) holding
    append-only shards, one per batch that computed something, each written to a temporary file and then
    renamed (several processes may share a folder; nothing is overwritten). Features computed under autocast are
    kept apart from those computed without it (or under another autocast dtype).

    Args:
        backbone: the network to freeze; its ``num_features`` is kept.
        cache_features: keep each example's features after their first computation.
        feature_cache_dir: also keep them on disk in this folder (needs ``cache_features``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        cache_features: bool = False,
        feature_cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        check_flags(cache_features=cache_features)
        check_folders(feature_cache_dir=feature_cache_dir)
        folder = None
        if feature_cache_dir is not None:
            if not cache_features:
                raise ValueError(f"feature_cache_dir={str(feature_cache_dir)!r} needs cache_features=True")
            folder = Path(feature_cache_dir).expanduser()
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"feature_cache_dir={str(feature_cache_dir)!r} exists and is not a folder")
        self.backbone = backbone.requires_grad_(False)
        self.num_features = getattr(backbone, "num_features", None)
        self.cache_features = cache_features
        self.feature_cache_dir = folder
        self._cache = FeatureCache(folder) if cache_features else None  # a plain attribute: not in checkpoints
        self._identity: str | None = None  # None: recompute before the next lookup
        self._versions: list[tuple[int, int]] = []  # the backbone tensors' (id, _version) when it was computed
        self.eval()

    def train(self, mode: bool = True) -> FrozenFeatures:
        return super().train(False)  # frozen: eval mode whatever the surrounding module asks

    def forward(self, x: Any) -> Tensor:
        with torch.no_grad():
            # inside a torch.func transform no bytes can be read to key the cache: the backbone runs
            if self._cache is None or (not torch.compiler.is_compiling() and inside_torch_func()):
                return self.backbone(x)
            tensors = [*self.backbone.parameters(), *self.backbone.buffers()]
            # an inference tensor keeps no version count (and may change unseen): the identity is recomputed
            versions = [(id(t), -1 if t.is_inference() else t._version) for t in tensors]
            if self._identity is None or versions != self._versions or any(t.is_inference() for t in tensors):
                self._identity, self._versions = backbone_identity(self.backbone), versions
            return self._cache(x, self.backbone, self._identity + _autocast_state())

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FrozenFeatures:
        self._identity = None  # .to(dtype), .half(), ...: the weights may have changed
        return super()._apply(fn, *args, **kwargs)
