"""Whether code runs inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...).

Inside one, tensors have no readable bytes (``.numpy()``, ``.item()`` and data pointers fail, even on tensors made
outside it) and batched values keep no memory layout, so models that read values (a feature cache's keys, an input
check) or choose layouts skip that there. The post-hoc methods' per-example Jacobians and Jacobian-vector products
run the network inside such transforms; :func:`plain_values` reads an input's values there all the same, and
:func:`mapped_by_vmap` tells the inputs ``vmap`` maps over (whose values no data-dependent branch may read).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def inside_torch_func() -> bool:
    """True while a ``torch.func`` transform is being applied (functorch's interpreter stack is not empty)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _unwrapped_levels(tensor: Tensor) -> Iterator[Tensor]:
    """``tensor`` and each tensor under its transforms' wrappers, outermost first; the last is plain."""
    yield tensor
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
        yield tensor


def plain_values(tensor: Tensor) -> Tensor:
    """``tensor`` without the wrappers of the transforms it is inside: for an input ``vmap`` maps over, the whole
    batch (mapped dimensions included), whose values can be read, e.g. to check every example at once."""
    return list(_unwrapped_levels(tensor))[-1]


def mapped_by_vmap(tensor: Tensor) -> bool:
    """Whether ``vmap`` maps over ``tensor`` at some level of the transforms it is inside (a per-example input under
    ``vmap``; not a tensor only ``grad`` or ``jvp`` wraps, nor one a ``vmap`` closes over)."""
    return any(torch._C._functorch.is_batchedtensor(level) for level in _unwrapped_levels(tensor))
