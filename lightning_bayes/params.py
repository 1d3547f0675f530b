"""Selecting a parameter subset by name pattern: one selector for every method and callback.

A selector is a glob pattern (``fnmatch``) or a list of them, matched against
``module.named_parameters()`` names, plus three aliases:

* ``"all"``: every parameter (trainable or not),
* ``"trainable"``: every parameter with ``requires_grad``,
* ``"last_layer"``: the parameters of the last module (in registration order) that holds any itself (not through
  its children),
* ``"lora"``: peft LoRA matrices (``*lora_A*``, ``*lora_B*``, and an embedding's ``*lora_embedding_A*``,
  ``*lora_embedding_B*``).

Patterns prefixed with ``!`` exclude what they match. A tied parameter (an LM head sharing the embedding matrix)
answers to each of its names and is returned once, under its first name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeGuard, Union

from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

ParamSelector = Union[str, Sequence[str]]

_ALIASES = {"lora": ("*lora_A*", "*lora_B*", "*lora_embedding_A*", "*lora_embedding_B*")}
FSDP1_WRAPPER = "_fsdp_wrapped_module."  # FSDP1's FSDP_PREFIX: the segment it inserts above each wrapped unit


def named_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """``module.named_parameters()`` under the names they had before FSDP1 wrapped units of ``module``.

    Callbacks select parameters by name at setup, before the strategy wraps the module; FSDP1 then moves every
    wrapped unit's parameters under an ``_fsdp_wrapped_module.`` segment (with ``use_orig_params``, Lightning's
    default, they stay the module's own parameters). Other modules' names are unchanged.
    """
    return {name.replace(FSDP1_WRAPPER, ""): p for name, p in module.named_parameters()}


def _last_layer_names(module: nn.Module) -> list[str]:
    last: list[str] = []
    for name, sub in module.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in sub.named_parameters(recurse=False)]
        if own:
            last = own
    return last


def select_parameters(module: nn.Module, params: ParamSelector = "trainable") -> dict[str, nn.Parameter]:
    """Return the parameters of ``module`` selected by ``params``, in registration order.

    Raises ``ValueError`` naming the selector and some available names when nothing matches.
    """
    patterns = [params] if isinstance(params, str) else list(params) if isinstance(params, Sequence) else []
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"params must be a non-empty pattern or list of patterns; got {params!r}")
    named = dict(module.named_parameters())
    first_name = {id(p): n for n, p in named.items()}
    canonical = {n: first_name[id(p)] for n, p in module.named_parameters(remove_duplicate=False)}  # every name
    include: set[str] = set()
    exclude: set[str] = set()
    for pattern in patterns:
        target = exclude if pattern.startswith("!") else include
        key = pattern.lstrip("!")
        if key == "all":
            target.update(named)
        elif key == "trainable":
            target.update(n for n, p in named.items() if p.requires_grad)
        elif key == "last_layer":
            target.update(canonical[n] for n in _last_layer_names(module))
        else:
            for glob in _ALIASES.get(key, (key,)):
                target.update(canonical[n] for n in fnmatch.filter(canonical, glob))
    chosen = {n: p for n, p in named.items() if n in include and n not in exclude}
    if not chosen:
        names = list(named)
        preview = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise ValueError(
            f"params={params!r} matched no parameter of {type(module).__name__}; "
            f"expected glob patterns over names such as: {preview or '(the module has no parameters)'}"
        )
    return chosen


def is_dtensor(tensor: Tensor) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2-sharded parameter, its gradient or state), checked without
    importing ``torch.distributed``."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor: a DTensor's gathered value (a collective, so every rank must call it), else ``tensor``."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def laid_out_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (the whole tensor, equal on every rank) laid out as ``like``: for a DTensor every rank keeps its own
    shard (no communication), else ``full`` viewed in ``like``'s shape."""
    if not is_dtensor(like):
        return full.view_as(like)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.view(like.shape), like.device_mesh, like.placements, src_data_rank=None)


def fsdp2_units(module: nn.Module) -> list[FSDPModule]:
    """The FSDP2 units in ``module`` (none without ``torch.distributed``). FSDP2 keeps the root's gathered copy after a
    forward without gradients, so in-place edits of the sharded parameters (a posterior draw) would not reach the
    next forward: call ``unit.reshard()`` on each first; the next forward gathers them again."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [unit for unit in module.modules() if isinstance(unit, FSDPModule)]
