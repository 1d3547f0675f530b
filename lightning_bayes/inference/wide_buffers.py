"""Posterior state that a cast of the whole network does not narrow."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn


class WideBuffers(nn.Module):
    """A module whose floating buffers keep their dtype when the module is cast to a narrower one.

    ``module.to(torch.bfloat16)`` (what Lightning's ``precision="bf16-true"`` does to the whole LightningModule)
    casts every floating buffer, and state kept wide on purpose loses the digits its algebra needs: SWAG's
    ``E[w^2] - E[w]^2`` cancels to zero in bf16, a slice sampler's threshold rounds by 0.25 nats and flips
    accept/reject decisions, projected samples leave the kernel. These buffers still move between devices and
    widen (``.double()``, ``precision="64-true"``). ``wide_buffers`` names them among this module's own buffers
    (``None``: all of its floating buffers; its children decide for themselves).
    """

    wide_buffers: ClassVar[tuple[str, ...] | None] = None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> WideBuffers:
        kept: dict[str, Tensor] = {}
        for name, buffer in self._buffers.items():
            if buffer is None or not buffer.is_floating_point():
                continue
            if self.wide_buffers is not None and name not in self.wide_buffers:
                continue
            target = fn(buffer.new_empty(0))  # the device and dtype the cast gives
            if torch.promote_types(target.dtype, buffer.dtype) != target.dtype:  # narrower: keep the dtype
                kept[name] = buffer.to(target.device)
        self._buffers.update(dict.fromkeys(kept))  # out of the cast's way (no narrow copy), in their places
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)
        return self
