"""A network's identity: a hash that changes when its class, module tree or any weight changes."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

_SAMPLES_PER_TENSOR = 4096  # weight values hashed per tensor as they are


def byte_checksum(flat: Tensor) -> Tensor:
    """The int64 sum, with wrap-around, of a flat tensor's bytes read as 8-byte words, then its last ``nbytes mod 8``
    bytes: exact, so the same whatever the order of the reduction (thread count, device), unlike a float sum, and as
    fast; a changed value changes it (a permutation of whole words does not)."""
    raw = flat.contiguous().view(torch.uint8)
    whole = raw.numel() // 8 * 8
    words = raw[:whole] if raw.storage_offset() % 8 == 0 else raw[:whole].clone()
    return torch.cat([words.view(torch.int64).sum().reshape(1), raw[whole:].to(torch.int64)])


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a CPU tensor of any dtype (bfloat16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def backbone_identity(backbone: nn.Module) -> str:
    """A hash of the class, the module tree (``repr``) and every parameter and buffer: its name, shape and dtype, up
    to 4,096 evenly spaced values, and the :func:`byte_checksum` of all its values (so a changed value anywhere in a
    tensor changes the identity, not only at the sampled positions); the same on any device and thread count."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(backbone).__module__}.{type(backbone).__qualname__}\n{backbone!r}\n".encode())
    for name, tensor in [*backbone.named_parameters(), *backbone.named_buffers()]:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        count = min(flat.numel(), _SAMPLES_PER_TENSOR)
        positions = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        digest.update(tensor_bytes(flat[positions].cpu()) + tensor_bytes(byte_checksum(flat).cpu()))
    return digest.hexdigest()
