"""Deep ensembles (Lakshminarayanan et al., 2017): M independently initialised members in one module.

The members are trained side by side on the same batches; their losses are summed, so each member's
gradient is exactly its own. When the backbone keeps no running statistics (no BatchNorm) the members
run as one vectorised call, ``vmap(functional_call)`` over their stacked parameters
(``torch.func`` model ensembling); otherwise they run one after another.
"""

from __future__ import annotations

import copy
from typing import Any, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..inference.likelihoods import Likelihood, build_likelihood
from ..predictive import Predictive, concatenate
from .base import Batch, BayesianModule


def _reset_parameters(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _keeps_running_statistics(module: nn.Module) -> bool:
    return any(getattr(m, "track_running_stats", False) for m in module.modules())


class DeepEnsemble(BayesianModule):
    """``num_members`` copies of ``backbone`` (the first keeps its weights, the others are re-initialised)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_members: int = 5,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        vectorize: bool = True,
    ) -> None:
        super().__init__(likelihood=None, optimizer=optimizer, lr_scheduler=lr_scheduler, num_samples=num_members)
        if num_members < 2:
            raise ValueError(f"num_members must be >= 2 for an ensemble; got {num_members}")
        self.save_hyperparameters(ignore=["backbone", "likelihood"])
        copies = [copy.deepcopy(backbone) for _ in range(num_members - 1)]
        for member in copies:
            _reset_parameters(member)
        self.members = nn.ModuleList([backbone, *copies])
        prototype = build_likelihood(likelihood) if isinstance(likelihood, str) else likelihood
        # one likelihood per member: each learns its own noise
        self.likelihoods = nn.ModuleList([copy.deepcopy(prototype) for _ in range(num_members)])
        self.vectorize = vectorize and not _keeps_running_statistics(backbone)
        self._template = [copy.deepcopy(backbone).to("meta")]  # a list: not registered as a submodule

    @property
    def num_members(self) -> int:
        return len(self.members)

    def forward(self, x: Any) -> Tensor:
        """Outputs of every member, ``[M, B, outputs]``."""
        if not self.vectorize:
            return torch.stack([member(x) for member in self.members])
        params = {name: torch.stack([p for p in ps]) for name, ps in _zip_named(self.members, "parameters")}
        buffers = {name: torch.stack([b for b in bs]) for name, bs in _zip_named(self.members, "buffers")}
        template = self._template[0]
        template.train(self.training)

        def run(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
            return functional_call(template, (p, b), (x,))

        return vmap(run, randomness="different")(params, buffers)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        outputs = self(x)
        losses = torch.stack([lik.loss(out, y) for lik, out in zip(self.likelihoods, outputs)])
        self.log_training_loss("loss", losses.sum(), batch_size=len(y))
        self.log_training_loss("member_nll_mean", losses.mean().detach(), batch_size=len(y))
        return losses.sum()

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        outputs = self(x)
        return concatenate([lik.predictive(out.unsqueeze(0)) for lik, out in zip(self.likelihoods, outputs)])


def _zip_named(members: nn.ModuleList, kind: str) -> list[tuple[str, list[Tensor]]]:
    named = [dict(getattr(m, f"named_{kind}")()) for m in members]
    return [(name, [n[name] for n in named]) for name in named[0]]
