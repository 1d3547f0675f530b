"""Loading trained weights into a bare backbone, from a Lightning checkpoint or a saved state dict.

Post-hoc methods (null-space Laplace, subspace inference) start from a trained network. The checkpoint
of, say, ``MAP(backbone=LeNet5())`` stores the backbone under ``backbone.*``; :func:`load_trained_weights`
finds the prefix under which *all* of the model's tensors are present, so the same call works for any
method's checkpoint, and refuses a checkpoint of a different model with the names that do not match.
"""

from __future__ import annotations

import glob
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..checks import held


def relative_to_note(path: str) -> str:
    """``" (relative to the working folder ...)"`` for a relative ``path`` in a not-found message, else ``""``."""
    return "" if Path(path).is_absolute() else f" (relative to the working folder {os.getcwd()})"


def resolve_checkpoint_path(checkpoint: str) -> Path:
    """``checkpoint`` itself, or the newest file matching it when it is a glob pattern
    (e.g. ``runs/mnist_map/version_*/checkpoints/best.ckpt``)."""
    where = relative_to_note(checkpoint)
    if any(c in checkpoint for c in "*?[") and not Path(checkpoint).is_file():  # "run[1]/best.ckpt" is a file
        matches = sorted(glob.glob(checkpoint), key=os.path.getmtime)
        if not matches:
            raise FileNotFoundError(f"checkpoint={checkpoint!r} matches no file{where}; train the model first")
        rank_zero_info(f"checkpoint={checkpoint!r}: {matches[-1]} (the newest of {len(matches)})")
        return Path(matches[-1])
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint!r} is not a file{where}; train the model first")
    return path


def load_torch_file(path: str | Path, named: str, expected: str) -> Any:
    """``torch.load`` of ``path`` weights-only (a zip archive, torch.save's format, memory-mapped: its tensors are not
    read), or ``None`` for a file holding classes that a weights-only load refuses; a file torch cannot read (empty,
    text, random bytes, a broken zip archive) gets a ``ValueError`` saying that ``named`` (e.g. ``checkpoint='x'``)
    is not ``expected``, where unpickling raised ``EOFError`` or ``UnpicklingError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            return None
        raise ValueError(f"{named} is not {expected} (torch.load found no checkpoint in it)") from None
    except (EOFError, KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:  # empty
        # file, text, random bytes, a broken zip archive: whatever unpickling them raises
        raise ValueError(f"{named} is not {expected} (torch.load: {type(error).__name__}: {error})") from None


def load_checkpoint(path: str | Path) -> Any:
    """What the file of a ``checkpoint=path`` argument holds (:func:`load_torch_file`; one holding classes, e.g. in
    its hyperparameters, loads without ``weights_only``), else an error that it is not a checkpoint."""
    saved = load_torch_file(path, f"checkpoint={str(path)!r}", "a Lightning checkpoint or state dict")
    return torch.load(path, map_location="cpu", weights_only=False) if saved is None else saved


def _state_dict(path: Path) -> dict[str, Tensor]:
    saved = load_checkpoint(path)
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint={str(path)!r} is not a Lightning checkpoint or state dict (it holds {held(saved)})"
        )
    return state


def trained_state_dict(model: nn.Module, checkpoint: str) -> tuple[dict[str, Tensor], Path]:
    """The tensors of ``checkpoint`` named as in ``model.state_dict()`` (found under the prefix that holds all
    of them), and the file used; ``model`` is left unchanged. A checkpoint of a Gaussian variational posterior
    (BLoB, mean-field VI: ``<name>.mean`` and ``<name>.raw_scale``) gives its means, with a warning.

    Raises ``ValueError`` naming missing tensors, tensors under that prefix the model has no place for (a deeper
    network's, the adapters of other LoRA targets) or shape mismatches when the checkpoint is of another model, and
    the candidates when several prefixes of the shortest length hold a whole model (a deep ensemble's members).
    """
    path = resolve_checkpoint_path(checkpoint)
    state = _state_dict(path)
    wanted = model.state_dict() or _named_tensors(model)  # a state dict leaving everything out: all its tensors
    prefix = _whole_model_prefix(state, wanted, path, model)
    if prefix is None:
        means = {key.removesuffix(".mean"): value for key, value in state.items() if key.endswith(".mean")}
        prefix = _whole_model_prefix({**state, **means}, wanted, path, model) if means else None
        if prefix is None:
            missing = [name for name in wanted if not any(k.endswith(name) for k in state)]
            raise ValueError(
                f"checkpoint {str(path)!r} is not of a {type(model).__name__}: no prefix holds all of its "
                f"{len(wanted)} tensors (e.g. missing {missing[:5]}; the checkpoint has {list(state)[:5]}...)"
            )
        warnings.warn(
            f"checkpoint {str(path)!r} holds a variational posterior (e.g. BLoB's or mean-field VI's): "
            f"{type(model).__name__} gets its means",
            stacklevel=2,
        )
        state = {**state, **means}
    # the checkpoint's tensors of the model's parameters and buffers that its state dict leaves out (a base frozen
    # after it was built and changed since, e.g. adapters merged into a FrozenFeatures backbone) load too
    tensors = {**_named_tensors(model), **wanted}
    wanted = {**wanted, **{name: t for name, t in tensors.items() if name not in wanted and prefix + name in state}}
    mismatched = [
        f"{name} {tuple(state[prefix + name].shape)} vs {tuple(t.shape)}"
        for name, t in wanted.items()
        if state[prefix + name].shape != t.shape
    ]
    if mismatched:
        raise ValueError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {mismatched[:5]}")
    extra = _unplaced(state, prefix, model, wanted)
    if extra:
        raise ValueError(
            f"checkpoint {str(path)!r} is not of this {type(model).__name__}: it holds {len(extra)} tensors under "
            f"{prefix!r} that the model has no place for (e.g. {extra[:5]}): a deeper network's, or adapters of other "
            "LoRA target modules?"
        )
    return {name: state[prefix + name] for name in wanted}, path


def persistent_buffers(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s buffers a state dict holds (``Module.state_dict`` leaves out the non-persistent ones), under each
    of their names."""
    return {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, module in model.named_modules(remove_duplicate=False)
        for name, buffer in module.named_buffers(recurse=False)
        if buffer is not None and name not in module._non_persistent_buffers_set
    }


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and persistent buffer of ``model`` (what a state dict can hold) under each of its names."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **persistent_buffers(model)}


def _unplaced(
    state: Mapping[str, Tensor], prefix: str, model: nn.Module, wanted: Mapping[str, Tensor]
) -> list[str]:
    """Names under ``prefix`` in ``state`` that are none of ``model``'s parameters or buffers (those a state dict
    leaves out, such as a frozen base, included), nor their extra state (4-bit quantisation state under the weight's
    name), nor a variational posterior's ``.mean`` / ``.raw_scale`` of one."""
    names = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    known = {name for name, _ in names} | set(wanted)
    unplaced = []
    for key in state:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        stem = name.removesuffix(".mean").removesuffix(".raw_scale")
        if name not in known and stem not in known and not any(name.startswith(k + ".") for k in known):
            unplaced.append(name)
    return unplaced


def _whole_model_prefix(
    state: Mapping[str, Tensor], wanted: Mapping[str, Tensor], path: Path, model: nn.Module
) -> str | None:
    """The shortest key prefix under which ``state`` holds every tensor ``wanted`` names (None if none does);
    several of that length (a deep ensemble's members) are refused."""
    candidates = {k[: len(k) - len(name)] for k in state for name in wanted if k.endswith(name)}
    candidates = {p for p in candidates if p == "" or p.endswith(".")}  # "backbone.10.weight" is no "0.weight"
    complete = sorted(prefix for prefix in candidates if all(prefix + name in state for name in wanted))
    if not complete:
        return None
    shortest = min(map(len, complete))
    prefix, *others = [p for p in complete if len(p) == shortest]
    if others:
        raise ValueError(
            f"checkpoint {str(path)!r} holds {1 + len(others)} whole {type(model).__name__}s, under "
            f"{[prefix, *others]} (e.g. a deep ensemble's members), so which one to load is ambiguous: save the "
            f"one you want as a state dict, e.g. torch.save({{k.removeprefix({prefix!r}): v for k, v in "
            f"torch.load(path)['state_dict'].items() if k.startswith({prefix!r})}}, 'member.pt'), and pass that "
            "file"
        )
    return prefix


def load_trained_likelihood(likelihood: nn.Module, source: Path | Mapping[str, Tensor]) -> bool:
    """Copy a trained likelihood's tensors (a Gaussian's noise: ``likelihood.*`` in a module's checkpoint) into
    ``likelihood`` when ``source`` (a checkpoint file or its state dict) holds them all; return whether it did (a
    plain network's state dict has none: the likelihood keeps its initial values)."""
    wanted = likelihood.state_dict()
    if not wanted:
        return False
    state = _state_dict(source) if isinstance(source, Path) else source
    saved = {name: state.get(f"likelihood.{name}") for name in wanted}
    if not all(value is not None and value.shape == wanted[name].shape for name, value in saved.items()):
        return False
    likelihood.load_state_dict(saved)
    return True


def load_trained_weights(model: nn.Module, checkpoint: str) -> Path:
    """Copy the tensors of ``checkpoint`` into ``model`` (in place); return the file used.

    Raises ``ValueError`` naming missing tensors or shape mismatches when the checkpoint is of another model.
    """
    state, path = trained_state_dict(model, checkpoint)
    model.load_state_dict(state)
    return path
