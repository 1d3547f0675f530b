"""A feature extractor held fixed, for post-hoc heads (VBLL, linear probes) on pretrained backbones."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_SAMPLES_PER_TENSOR = 4096  # weight values hashed per tensor into the backbone's identity
_SHARD_FORMAT = 1


def _as_bytes(t: Tensor) -> bytes:
    """The raw bytes of a CPU tensor of any dtype (bfloat16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _describe(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _describe(v) for k, v in x.items()}
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _batch_size(x: Any) -> int:
    tensors = list(x.values()) if isinstance(x, Mapping) else [x]
    if tensors and all(isinstance(t, Tensor) and t.ndim > 0 for t in tensors):
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) == 1:
            return sizes.pop()
    raise ValueError(
        "cache_features needs x to be a tensor [B, ...] or a dict of tensors that all have the batch size "
        f"B as their first dimension; got {_describe(x)}"
    )


def example_keys(x: Tensor | Mapping[str, Tensor]) -> list[str]:
    """One content hash per example of the batch ``x``.

    A tensor ``[B, ...]``: the dtype, the example shape and the bytes of each row. A dict (a tokenizer's
    batch): for each key in sorted order, the row of that tensor; ``[B, T]`` tensors are restricted to
    the positions where ``attention_mask == 1``, so a text has the same key however much padding its
    batch gave it (left or right).
    """
    size = _batch_size(x)
    items = sorted(x.items()) if isinstance(x, Mapping) else [("", x)]
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    mask = mask.detach().cpu().bool() if isinstance(mask, Tensor) and mask.ndim == 2 else None
    hashes = [hashlib.blake2b(digest_size=16) for _ in range(size)]
    for name, value in items:
        value = value.detach().cpu()
        masked = mask is not None and value.shape[:2] == mask.shape
        header = f"{name}|{value.dtype}|{tuple(value.shape[1:]) if not masked else tuple(value.shape[2:])}|"
        for row, digest in enumerate(hashes):
            data = value[row][mask[row]] if masked else value[row]
            digest.update(header.encode() + str(data.shape[0] if masked else 0).encode() + b"|" + _as_bytes(data))
    return [digest.hexdigest() for digest in hashes]


def backbone_identity(backbone: nn.Module) -> str:
    """A hash of the class, the module tree (``repr``) and every parameter and buffer (name, shape,
    dtype and up to 4,096 evenly spaced values): two backbones that differ in weights, architecture or
    precision get different identities, whatever device they are on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(backbone).__module__}.{type(backbone).__qualname__}\n{backbone!r}\n".encode())
    for name, tensor in [*backbone.named_parameters(), *backbone.named_buffers()]:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        count = min(flat.numel(), _SAMPLES_PER_TENSOR)
        positions = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        digest.update(_as_bytes(flat[positions].cpu()))
    return digest.hexdigest()


class FrozenFeatures(nn.Module):
    """Wraps ``backbone`` so it never changes: no gradients, always in eval mode (no dropout noise,
    BatchNorm statistics untouched), and run without an autograd graph. ``num_features`` is kept.

    Feature cache (``cache_features=True``): a frozen backbone maps the same example to the same
    features, yet every epoch and every validation, test and OOD pass would recompute them (seconds per
    batch for an LLM on a CPU). With the cache, each example's feature row is kept under a hash of its
    content (:func:`example_keys`: a tensor row's bytes, or a tokenised text's ids where ``attention_mask``
    is 1, so padding does not matter), and the backbone runs only on the examples not seen before. The
    cache is a plain attribute, never a buffer, so checkpoints do not carry it. It is dropped when the
    backbone's weights change (``load_state_dict``, dtype casts) to different values.

    ``feature_cache_dir`` also keeps the features on disk, for later runs: a folder per backbone identity
    (:func:`backbone_identity`, so a different backbone never reads another's features) holding
    append-only shards, one per batch that computed something, each written to a temporary file and then
    renamed (several processes may share a folder; nothing is overwritten). Features are cached as the
    backbone computed them: a run under another precision (autocast) should use another folder.
    """

    def __init__(
        self,
        backbone: nn.Module,
        cache_features: bool = False,
        feature_cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cache_features, bool):
            raise ValueError(f"cache_features must be True or False; got {cache_features!r}")
        folder = None
        if feature_cache_dir is not None:
            if not isinstance(feature_cache_dir, (str, os.PathLike)) or not str(feature_cache_dir):
                raise ValueError(f"feature_cache_dir must be a folder path or None; got {feature_cache_dir!r}")
            if not cache_features:
                raise ValueError(f"feature_cache_dir={str(feature_cache_dir)!r} needs cache_features=True")
            folder = Path(feature_cache_dir).expanduser()
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"feature_cache_dir={str(feature_cache_dir)!r} exists and is not a folder")
        self.backbone = backbone.requires_grad_(False)
        self.num_features = getattr(backbone, "num_features", None)
        self.cache_features = cache_features
        self.feature_cache_dir = folder
        self._features: dict[str, Tensor] = {}  # example key -> feature row (CPU); not a buffer
        self._features_of: str | None = None  # the backbone identity the rows above belong to
        self._identity: str | None = None  # None: recompute before the next lookup
        self.eval()

    def train(self, mode: bool = True) -> FrozenFeatures:
        return super().train(False)  # frozen: eval mode whatever the surrounding module asks

    def forward(self, x: Any) -> Tensor:
        with torch.no_grad():
            return self._cached_forward(x) if self.cache_features else self.backbone(x)

    # ---- the cache -------------------------------------------------------------------------------

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FrozenFeatures:
        self._identity = None  # .to(dtype), .half(), ...: the weights may have changed
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._identity = None  # new weights may come in
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def _folder(self) -> Path | None:
        folder = self.feature_cache_dir
        return None if folder is None else folder / f"{type(self.backbone).__name__}-{self._identity}"

    def _lookup_table(self) -> dict[str, Tensor]:
        """The rows of the current backbone identity (recomputed after a weight change; disk shards read)."""
        if self._identity is None:
            self._identity = backbone_identity(self.backbone)
        if self._features_of != self._identity:
            self._features, self._features_of = {}, self._identity
            folder = self._folder
            for shard in sorted(folder.glob("*.pt")) if folder is not None and folder.is_dir() else []:
                self._read_shard(shard)
        return self._features

    def _read_shard(self, path: Path) -> None:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
            keys, rows = content["keys"], content["features"]
            if content.get("identity") != self._identity or len(keys) != len(rows):
                raise ValueError("identity or length mismatch")
        except Exception as error:  # noqa: BLE001 - a foreign or damaged file: skip it, the rows are recomputed
            warnings.warn(f"FrozenFeatures: ignoring feature cache file {path} ({error})", stacklevel=3)
            return
        self._features.update(zip(keys, rows))

    def _write_shard(self, keys: list[str], rows: Tensor) -> None:
        folder = self._folder
        assert folder is not None
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".tmp")
        os.close(handle)
        try:
            content = {"format": _SHARD_FORMAT, "identity": self._identity, "keys": keys, "features": rows}
            torch.save(content, temporary)
            name = f"{time.time_ns()}-{os.getpid()}-{Path(temporary).stem.rsplit('-', 1)[-1]}.pt"
            os.replace(temporary, folder / name)  # atomic: readers see the whole shard or none
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def _cached_forward(self, x: Any) -> Tensor:
        keys = example_keys(x)
        table = self._lookup_table()
        missing: dict[str, int] = {}  # key -> first position in the batch, for the keys not cached
        for position, key in enumerate(keys):
            if key not in table:
                missing.setdefault(key, position)
        if missing:
            positions = list(missing.values())
            if len(positions) == len(keys):  # nothing cached: one plain forward pass
                computed = self.backbone(x)
            else:
                index = torch.tensor(positions)
                subset = (
                    {k: v[index.to(v.device)] for k, v in x.items()}
                    if isinstance(x, Mapping)
                    else x[index.to(x.device)]
                )
                computed = self.backbone(subset)
            if not isinstance(computed, Tensor) or computed.shape[0] != len(positions):
                raise ValueError(
                    f"cache_features needs the backbone to return a tensor [B, ...] (one row per example); "
                    f"got {type(computed).__name__} {tuple(getattr(computed, 'shape', ()))} for B={len(positions)}"
                )
            rows = computed.detach().to("cpu", copy=True)  # a compact copy: no view of larger activations
            table.update(zip(missing, rows))
            if self.feature_cache_dir is not None:
                self._write_shard(list(missing), rows)
            if len(positions) == len(keys):
                return computed
            device = computed.device
        else:
            first = next(iter(x.values())) if isinstance(x, Mapping) else x
            device = first.device
        return torch.stack([table[key] for key in keys]).to(device)
