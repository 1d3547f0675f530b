"""Files a callback writes next to a run's logs: never overwriting what is there (``name.json``, ``name-1.json``, ...)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from torch.utils._pytree import tree_flatten


def run_folder(trainer: Trainer) -> Path | None:
    """The run's log folder (``trainer.log_dir``, a collective call: every rank must ask) or the root folder; None
    under ``fast_dev_run``, which writes no files (Lightning turns its loggers and checkpoints off there too)."""
    if trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning
        return None
    return Path(trainer.log_dir or trainer.default_root_dir)


def loader_suffixes(loaders: Any) -> list[str]:
    """One name suffix per loader of a stage (a loader, a list, a dict's values, ... in Lightning's ``dataloader_idx``
    order): ``/dataloader_idx_k`` when there are several, as Lightning names a step's logs; ``""`` for one."""
    count = len(tree_flatten(loaders)[0])
    return [f"/dataloader_idx_{k}" for k in range(count)] if count > 1 else [""]


def numbered(folder: Path, stem: str, index: int, ending: str) -> Path:
    """``folder/stem+ending``, or ``stem-index+ending`` for ``index > 0``."""
    return folder / f"{stem}{f'-{index}' if index else ''}{ending}"


def first_free_index(folder: Path, names: list[tuple[str, str]]) -> int:
    """The smallest ``k`` for which no :func:`numbered` file of ``names`` (``(stem, ending)`` pairs) exists in
    ``folder``: one numbering for files written together."""
    index = 0
    while any(numbered(folder, stem, index, ending).exists() for stem, ending in names):
        index += 1
    return index


def unique_path(folder: Path, stem: str, suffix: str, *companions: str) -> Path:
    """``folder/stem+suffix``, or ``stem-1``, ``stem-2``, ... when taken; with ``companions`` (e.g. ``".json"`` for a
    plot's data), the first stem free for every suffix, so that the files written under it stay a pair."""
    return numbered(folder, stem, first_free_index(folder, [(stem, e) for e in (suffix, *companions)]), suffix)


def standard_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by ``None``: Python's ``json`` writes them as bare ``NaN``
    and ``Infinity``, which standard JSON readers (``jq``, JavaScript, pandas' ``orient``s) refuse."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: standard_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [standard_json(value) for value in data]
    return data


def write_json(folder: Path, stem: str, data: Any) -> Path:
    """Write ``data`` as a new standard JSON file under ``folder`` (created if needed; a NaN or infinite value, such as
    a diverged model's NLL, is written as ``null``); return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = unique_path(folder, stem, ".json")
    with open(path, "x") as handle:  # "x": never overwrite
        json.dump(standard_json(data), handle, indent=2, sort_keys=True, allow_nan=False)
    return path
