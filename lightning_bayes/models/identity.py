"""A network's identity: a hash that changes when its class, module tree or any weight changes."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

_SAMPLES_PER_TENSOR = 4096  # weight values hashed per tensor as they are


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a CPU tensor of any dtype (bfloat16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def backbone_identity(backbone: nn.Module) -> str:
    """A hash of the class, the module tree (``repr``) and every parameter and buffer: its name, shape and dtype, up
    to 4,096 evenly spaced values, and the sum and 2-norm of all its values (float32 or wider) (so a change anywhere in
    a tensor changes the identity, not only at the sampled positions); the same on any device."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(backbone).__module__}.{type(backbone).__qualname__}\n{backbone!r}\n".encode())
    for name, tensor in [*backbone.named_parameters(), *backbone.named_buffers()]:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        count = min(flat.numel(), _SAMPLES_PER_TENSOR)
        positions = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        values = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # half, int, 4-bit packed
        moments = torch.stack([values.sum(), torch.linalg.vector_norm(values)])  # float64 took 4 s for SmolLM2
        digest.update(tensor_bytes(flat[positions].cpu()) + tensor_bytes(moments.cpu()))
    return digest.hexdigest()
