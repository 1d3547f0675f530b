"""Where a batch keeps its input and its target, for the callbacks that read a user's batches.

A tuple or list batch is ``(x, y, ...)``, as a ``TensorDataset`` gives. A dict batch (``{"image": ..., "label":
...}``, a tokenizer's dict with ``"labels"``) names them: ``target_key`` its target, ``input_key`` its input, or,
without ``input_key``, every other entry, as a dict, is the input (``input_ids``, ``attention_mask``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BatchLayout:
    """Splits batches into ``(x, y)``; see the module's docstring."""

    target_key: str | None = None
    input_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_key", "input_key"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a dict batch's key (a str) or None; got {value!r}")

    def split(self, batch: Any, owner: str) -> tuple[Any, Any]:
        """``(x, y)`` of a tuple, list or dict batch; ``owner`` names the caller in errors."""
        if isinstance(batch, Mapping):
            if self.target_key is None:
                raise ValueError(
                    f"{owner} got a dict batch (keys {sorted(batch)}); give target_key (and input_key, or every "
                    "other entry is the input) to say where its target and input are"
                )
            return self.input(batch), self._entry(batch, "target_key", self.target_key)
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise ValueError(f"{owner} expects batches (x, y, ...) or dicts with target_key; got {type(batch).__name__}")

    def target(self, batch: Any) -> Any | None:
        """``y`` of a batch that has one (``(x, y, ...)``, or a dict holding ``target_key``), else ``None`` (an
        unlabelled batch, as a predict loader may give)."""
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[1]
        if isinstance(batch, Mapping) and self.target_key is not None and self.target_key in batch:
            return batch[self.target_key]
        return None

    def input(self, batch: Any) -> Any:
        """``x`` of a tuple or list batch, of a dict with keys given, else the batch itself (a tensor, a dict)."""
        if isinstance(batch, (tuple, list)):
            return batch[0]
        if isinstance(batch, Mapping) and self.input_key is not None:
            return self._entry(batch, "input_key", self.input_key)
        if isinstance(batch, Mapping) and self.target_key is not None:
            return {key: value for key, value in batch.items() if key != self.target_key}
        return batch

    @staticmethod
    def _entry(batch: Mapping[str, Any], name: str, key: str) -> Any:
        if key not in batch:
            raise ValueError(f"{name}={key!r} is not a key of the batch; its keys are {sorted(batch)}")
        return batch[key]
