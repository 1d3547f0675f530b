"""``without_cudnn_attention``: the SDPA setting it leaves inside and after its block, and a finite, correct
attention backward in the pattern of pytorch/pytorch#196678 (bf16, an explicit mask, a key length of 64 mod 128,
every query row's log-sum-exp below -ln(FLT_MAX) ~ -88.7), on a CPU and on a CUDA device."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_bayes.models.attention import without_cudnn_attention


def test_the_block_turns_cudnn_off_and_leaves_the_other_kernels_as_they_were():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]):
        with without_cudnn_attention():
            inside = [torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()]
            inside.append(torch.backends.cuda.math_sdp_enabled())
        assert torch.backends.cuda.cudnn_sdp_enabled()
    assert inside == [False, False, True]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_the_setting_comes_back_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"), without_cudnn_attention():
        raise RuntimeError("inside")
    assert torch.backends.cuda.cudnn_sdp_enabled()


def _inputs(device: str) -> tuple[torch.Tensor, ...]:
    """bf16 ``q, k, v``, a causal boolean mask and an upstream gradient; every logit is about -120."""
    generator = torch.Generator().manual_seed(0)
    length, width = 704, 64  # 704 = 5 * 128 + 64

    def draw(scale: float) -> torch.Tensor:
        return (scale * torch.randn(1, 1, length, width, generator=generator)).to(device, torch.bfloat16)

    q, k, v, upstream = draw(0.1), draw(0.1), draw(1.0), draw(1.0)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(width)
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    return q, k, v, mask, upstream


def _gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, upstream: torch.Tensor,
               attend: Callable[..., torch.Tensor]) -> list[torch.Tensor]:  # fmt: skip
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    attend(*leaves, mask).backward(upstream.to(leaves[0].dtype))
    return [t.grad.double() for t in leaves]


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.mT / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf)
    return scores.softmax(-1) @ v


def _guarded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    every = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(every), without_cudnn_attention():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN attention kernel needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA])])
def test_guarded_attention_backward_is_finite_and_matches_float64(device: str):
    """On a CPU (no cuDNN kernel: the twin) and on a CUDA device, where cuDNN's kernel returned NaN here."""
    q, k, v, mask, upstream = _inputs(device)
    got = _gradients(q, k, v, mask, upstream, _guarded)
    expected = _gradients(q.double(), k.double(), v.double(), mask, upstream, _explicit)  # the same bf16 inputs
    for name, value, truth in zip("qkv", got, expected):
        assert value.isfinite().all(), f"grad_{name} is not finite"
        if name == "q":  # column 0 of grad_q cancels terms of size |k_0| = 960: compare the others
            value, truth = value[..., 1:], truth[..., 1:]
        # bf16 gradients (8-bit significand): 2^-7 of the largest entry, twice over for the kernel's fp32 sums
        torch.testing.assert_close(value, truth, rtol=2**-6, atol=2**-6 * truth.abs().max().item(), msg=name)
