"""Argument checks: a ``bool`` is not a count or a number here (``True`` is an ``int`` to Python); seeds; class
labels; a network's inputs; a backbone's features."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import Tensor


def is_int(value: Any) -> TypeGuard[int]:
    """An integer (``int``, numpy's) that is not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[float]:
    """A real number (``int``, ``float``, numpy's) that is neither a ``bool`` nor NaN (infinities pass: bound them
    where needed)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def is_finite(value: Any) -> TypeGuard[float]:
    """A finite real number (as :func:`is_number`)."""
    return is_number(value) and math.isfinite(value)


def check_seed(seed: Any, bits: int = 62) -> None:
    """A clear error unless ``seed`` is an int in ``[-2^bits, 2^bits)``: ``torch.Generator.manual_seed`` takes 64 bits
    (a float failed there with "manual_seed expected a long"), less what a caller adds (a rank, a draw counter)."""
    if not (is_int(seed) and -(2**bits) <= seed < 2**bits):
        raise ValueError(f"seed must be an int in [-2^{bits}, 2^{bits}); got {seed!r}")


def check_flags(**flags: Any) -> None:
    """A clear error naming the first of ``flags`` (name=value) that is not a ``bool`` (``"no"`` would be truthy)."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False; got {value!r}")


def held(value: Any) -> str:
    """What ``value`` holds, for an error message: a mapping's first five keys, else its type's name."""
    return str(sorted(map(str, value))[:5]) if isinstance(value, Mapping) else type(value).__name__


def check_folders(**folders: Any) -> None:
    """A clear error naming the first of ``folders`` (name=value) that is neither ``None`` nor a non-empty path (a
    ``str`` or ``os.PathLike``): ``Path(3)`` failed later, in the middle of ``setup``."""
    for name, value in folders.items():
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
            raise ValueError(f"{name} must be a folder path or None; got {value!r}")


def class_labels(y: Any, batch: int, classes: int, who: str, check_range: bool = True) -> Tensor:
    """``y`` as int64 labels ``[batch]`` in ``[0, classes)``, else an error saying that ``who`` expects them. Float and
    bool labels are refused (``long()`` would read 0.7 as class 0, -1 would index the last class); the range check is
    asynchronous on a GPU (no host sync per step; on the CPU the error names the first label outside).
    ``check_range=False`` leaves the range to the caller's indexing (``cross_entropy`` and ``gather`` refuse labels
    outside it themselves) and works under ``torch.func`` transforms, where the asynchronous assert has no batching
    rule."""
    integer = isinstance(y, Tensor) and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    if not integer or y.shape != (batch,):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{who} expects integer class labels of shape [B]=({batch},); got {got}")
    if check_range:
        in_range = ((y >= 0) & (y < classes)).all()
        expected = f"{who} expects labels in [0, {classes}) (the network gives {classes} outputs)"
        if y.device.type == "cpu" and not torch.compiler.is_compiling() and not in_range:  # name the first outside
            raise RuntimeError(f"{expected}; got {y[(y < 0) | (y >= classes)][0].item()}")
        torch._assert_async(in_range, expected)
    return y.long()


def check_inputs(x: Any, who: str, expected: str, fits: Callable[[torch.Size], bool], weight: Any) -> None:
    """A clear error unless ``x`` is a tensor whose shape ``fits`` (``expected`` says which) in the dtype of ``weight``
    (float32 and 16-bit inputs pass under autocast, which casts them; where a variational method's layer holds its
    weight's distribution, a module, in the dtype of that distribution's parameters). Reads shapes and dtypes alone,
    so it runs under ``torch.func`` transforms and ``torch.compile`` (where it is a guard) at no cost."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects {expected} (a float tensor); got {type(x).__name__}")
    if not fits(x.shape):
        raise ValueError(f"{who} expects {expected} (float); got shape {tuple(x.shape)}")
    if isinstance(weight, torch.nn.Module):  # torch's "mat1 and mat2 must have the same dtype" otherwise
        weight = next((p for p in weight.parameters() if p.is_floating_point()), None)
    if not isinstance(weight, Tensor):
        return
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype != weight.dtype and not autocast:
        raise ValueError(f"{who} expects inputs in its weights' dtype {weight.dtype}; got inputs of {x.dtype}")


def check_features(features: Tensor, width: int, who: str) -> None:
    """A clear error unless a backbone's ``features`` are ``[B, width]``, ``B >= 1``; a ``[B, K]`` of another width is
    most likely a classification head left on the backbone (``num_features`` is the width before it), and the error
    says so (the head met them with torch's "mat1 and mat2 shapes cannot be multiplied" otherwise)."""
    if features.ndim != 2 or features.shape[1] != width or not len(features):
        hint = (" (does the backbone still end in its classification head? build it without one: "
                "out_features=0 / num_classes=0)" if features.ndim == 2 and features.shape[1] != width else "")
        raise ValueError(f"{who} expects features [B, {width}], B >= 1; got {tuple(features.shape)}{hint}")


def check_network(value: Any, name: str) -> None:
    """A method's network argument must be an ``nn.Module`` (a str or None failed at the first forward, or in an
    attribute lookup that named no argument)."""
    if not isinstance(value, torch.nn.Module):
        raise ValueError(f"{name} must be a network (an nn.Module); got {type(value).__name__} {value!r:.60}")
