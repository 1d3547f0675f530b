"""A per-example cache of a frozen backbone's features, in memory and optionally on disk.

A frozen backbone maps the same example to the same features, yet every epoch and every validation,
test and OOD pass would recompute them (seconds per batch for an LLM on a CPU). :class:`FeatureCache`
keeps each example's feature row under a hash of its content (:func:`example_keys`) and runs the
backbone only on the examples not seen before. With a folder it also keeps the rows on disk: a
sub-folder per backbone identity (:func:`~lightning_bayes.models.identity.backbone_identity`) of append-only shards, each written to a
temporary file and renamed (several processes may share a folder; nothing is overwritten).
"""

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

from .identity import tensor_bytes

_SHARD_FORMAT = 1


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
    batch): for each key in sorted order, the row of that tensor; ``[B, T, ...]`` tensors (token ids,
    ``inputs_embeds``) are restricted to the positions where ``attention_mask == 1``, so a text has the same key
    however much padding its batch gave it (left or right).
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
            data = value[row][mask[row]] if masked and mask is not None else value[row]
            digest.update(header.encode() + str(data.shape[0] if masked else 0).encode() + b"|" + tensor_bytes(data))
    return [digest.hexdigest() for digest in hashes]


class FeatureCache:
    """Feature rows by example key for one backbone identity at a time (see the module docstring)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._features: dict[str, Tensor] = {}  # example key -> feature row (CPU)
        self._identity: str | None = None  # the backbone identity the rows above belong to
        self._shards: Path | None = None  # this identity's folder of shards

    def __call__(self, x: Any, backbone: nn.Module, identity: str) -> Tensor:
        """``backbone(x)``, computing only the rows of examples not cached under ``identity``."""
        self._switch_to(identity, type(backbone).__name__)
        return self._cached_forward(x, backbone)

    def _switch_to(self, identity: str, name: str) -> None:
        if self._identity != identity:
            self._features, self._identity = {}, identity
            self._shards = None if self.folder is None else self.folder / f"{name}-{identity}"
            for shard in sorted(self._shards.glob("*.pt")) if self._shards is not None and self._shards.is_dir() else []:
                self._read_shard(shard)

    def _read_shard(self, path: Path) -> None:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
            keys, rows = content["keys"], content["features"]
            if content.get("identity") != self._identity or len(keys) != len(rows):
                raise ValueError("identity or length mismatch")
        except Exception as error:  # noqa: BLE001 - a foreign or damaged file: skip it, the rows are recomputed
            warnings.warn(f"FeatureCache: ignoring feature cache file {path} ({error})", stacklevel=3)
            return
        self._features.update(zip(keys, rows))

    def _write_shard(self, keys: list[str], rows: Tensor) -> None:
        folder = self._shards
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

    def _cached_forward(self, x: Any, backbone: nn.Module) -> Tensor:
        keys = example_keys(x)
        table = self._features
        missing: dict[str, int] = {}  # key -> first position in the batch, for the keys not cached
        for position, key in enumerate(keys):
            if key not in table:
                missing.setdefault(key, position)
        if missing:
            positions = list(missing.values())
            if len(positions) == len(keys):  # nothing cached: one plain forward pass
                computed = backbone(x)
            else:
                index = torch.tensor(positions)
                subset = (
                    {k: v[index.to(v.device)] for k, v in x.items()}
                    if isinstance(x, Mapping)
                    else x[index.to(x.device)]
                )
                computed = backbone(subset)
            if not isinstance(computed, Tensor) or computed.shape[0] != len(positions):
                raise ValueError(
                    f"cache_features needs the backbone to return a tensor [B, ...] (one row per example); "
                    f"got {type(computed).__name__} {tuple(getattr(computed, 'shape', ()))} for B={len(positions)}"
                )
            rows = computed.detach().to("cpu", copy=True)  # a compact copy: no view of larger activations
            table.update(zip(missing, rows))
            if self.folder is not None:
                self._write_shard(list(missing), rows)
            if len(positions) == len(keys):
                return computed
            device = computed.device
        else:
            first = next(iter(x.values())) if isinstance(x, Mapping) else x
            device = first.device
        return torch.stack([table[key] for key in keys]).to(device)
