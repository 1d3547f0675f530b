"""Deep ensembles (Lakshminarayanan et al., 2017): M independently initialised members in one module.

The members are trained side by side on the same batches; their losses are summed (``train/loss`` is that sum, M
times a member's NLL; ``train/member_nll_mean`` the mean), so each member's gradient is exactly its own, and
clipping by norm (the Trainer's ``gradient_clip_val``) clips each member's gradient by its own norm, as if it were
trained alone. Frozen parameters (``requires_grad=False``: a
pretrained base under LoRA, a frozen feature extractor) are shared by all members rather than copied, a
:class:`~lightning_bayes.models.FrozenFeatures` with its feature cache too, and
only the trainable ones are re-initialised, so an ensemble of LoRAs (Wang et al., 2023, "LoRA ensembles for
large language model fine-tuning") holds one base model and M adapters, each starting as peft starts it
(A random, B = 0).
When the backbone keeps no running statistics (no BatchNorm) and no feature cache, the members run as one
vectorised call, ``vmap(functional_call)`` over their stacked trainable parameters (``torch.func`` model ensembling);
otherwise they run one after another. The vectorised call computes attention by the math kernel of
``scaled_dot_product_attention``: the batching rule of the CUDA memory-efficient kernel does not fold the
member dimension into an attention mask's batch ("attn_bias: wrong shape (batch dimension)",
pytorch/pytorch#161310), and the flash kernels take no mask.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal, Union, cast

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..checks import is_int
from ..inference.likelihoods import Likelihood, as_likelihood
from ..models.frozen import FrozenFeatures
from ..predictive import Predictive, concatenate
from .base import Batch, BayesianModule

_NORM = GradClipAlgorithmType.NORM
_LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _copy_sharing_frozen(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose frozen parameters are the original's tensors and whose
    :class:`~lightning_bayes.models.FrozenFeatures` are the original's modules, feature cache included (the
    ``deepcopy`` memo): M probes on one frozen backbone compute and keep each example's features once, not M times."""
    memo: dict[int, Any] = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo.update({id(m): m for m in module.modules() if isinstance(m, FrozenFeatures)})
    return copy.deepcopy(module, memo)


def _reinitialise_trainable(module: nn.Module) -> set[int]:
    """Re-draw the trainable parameters the way their layers initialise them: peft LoRA layers through
    ``reset_lora_parameters`` (A random, B = 0), other layers whose own parameters are all trainable
    through ``reset_parameters``; frozen layers keep their weights. Returns the ids of the re-drawn parameters."""
    reset_lora = getattr(module, "reset_lora_parameters", None)
    if callable(reset_lora) and isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
        for adapter in cast(nn.ModuleDict, module.lora_A):  # checked above
            reset_lora(adapter, True)
        adapters = [getattr(module, name, None) for name in _LORA_FACTORS]
        return {id(p) for adapter in adapters if isinstance(adapter, nn.Module) for p in adapter.parameters()}
    own = list(module.parameters(recurse=False))
    reset = getattr(module, "reset_parameters", None)
    redrawn: set[int] = set()
    if own and callable(reset) and all(p.requires_grad for p in own):
        reset()
        redrawn = {id(p) for p in own}
    for child in module.children():
        redrawn |= _reinitialise_trainable(child)
    return redrawn


def _not_redrawn(member: nn.Module, redrawn: set[int]) -> list[str]:
    """The trainable parameters of ``member`` that no layer's reset drew anew (they start equal in every member)."""
    return [name for name, p in member.named_parameters() if p.requires_grad and id(p) not in redrawn]


def _runs_one_by_one(module: nn.Module) -> bool:
    """Whether members of ``module`` must run in a loop: BatchNorm running statistics (vmap cannot update them) or
    a feature cache (no value can be read inside vmap to key it, so every step would recompute the features)."""
    return any(
        getattr(m, "track_running_stats", False) or (isinstance(m, FrozenFeatures) and m.cache_features)
        for m in module.modules()
    )


class DeepEnsemble(BayesianModule):
    """``num_members`` copies of ``backbone`` sharing its frozen parameters (the first keeps its weights, the
    others re-initialise their trainable ones).

    Args:
        backbone: the network (its frozen parameters, e.g. a LoRA base, are shared by all members).
        num_members: ensemble size M >= 2; the predictive has S = M samples (``predictive(x, k)``: the first k).
        likelihood: each member gets its own copy (a Gaussian member learns its own noise).
        optimizer, lr_scheduler: as in :class:`~lightning_bayes.modules.base.BayesianModule`, over every member.
        vectorize: run the members as one ``torch.func`` call over stacked parameters (the same values as a loop,
            one pass instead of M): ``True``, ``False`` (a loop), or ``"auto"`` (on a GPU only: on a CPU ``vmap`` makes
            the convolutions grouped ones, and a LeNet-5 ensemble's step took 1.5x the loop's); a backbone with
            BatchNorm running statistics or a feature cache always loops.
    """

    owns_likelihood = True  # one likelihood per member

    def __init__(
        self,
        backbone: nn.Module,
        num_members: int = 5,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        vectorize: Union[bool, Literal["auto"]] = "auto",
    ) -> None:
        if not is_int(num_members) or num_members < 2:
            raise ValueError(f"num_members must be an int >= 2 for an ensemble; got {num_members!r}")
        if not (vectorize == "auto" or isinstance(vectorize, (bool, np.bool_))):
            raise ValueError(f"vectorize must be True, False or 'auto'; got {vectorize!r}")
        if not any(p.requires_grad for p in backbone.parameters()):
            raise ValueError(
                f"DeepEnsemble needs a backbone with trainable parameters; {type(backbone).__name__} has none"
            )
        super().__init__(likelihood=None, optimizer=optimizer, lr_scheduler=lr_scheduler, num_samples=num_members)
        self.save_hyperparameters(ignore=["backbone", "likelihood"])
        copies = [_copy_sharing_frozen(backbone) for _ in range(num_members - 1)]
        redrawn = [_reinitialise_trainable(member) for member in copies]
        kept = _not_redrawn(copies[0], redrawn[0])  # the same names in every copy
        trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]
        if kept and len(kept) == len(trainable):
            raise ValueError(
                f"DeepEnsemble re-initialises each member's trainable parameters through their layers' "
                f"reset_parameters(), but none of {type(backbone).__name__}'s has one (e.g. {kept[:3]}): every member "
                "would be the same network. Build the backbone from layers that do (nn.Linear, nn.Conv2d, ...) or give "
                "the module holding them a reset_parameters()"
            )
        if kept:
            rank_zero_warn(
                f"DeepEnsemble: {len(kept)} trainable parameters of {type(backbone).__name__} have no layer "
                f"reset_parameters() and start equal in every member: {kept[:5]}"
            )
        self.members = nn.ModuleList([backbone, *copies])
        prototype = as_likelihood(likelihood)
        # one likelihood per member: each learns its own noise
        self.likelihoods = nn.ModuleList([copy.deepcopy(prototype) for _ in range(num_members)])
        self.vectorize = False if _runs_one_by_one(backbone) else vectorize

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
        is elementwise, and sharded strategies (FSDP, DeepSpeed) clip their own way: both stay with Lightning."""
        by_norm = GradClipAlgorithmType(gradient_clip_algorithm or "norm") is _NORM
        whole_gradients = isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
        if gradient_clip_val is None or not (by_norm and whole_gradients):
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
