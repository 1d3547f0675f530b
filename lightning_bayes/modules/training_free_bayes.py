"""``TrainingFreeBayes`` (TFB): a Gaussian posterior over the LoRA factors of a trained model, with no gradients.

Post hoc on a trained LoRA (MLE, MAP or a BLoB mean). Each adapted layer is put in the SVD form of
:mod:`lightning_bayes.inference.training_free_bayes` (``B' = U diag(d)``, ``A' = V^T A``) and ``A'_ij`` gets the
standard deviation ``sigma_q / d_i``. One ``sigma_q`` for all layers is the largest in ``[low, high]`` whose
relative change of the anchor-set NLL stays within ``tolerance``:

    |NLL(sigma) - NLL(0)| / NLL(0) <= tolerance,   NLL(s) = mean_anchor -log (1/S) sum_k p(y_hat | x, A'_k(s)),

with pseudo-labels ``y_hat = argmax p(y | x, A', B')`` of the deterministic model, ``S = search_samples`` weight
draws per anchor batch in antithetic pairs ``(Z, -Z)`` seeded by ``seed + 1 +`` the batch index (common random
numbers: the same ``Z`` at every candidate), and the anchor set the training batches of an epoch (limit it with the
Trainer's ``limit_train_batches``; every snippet weighs alike, whatever the batch sizes, and a ``DistributedSampler``'s
repeats are left out under DDP). This is the paper's
criterion (epsilon = 0.3%). The pairs are ours: with independent draws the few-sample average keeps a term linear
in ``sigma Z``, which on SmolLM2 (4 draws, 64 anchors) made the change 1.4% at sigma = 0.00275 but 0.4% at 0.015,
no longer increasing in sigma as the bisection needs; a pair cancels that term, leaving the ``O(sigma^2)`` effect.
The released code (Wang-ML-Lab/bayesian-peft, ``tfblora.py``) draws independently and differs in three more ways,
none taken here: it divides the relative change once more by the anchor-set size (a tolerance ``th`` there is
``th * n_anchor`` here), it never tests ``high`` itself, and it returns the upper end of the final bracket (the
smallest value seen to fail) instead of the largest one seen to pass.
The fit is the bisection run as Lightning epochs: one epoch tests one candidate (each ``training_step`` scores one
anchor batch; the last one decides), so progress, checkpoints and exact resumption at epoch boundaries come from
the Trainer. Under DDP the ranks' anchor sums add up and batch ``b`` of rank ``r`` of ``W`` draws as batch
``b W + r``, so with batches dealt out in turn the search is the one-process search. The posterior (canonical
factors, ``1/d``, ``sigma_q`` and the search state) lives in buffers. The
predictive averages ``num_samples`` weight draws seeded by ``seed`` (the same ensemble of models for every batch),
each draw shared by the batch: exact posterior draws, where the paper's flipout decorrelates the noise across
examples with the same per-example marginals. Reference: Shi, Wang, Han, Zhang & Wang, "Training-Free
Bayesianization for Low-Rank Adapters of Large Language Models", 2024/2025.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from lightning.pytorch.utilities import AttributeDict, rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from ..checks import check_network, check_seed, is_int
from ..datamodules import without_sampler_padding
from ..inference.likelihoods import Likelihood
from ..inference.training_free_bayes import Bisection, CanonicalLoraNoise, relative_nll_change
from ..models.weights import load_trained_weights
from ..params import ParamSelector, select_parameters
from ..predictive import CategoricalPredictive, Predictive
from .base import Batch, BayesianModule
from .fit_length import fit_length


def lora_pairs(model: nn.Module, params: ParamSelector) -> dict[tuple[str, str], tuple[Tensor, Tensor]]:
    """``{(name_A, name_B): (A, B)}`` for every peft ``lora_A`` weight ``params`` selects, with its ``lora_B``."""
    selected = select_parameters(model, params)
    named = dict(model.named_parameters())
    pairs: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    for name in selected:
        if "lora_A" not in name:
            continue
        partner = name.replace("lora_A", "lora_B")
        if partner not in named:
            raise ValueError(f"params={params!r} selects {name!r}, but its LoRA partner {partner!r} is not a parameter")
        pairs[(name, partner)] = (named[name], named[partner])
    if not pairs:
        raise ValueError(f"params={params!r} selects no peft lora_A weight; TFB needs LoRA factors (params='lora')")
    return pairs


class TrainingFreeBayes(BayesianModule):
    """Post-hoc TFB posterior over the LoRA factors of ``model``.

    Args:
        model: the network with peft LoRA adapters; its current weights are used unless ``checkpoint`` is given.
        checkpoint: a trained model's Lightning checkpoint or state dict (a glob picks the newest match), e.g.
            ``runs/text_map_lora_smollm2/version_*/checkpoints/best.ckpt``.
        params: which LoRA layers get noise (``"lora"``, or globs; each selected ``lora_A`` brings its ``lora_B``).
        sigma_range: ``(low, high)``, the bisection interval of ``sigma_q`` (``low`` is assumed feasible).
        tolerance: the largest relative anchor-set NLL change allowed (0.003: the paper's 0.3%).
        search_samples: weight draws per anchor batch when scoring a candidate (an even number: antithetic pairs).
        num_samples: weight draws of the predictive.
        seed: seed of the search's and the predictive's draws.
        likelihood: as in :class:`~lightning_bayes.modules.base.BayesianModule`.
    """

    # buffers (register_buffer), typed for readers and checkers
    sigma: Tensor
    low: Tensor
    high: Tensor
    tested_high: Tensor
    done: Tensor
    anchor_nll: Tensor

    def __init__(
        self,
        model: nn.Module,
        checkpoint: str | None = None,
        params: ParamSelector = "lora",
        likelihood: str | Likelihood = "categorical",
        sigma_range: tuple[float, float] = (1e-3, 0.015),
        tolerance: float = 0.003,
        search_samples: int = 10,
        num_samples: int = 10,
        seed: int = 0,
    ) -> None:
        check_network(model, "model")
        super().__init__(likelihood=likelihood, num_samples=num_samples)
        self.save_hyperparameters(ignore=["model", "likelihood"])
        if not (isinstance(sigma_range, Sequence) and len(sigma_range) == 2):
            raise ValueError(f"sigma_range must be two numbers (low, high); got {sigma_range!r}")
        low, high = sigma_range
        Bisection(low, high)  # validates the interval
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0 (a relative NLL change); got {tolerance!r}")
        check_seed(seed, bits=48)  # + a draw offset
        if not is_int(search_samples) or search_samples < 2 or search_samples % 2:
            raise ValueError(f"search_samples must be an even int >= 2 (antithetic pairs); got {search_samples!r}")
        self.automatic_optimization = False
        if checkpoint is not None:
            load_trained_weights(model, checkpoint)
        self.model = model.requires_grad_(False).eval()
        self.noise = CanonicalLoraNoise(lora_pairs(model, params))
        self.tolerance, self.search_samples, self.seed = tolerance, search_samples, seed
        for name, value in (("sigma", low), ("low", low), ("high", high), ("tested_high", 0.0), ("done", 0.0)):
            self.register_buffer(name, torch.tensor(float(value), dtype=torch.float64))
        self.register_buffer("anchor_nll", torch.zeros(2, dtype=torch.float64))  # sums of NLL(0), NLL(candidate)

    def train(self, mode: bool = True) -> TrainingFreeBayes:
        super().train(mode)
        self.model.eval()  # the trained network always runs in eval mode (no dropout)
        return self

    def takes_optimizer_steps(self) -> bool:
        return False  # nothing is trained: the search updates buffers

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.noise.is_degenerate():
            raise ValueError(
                "TrainingFreeBayes: every selected LoRA pair has B = 0 (an untrained adapter: peft starts B at zero), "
                "so no noise scale changes the model and the search would return a posterior without spread: pass "
                "the trained LoRA as checkpoint=..."
            )

    def on_train_start(self) -> None:
        super().on_train_start()
        self.refuse_shuffled_batches(
            "scores every candidate scale on the same anchor batches with the same weight draws (common random "
            "numbers, so that the change of the NLL grows with the scale, as the bisection needs)"
        )

    def _generator(self, offset: int) -> torch.Generator:
        generator = torch.Generator(device=self.noise.a_0.device)
        generator.manual_seed(self.seed + offset)
        return generator

    def _samples(self, x: Any, sigma: float, num_samples: int, generator: torch.Generator) -> Tensor:
        """Outputs ``[S, B, ...]`` of ``num_samples`` independent weight draws at ``sigma``."""
        draws = [self.noise.draw(sigma, generator) for _ in range(num_samples)]
        return torch.stack([functional_call(self.model, weights, (x,)) for weights in draws])

    def _antithetic_samples(self, x: Any, sigma: float, generator: torch.Generator) -> Tensor:
        """Outputs ``[search_samples, B, ...]`` of ``search_samples / 2`` antithetic pairs at ``sigma``."""
        draws = [w for _ in range(self.search_samples // 2) for w in self.noise.antithetic_pair(sigma, generator)]
        return torch.stack([functional_call(self.model, weights, (x,)) for weights in draws])

    def forward(self, x: Any) -> Tensor:
        """The deterministic model (the canonical factors, equal to the trained ones up to rounding)."""
        return functional_call(self.model, self.noise.draw(0.0), (x,))

    # ----- the search: one candidate per epoch ---------------------------------------------------------------
    def _search(self) -> Bisection:
        return Bisection(float(self.low), float(self.high), bool(self.tested_high), bool(self.done))

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.anchor_nll.zero_()
        search = self._search()
        x, y = without_sampler_padding(batch, batch_idx, self.trainer.train_dataloader)
        if not search.done and len(y):
            with torch.no_grad():
                reference = self.likelihood.predictive(self(x).unsqueeze(0))
                pseudo_labels = cast(CategoricalPredictive, reference).probs.argmax(-1)  # TFB is for classifiers
                noisy = self.likelihood.predictive(
                    # batch b of rank r draws as batch b W + r of one process (batches dealt out in turn)
                    self._antithetic_samples(x, search.candidate(), self._generator(1 + self._global_batch(batch_idx)))
                )
                self.anchor_nll += torch.stack([
                    -reference.log_prob(pseudo_labels).sum(), -noisy.log_prob(pseudo_labels).sum()
                ]).double()
        if batch_idx == self.trainer.num_training_batches - 1:
            self._end_candidate(search)

    def _global_batch(self, batch_idx: int) -> int:
        return batch_idx * self.trainer.world_size + self.trainer.global_rank

    def _end_candidate(self, search: Bisection) -> None:
        if not search.done:
            # sums over this rank's anchor examples; under DDP the ranks' sums add up to the whole anchor set's
            reference, noisy = self.trainer.strategy.reduce(self.anchor_nll.clone(), reduce_op="sum").tolist()
            change = relative_nll_change(reference, noisy)
            candidate = search.candidate()
            search.update(change <= self.tolerance)
            logged = {"train/candidate": candidate, "train/relative_nll_change": change}
            self.log_dict(logged, on_epoch=True, batch_size=1)
        for name, value in zip(("low", "high", "tested_high", "done"), search.state()):
            getattr(self, name).fill_(float(value))
        self.sigma.fill_(search.low)
        self.log_dict({"train/sigma": search.low, "train/sigma_high": search.high}, on_epoch=True, batch_size=1)

    def on_train_end(self) -> None:
        low = cast(AttributeDict, self.hparams).sigma_range[0]  # save_hyperparameters' AttributeDict
        if bool(self.tested_high) and float(self.low) == low and not fit_length(self.trainer).smoke_run:
            rank_zero_warn(
                f"TrainingFreeBayes: no tested sigma met tolerance={self.tolerance} in {self.current_epoch} "
                f"epoch{'s' if self.current_epoch != 1 else ''} (the last failed at {float(self.high):.3g}; each epoch "
                f"tests one scale, the first the upper end, each next one halves the bracket [{low}, "
                f"{float(self.high):.3g}]); sigma_q is the untested lower end {low}: train more epochs "
                "(--trainer.max_epochs), lower sigma_range[0] or raise the tolerance"
            )

    # ----- the posterior ----------------------------------------------------------------------------------------
    def predictive(self, x: Any, num_samples: int | None = None, sigma: float | None = None) -> Predictive:
        """Model average over ``num_samples`` weight draws at ``sigma`` (default: the search's ``sigma_q``)."""
        samples = self.resolve_num_samples(num_samples)
        with torch.no_grad():
            outputs = self._samples(x, float(self.sigma) if sigma is None else sigma, samples, self._generator(0))
        return self.likelihood.predictive(outputs)
