"""``x^2`` through a custom ``autograd.Function`` whose backward is ``@once_differentiable``: a network without a
second derivative that torch.func differentiates twice without an error, for the tests of VIKING's check."""

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class OnceSquare(torch.autograd.Function):
    """``x^2`` with a backward marked ``@once_differentiable``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Square(nn.Module):
    def __init__(self, once: bool) -> None:
        super().__init__()
        self.once = once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OnceSquare.apply(x) if self.once else x * x
