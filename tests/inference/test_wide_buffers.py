"""WideBuffers: a cast of the whole network to a narrower dtype (Lightning's ``precision="bf16-true"``) leaves
posterior state in its own dtype, bit for bit; widening casts and device moves still apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bayes.inference.elliptical_slice import EllipticalSlice
from lightning_bayes.inference.nullspace import AlternatingProjections
from lightning_bayes.inference.swag import SWAGMoments
from lightning_bayes.inference.wide_buffers import WideBuffers

pytestmark = pytest.mark.usefixtures("single_thread")


def test_swag_moments_keep_their_digits_through_a_bf16_cast() -> None:
    """Weights near 1 that move by 1e-2: ``E[w^2] - E[w]^2`` (about 1e-4) is far below bf16's resolution at 1
    (2^-7), so the cast moments gave variances of zero (clamped to 1e-30) or of 1e-2, not the iterates'. (float32
    holds it to about 1e-3 relative: 1e-7 of round-off in moments near 1.)"""
    thetas = 1.0 + 1e-2 * torch.randn(20, 50, generator=torch.Generator().manual_seed(0))
    moments = SWAGMoments(50, max_rank=4)
    for theta in thetas:
        moments.update(theta)
    saved, variance = {k: v.clone() for k, v in moments.state_dict().items()}, moments.variance()
    torch.testing.assert_close(variance, thetas.var(0, correction=0), rtol=1e-2, atol=0)
    narrowed = (saved["sq_mean"].bfloat16() - saved["mean"].bfloat16().square()).float().clamp_min(1e-30)
    assert (narrowed - variance).abs().median() > 0.5 * variance.median()  # what the cast would leave

    moments.to(torch.bfloat16)
    assert all(torch.equal(moments.state_dict()[k], v) and moments.state_dict()[k].dtype == v.dtype
               for k, v in saved.items())
    assert torch.equal(moments.variance(), variance)
    moments.double()  # widening is lossless and applies
    assert moments.mean.dtype == torch.float64 and torch.equal(moments.mean, saved["mean"].double())


def test_a_slice_samplers_threshold_keeps_its_float64_digits() -> None:
    """A log-likelihood of -123.37 rounds to -123.5 in bf16: the threshold moves by a tenth of a nat and proposals
    near it are accepted or rejected against another slice."""
    sampler = EllipticalSlice(3)
    sampler.reset(torch.zeros(3, dtype=torch.float64), -123.37)
    sampler.begin(torch.Generator().manual_seed(0))
    saved = {k: v.clone() for k, v in sampler.state_dict().items()}
    sampler.to(torch.bfloat16)
    assert sampler.log_likelihood.item() == -123.37 and sampler.threshold.dtype == torch.float64
    assert all(torch.equal(sampler.state_dict()[k], v) for k, v in saved.items())


def test_projected_samples_keep_their_dtype() -> None:
    projections = AlternatingProjections(num_parameters=5, num_samples=2)
    samples = projections.samples.clone()
    projections.to(torch.bfloat16)
    assert projections.samples.dtype == torch.float32 and torch.equal(projections.samples, samples)


class Holder(WideBuffers):
    wide_buffers = ("kept",)

    def __init__(self) -> None:
        super().__init__()
        self.child = nn.Linear(2, 2)
        self.register_buffer("kept", torch.tensor([1.0 + 2**-20], dtype=torch.float64))
        self.register_buffer("other", torch.tensor([1.0 + 2**-20]))
        self.register_buffer("count", torch.tensor(3))


def test_only_the_named_buffers_are_kept_and_every_buffer_moves() -> None:
    holder = Holder().to(torch.bfloat16)
    assert (holder.kept.dtype, holder.other.dtype, holder.child.weight.dtype, holder.count.dtype) == (
        torch.float64, torch.bfloat16, torch.bfloat16, torch.int64
    )
    assert holder.kept.item() == 1.0 + 2**-20 and holder.other.item() == 1.0
    holder.to("meta")
    assert {holder.kept.device.type, holder.other.device.type, holder.child.weight.device.type} == {"meta"}
    assert holder.kept.dtype == torch.float64
    moved = Holder().to("meta", torch.bfloat16)  # a kept buffer still goes where the cast sends the rest
    assert (moved.kept.device.type, moved.kept.dtype, moved.other.dtype) == ("meta", torch.float64, torch.bfloat16)


def test_a_kept_buffer_is_never_cast_not_even_into_a_copy_thrown_away() -> None:
    """The cast only sees an empty probe of a kept buffer (a narrow copy of SWAG's K x P deviations would cost
    memory for nothing)."""
    holder, seen = Holder(), []

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        seen.append((tensor.dtype, tensor.numel()))
        return tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor

    holder._apply(cast)
    assert (torch.float64, 0) in seen and (torch.float64, 1) not in seen and (torch.float32, 1) in seen
    assert holder.kept.dtype == torch.float64 and holder.other.dtype == torch.bfloat16
