"""Deep ensembles (Lakshminarayanan et al., 2017): M independently initialised members in one module.

The members are trained side by side on the same batches; their losses are summed (``train/loss`` is that sum, M
times a member's NLL; ``train/member_nll_mean`` the mean), so each member's gradient is exactly its own, and
clipping by norm (the Trainer's ``gradient_clip_val``) clips each member's gradient by its own norm, as if it were
trained alone. The members are a list of networks, or one network and M - 1 copies sharing its frozen parameters
(a pretrained base under LoRA, a frozen feature extractor with its feature cache) with their trainable ones
re-drawn (:mod:`~lightning_bayes.modules.ensemble_members`), so an ensemble of LoRAs (Wang et al., 2023, "LoRA
ensembles for large language model fine-tuning") holds one base model and M adapters, each starting as peft
starts it (A random, B = 0).
When the members keep no running statistics (no BatchNorm) and no feature cache and share one structure, they run
as one vectorised call, ``vmap(functional_call)`` over their stacked trainable parameters (``torch.func`` model
ensembling); otherwise they run one after another. The vectorised call computes attention by the math kernel of
``scaled_dot_product_attention``: the batching rule of the CUDA memory-efficient kernel does not fold the
member dimension into an attention mask's batch ("attn_bias: wrong shape (batch dimension)",
pytorch/pytorch#161310), and the flash kernels take no mask.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Union, cast

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..inference.likelihoods import Likelihood, as_likelihood
from ..models.frozen import FrozenFeatures
from ..predictive import Predictive, concatenate
from .base import Batch, BayesianModule
from .ensemble_members import ensemble_members, share_structure

_NORM = GradClipAlgorithmType.NORM


def _loop_reason(members: list[nn.Module]) -> str | None:
    """Why the members cannot run as one vmapped call, or ``None``."""
    modules = [m for member in members for m in member.modules()]
    if any(getattr(m, "track_running_stats", False) for m in modules):
        return "BatchNorm running statistics (vmap cannot update them)"
    if any(isinstance(m, FrozenFeatures) and m.cache_features for m in modules):
        return "a feature cache (inside vmap no value can be read to key it: every step would recompute the features)"
    if not share_structure(members):
        return "the members are not one network with other weights (their modules, settings or shapes differ)"
    return None


class DeepEnsemble(BayesianModule):
    """M networks trained side by side: ``backbone`` and ``num_members - 1`` copies re-drawing its trainable weights
    (sharing its frozen ones), or the networks of a list.

    Args:
        backbone: the network (the first member, as given; its frozen parameters, e.g. a LoRA base, are shared by
            all members), or a list of the M members (each as built: a pretrained network, or one whose
            constructor initialises differently from its layers, e.g. timm's, starts every member alike; frozen
            parameters are not shared then).
        num_members: ensemble size M >= 2 for one network (None: 5); None or the list's length for a list. The
            predictive has S = M samples (``predictive(x, k)``: the first k).
        likelihood: each member gets its own copy (a Gaussian member learns its own noise).
        optimizer, lr_scheduler: as in :class:`~lightning_bayes.modules.base.BayesianModule`, over every member.
        vectorize: run the members as one ``torch.func`` call over stacked parameters (the same values as a loop,
            one pass instead of M): ``True``, ``False`` (a loop), or ``"auto"`` (on a GPU only: on a CPU ``vmap`` makes
            the convolutions grouped ones, and a LeNet-5 ensemble's step took 1.5x the loop's); members with
            BatchNorm running statistics, a feature cache or different structures always loop (warned for ``True``).
    """

    owns_likelihood = True  # one likelihood per member

    def __init__(
        self,
        backbone: Union[nn.Module, Sequence[nn.Module]],
        num_members: int | None = None,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        vectorize: Union[bool, Literal["auto"]] = "auto",
    ) -> None:
        if not (vectorize == "auto" or isinstance(vectorize, (bool, np.bool_))):
            raise ValueError(f"vectorize must be True, False or 'auto'; got {vectorize!r}")
        members = ensemble_members(backbone, num_members)
        super().__init__(likelihood=None, optimizer=optimizer, lr_scheduler=lr_scheduler, num_samples=len(members))
        self.save_hyperparameters(ignore=["backbone", "likelihood"])
        self.members = nn.ModuleList(members)
        prototype = as_likelihood(likelihood)
        # one likelihood per member: each learns its own noise
        self.likelihoods = nn.ModuleList([copy.deepcopy(prototype) for _ in members])
        loop_reason = _loop_reason(members)
        if loop_reason is not None and vectorize is True:
            rank_zero_warn(f"DeepEnsemble(vectorize=True) runs its members in a loop: {loop_reason}")
        self.vectorize = False if loop_reason is not None else vectorize

    @property
    def num_members(self) -> int:
        """M, the members of the ensemble."""
        return len(self.members)

    def vectorized(self) -> bool:
        """Whether :meth:`forward` runs the members as one vmapped call (``vectorize``, ``"auto"``: on a GPU)."""
        if self.vectorize != "auto":
            return bool(self.vectorize)
        return next(self.members[0].parameters()).device.type == "cuda"  # where they are, whoever moved them

    def forward(self, x: Any) -> Tensor:
        """Outputs of every member, ``[M, B, outputs]``."""
        if not self.vectorized():
            return torch.stack([member(x) for member in self.members])
        stacked: dict[str, Tensor] = {}
        shared: dict[str, Tensor] = {}
        for kind in ("parameters", "buffers"):
            for name, tensors in _zip_named(self.members, kind):
                if all(t is tensors[0] for t in tensors):
                    shared[name] = tensors[0]
                else:
                    stacked[name] = torch.stack(tensors)
        template = self.members[0]  # its own tensors are swapped out; its tied weights stay tied

        def run(member: dict[str, Tensor]) -> Tensor:
            return functional_call(template, (member, shared), (x,))

        with sdpa_kernel(SDPBackend.MATH):  # see the module docstring
            return vmap(run, randomness="different")(stacked)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        outputs = self(x)
        likelihoods = cast(Iterable[Likelihood], self.likelihoods)
        losses = torch.stack([lik.loss(out, y) for lik, out in zip(likelihoods, outputs)])
        self.log_training_loss(losses.sum(), len(y), member_nll_mean=losses.mean())
        return losses.sum()

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip by norm member by member (a member's parameters and its likelihood's): one norm over the whole
        ensemble would couple the members, clipping each harder the more members there are. Clipping by value
        is elementwise, and sharded strategies (FSDP, DeepSpeed) clip their own way: both stay with Lightning, as does
        a fused optimiser under mixed precision (it unscales inside its step, so the gradients met here may still
        carry the loss scale; Lightning refuses it)."""
        by_norm = GradClipAlgorithmType(gradient_clip_algorithm or "norm") is _NORM
        whole_gradients = isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
        unscales_itself = getattr(optimizer, "_step_supports_amp_scaling", False)
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        if gradient_clip_val is None or not (by_norm and whole_gradients) or (unscales_itself and mixed):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for member, likelihood in zip(self.members, self.likelihoods):
            own = [p for p in (*member.parameters(), *likelihood.parameters()) if p.grad is not None]
            if own:
                torch.nn.utils.clip_grad_norm_(own, gradient_clip_val)

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        """The first ``num_samples`` members (default: all), one sample each."""
        samples = self.resolve_num_samples(num_samples)
        if samples > self.num_members:
            raise ValueError(f"num_samples={samples} exceeds the ensemble's {self.num_members} members")
        outputs = self(x)[:samples]
        likelihoods = cast(Iterable[Likelihood], self.likelihoods)
        return concatenate([lik.predictive(out.unsqueeze(0)) for lik, out in zip(likelihoods, outputs)])


def _zip_named(members: nn.ModuleList, kind: str) -> list[tuple[str, list[Tensor]]]:
    named = [dict(getattr(m, f"named_{kind}")()) for m in members]
    return [(name, [n[name] for n in named]) for name in named[0]]
