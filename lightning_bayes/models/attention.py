"""The attention kernels a transformers backbone may run: every one the caller allows except cuDNN's.

From torch 2.11, the cuDNN kernel of ``scaled_dot_product_attention`` is the default for bf16/fp16 on H100/H200,
and its backward returns NaN query gradients under an attention mask when a query row's log-sum-exp is below
``-ln(FLT_MAX) ~ -88.7`` (pytorch/pytorch#196678); a left-padded prompt's fully masked padding rows can be such rows.
It is the likely cause of what we saw on an H200 (torch 2.11): QLoRA (bf16 compute, left-padded reviews) went
NaN at the third step; the same run in float32, where the kernel does not apply, did not. The backward runs the
kernel its forward chose, so guarding the forward is enough; the flash, memory-efficient and math kernels stay as
the caller set them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """Disable cuDNN's attention kernel inside the block (restoring the caller's setting after it)."""
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
