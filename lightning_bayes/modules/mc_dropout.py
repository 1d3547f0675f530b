"""Monte Carlo dropout (Gal & Ghahramani, 2016): keep dropout active at test time and average.

The S stochastic passes run as one vectorised call, ``torch.func.vmap(..., randomness="different")``,
so every sample gets its own dropout masks while the backbone is traced once (and the layers before the first
dropout run once; when a dropout draws in place, as attention's inside ``scaled_dot_product_attention`` does, which
``vmap`` cannot make different per sample on an unstacked tensor, the inputs are stacked S times instead, from then
on for this module). While sampling, the dropout layers, the layers that gate a dropout by their own ``training``
flag (a rate of their own: ``nn.MultiheadAttention``, timm's classifier heads; or a dropout child's rate:
transformers' and timm's attention layers) and torch's transformer layers (whose fused inference path skips every
dropout under ``no_grad``) run in training mode; everything else keeps its mode (BatchNorm its running statistics,
stochastic depth and recurrent layers their own behaviour: switching only the ``nn.Dropout`` modules had left
attention dropout off and the encoder layers on their fused path).
"""

from __future__ import annotations

from typing import Any, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..inference.likelihoods import Likelihood
from ..predictive import Predictive
from .map import MAP

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_RATES = ("dropout", "attention_dropout", "drop_rate")  # MultiheadAttention's, transformers', timm heads'
_TORCH_TRANSFORMERS = (
    nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer
)  # fmt: skip


def _is_dropout_layer(module: nn.Module) -> bool:
    return isinstance(module, _DROPOUT_TYPES) and module.p > 0


def _rate(module: nn.Module, name: str) -> float:
    value = getattr(module, name, None)
    return value if isinstance(value, float) else 0.0


def _applies_own_dropout(module: nn.Module) -> bool:
    """A layer that applies a dropout rate ``> 0`` of its own (attention, a timm classifier head); not a recurrent
    layer (its dropout between layers runs inside ``aten::lstm``, which ``vmap`` cannot batch)."""
    return not isinstance(module, nn.RNNBase) and any(_rate(module, name) > 0 for name in _DROPOUT_RATES)


def _gates_a_dropout_child(module: nn.Module) -> bool:
    """A layer holding a dropout layer whose rate it may apply itself when training (``BertSelfAttention``: ``0.0 if
    not self.training else self.dropout.p``)."""
    return not isinstance(module, nn.RNNBase) and any(_is_dropout_layer(child) for child in module.children())


def _sampled(module: nn.Module) -> bool:
    return (
        _is_dropout_layer(module) or _applies_own_dropout(module) or _gates_a_dropout_child(module)
        or isinstance(module, _TORCH_TRANSFORMERS)
    )  # fmt: skip


def _in_place_draw(error: RuntimeError) -> bool:
    """``vmap``'s refusal of an in-place random draw on an unstacked tensor."""
    return "inplace randomness" in str(error)


class MCDropout(MAP):
    """A MAP-trained network with dropout whose predictive averages ``num_samples`` dropout masks.

    Args:
        backbone: a network with at least one dropout of rate ``p > 0`` (e.g. ``LeNet5(dropout=0.25)``, or attention
            dropout).
        likelihood, optimizer, lr_scheduler: as in :class:`MAP`.
        num_samples: dropout masks averaged by the predictive (at validation and test).
    """

    def __init__(
        self,
        backbone: nn.Module,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_samples: int = 20,
    ) -> None:
        super().__init__(backbone, likelihood=likelihood, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.num_samples = self.resolve_num_samples(num_samples)
        self._stack_inputs = False  # set when a dropout drew in place on unstacked inputs
        if not any(_is_dropout_layer(m) or _applies_own_dropout(m) for m in backbone.modules()):
            raise ValueError(
                f"MCDropout needs a backbone with dropout (p > 0); {type(backbone).__name__} has none: "
                "build it with a dropout rate, e.g. LeNet5(dropout=0.1)"
            )

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        samples = self.resolve_num_samples(num_samples)
        sampled = [m for m in self.backbone.modules() if _sampled(m)]
        previous = [m.training for m in sampled]
        for module in sampled:  # one by one: Module.train() would recurse into BatchNorm and stochastic depth
            module.training = True
        try:
            if not self._stack_inputs:
                try:
                    outputs = torch.func.vmap(lambda _: self(x), randomness="different")(torch.arange(samples))
                except RuntimeError as error:
                    if not _in_place_draw(error):
                        raise
                    self._stack_inputs = True
            if self._stack_inputs:
                dims = tree_map(lambda t: 0 if isinstance(t, Tensor) else None, x)
                stacked = tree_map(lambda t: t.expand(samples, *t.shape) if isinstance(t, Tensor) else t, x)
                outputs = torch.func.vmap(self, in_dims=(dims,), randomness="different")(stacked)
        finally:
            for module, mode in zip(sampled, previous):
                module.training = mode
        return self.likelihood.predictive(outputs)
