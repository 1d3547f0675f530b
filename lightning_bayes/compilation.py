"""Calls into ``torch.compile``d code that a method's boolean argument asked for, with an error naming that argument.

:func:`compiled` compiles a module-level function once per process (not a bound method of a module: that does not
pickle for ``ddp_spawn``, and a deepcopy would keep calling the original); its arguments, e.g. the head or network,
become guarded inputs, so objects of one architecture share the code. Inductor builds C++ on a CPU (it needs a
compiler such as ``g++``) and Triton kernels on a GPU; where it cannot, dynamo raises ``BackendCompilerFailed`` deep
inside a training step. :func:`compiled_by` re-raises it as a ``RuntimeError`` that says which argument turned
compilation on and how to run without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch._dynamo.exc import BackendCompilerFailed

_Function = TypeVar("_Function", bound=Callable[..., object])


@functools.cache
def compiled(function: _Function, dynamic: bool | None = None) -> _Function:
    """``torch.compile(function, dynamic=dynamic)``, built once per process and function."""
    return torch.compile(function, dynamic=dynamic)  # type: ignore[return-value]


@contextmanager
def compiled_by(argument: str) -> Iterator[None]:
    """Run a compiled call; a failed compilation names ``argument`` (e.g. ``"compile_loss"``)."""
    try:
        yield
    except BackendCompilerFailed as error:
        cause = error.inner_exception
        raise RuntimeError(
            f"{argument}=True runs under torch.compile, which could not compile ({type(cause).__name__}: {cause}). "
            f"A CPU needs a C++ compiler (g++; scripts/install.sh installs it), a GPU Triton; or set {argument}=False "
            "(same results, eager)."
        ) from error
