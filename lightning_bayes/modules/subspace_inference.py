"""``SubspaceInference``: SWAG sampling and Bayesian inference in a low-dimensional weight subspace, post hoc.

Starts from the moments an :class:`~lightning_bayes.callbacks.swa_subspace.SWASubspace` callback collected
(read from the training run's Lightning checkpoint, ``checkpoint["callbacks"]``, together with the model's
weights) and builds one of

* ``subspace="swag"``: the SWAG Gaussian itself, ``theta = theta_bar + sqrt(s)(diag + low rank)``
  (``swag_scale`` s = 0.5, or 1 for a diagonal-only run (``max_rank=0``, SWAG-diag); 0 gives SWA), sampled
  directly (``method="none"``);
* ``"pca"``, ``"random"``, ``"curve"``: ``w(z) = w_hat + P^T z`` with ``z in R^k`` and the posterior
  ``p(z | D) ∝ exp(-sum_i l_i(w(z)) / T) N(z; 0, sigma_p^2 I)``, inferred by

  - ``method="ess"``: elliptical slice sampling from ``z = 0``, one accepted step per sample, no burn-in.
    Fit = the sampler as Lightning epochs: each epoch evaluates the tempered full-data log-likelihood of one
    point (the start, then one proposal per epoch) over the training batches (no gradients), and its last
    batch makes the accept/shrink decision. Training stops itself once ``num_samples`` are accepted, after
    ``1 + (log-likelihood evaluations)`` epochs (about 2-5 per sample): set ``max_epochs: -1`` (or a bound). A
    finished chain resumed with a larger ``num_samples`` (``fit --ckpt_path last.ckpt --model.init_args.num_samples
    60``) goes on from its last state; a smaller one keeps the chain's first samples;
  - ``method="vi"``: ``q(z) = N(mu, diag sigma^2)`` trained by ordinary steps on ``mean NLL + T KL / N``
    for ``max_epochs``; the samples are ``num_samples`` fixed draws from ``q``;
  - ``method="none"``: ``z ~ N(0, sigma_p^2 I)`` (for ``"swag"``: the SWAG draws).

Fitting with ``method="none"`` takes one epoch (BatchNorm statistics of each sample; none for models without
BatchNorm, whose ``lightning-bayes test`` also works without fitting). With BatchNorm, every sample's running
statistics are recomputed over the training data once sampling is done and cached in a buffer, so
``predictive`` is a plain ensemble. Likelihoods are evaluated with BatchNorm on batch statistics (as the reference
code does), which makes them depend on which examples share a batch: ESS on such a network needs a training loader
that does not shuffle (``--data.shuffle false``; refused otherwise). All state (moments, subspace, sampler, samples,
BatchNorm cache, random-draw counter) lives in buffers, so checkpoints resume exactly. Under DDP the log-likelihood
is summed over ranks (each example once: the distributed sampler's padding repeats are left out,
:mod:`~lightning_bayes.datamodules.sampler_padding`), every rank makes the same seeded draws and decisions, and each
sample's BatchNorm statistics are the average of the ranks' (exact for the means with equal shards). Reference:
Izmailov, Maddox, Kirichenko, Garipov, Vetrov & Wilson, "Subspace Inference for Bayesian Deep Learning", UAI 2019;
Maddox et al., NeurIPS 2019.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from ..checks import check_flags, check_network, check_seed, held, is_finite, is_int, is_number
from ..datamodules import side_pass, without_sampler_padding
from ..inference.batchnorm import (
    batch_statistics,
    batchnorm_layers,
    batchnorm_statistics_kept,
    refresh_batchnorm,
    running_statistics,
)
from ..callbacks.swa_subspace import collector_states
from ..inference.elliptical_slice import EllipticalSlice
from ..inference.likelihoods import Likelihood
from ..inference.linalg import FlatParameters
from ..inference.subspace import (
    DiagonalGaussian,
    Subspace,
    curve_subspace,
    pca_subspace,
    random_subspace,
)
from ..inference.swag import SWAGMoments, default_swag_scale, low_rank_part
from ..inference.wide_buffers import WideBuffers
from ..models.weights import load_checkpoint, load_trained_likelihood, load_trained_weights, resolve_checkpoint_path
from ..params import ParamSelector, select_parameters
from ..predictive import Predictive
from .base import Batch, BayesianModule, first_rows
from .fit_length import fit_length

_SUBSPACES = ("swag", "pca", "random", "curve")
_METHODS = ("ess", "vi", "none")


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


_SWAG_KEYS = {"names", "max_rank", "moments"}  # what SubspaceInference reads of SWASubspace.state_dict()


def swag_state_from_checkpoint(path: str, saved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``SWASubspace`` callback state stored in a Lightning checkpoint (a glob picks the newest file;
    ``saved``: the checkpoint already loaded)."""
    resolved = resolve_checkpoint_path(path)
    saved = load_checkpoint(resolved) if saved is None else saved
    states = {key: state for key, state in collector_states(saved.get("callbacks") or {}).items() if state}
    if len(states) != 1:
        raise ValueError(
            f"checkpoint {str(resolved)!r} holds {len(states)} non-empty SWASubspace states "
            f"({sorted(states)}); expected exactly one: train with one SWASubspace callback (several in one run "
            "each keep their own, and SubspaceInference reads one), past its start"
        )
    return next(iter(states.values()))


def _names_in_model(names: Sequence[str], model: nn.Module) -> list[str]:
    """The callback's parameter names (relative to the training LightningModule, e.g. ``backbone.x``) as
    names of ``model``: the shortest prefix whose removal makes every name one of the model's."""
    own = dict(model.named_parameters())
    for prefix in sorted({n[: len(n) - len(m)] for n in names for m in own if n.endswith(m)}, key=len):
        if all(n.startswith(prefix) and n[len(prefix):] in own for n in names):
            return [n[len(prefix):] for n in names]
    raise ValueError(
        f"the SWASubspace state covers parameters {list(names)[:4]}... that {type(model).__name__} does not have; "
        "expected the model the callback's run trained"
    )


class SubspaceInference(WideBuffers, BayesianModule):
    """Post-hoc SWAG and subspace inference from an ``SWASubspace`` run.

    Args:
        model: the network the run trained (e.g. the MAP module's backbone).
        checkpoint: that run's Lightning checkpoint (glob: newest match): model weights and SWAG moments.
        swag_state: or the callback's state directly (``SWASubspace.state_dict()``); the model keeps its weights.
        params: optional check: the parameter selection must equal the one the callback collected.
        subspace: ``"swag"``, ``"pca"``, ``"random"`` or ``"curve"``.
        rank: subspace dimension ``k`` (``"curve"``: 2).
        method: ``"ess"``, ``"vi"`` or ``"none"`` (``"swag"`` takes ``"none"`` only).
        temperature: ``T`` in ``exp(-sum_i l_i / T)``; 1 is the untempered posterior. The reference tempers by
            ``T`` of order ``N`` (5,000 to 10,000 on its data sets): choose it on validation data
            (``configs/mnist/subspace_ess.yaml`` uses 1,000, against which 1 scored worse).
        prior_scale: ``sigma_p`` of the prior ``N(0, sigma_p^2 I)`` on ``z`` (PCA: in SWAG standard deviations).
        swag_scale: ``s`` of the SWAG draws; ``None``: the reference's 0.5 with a low-rank part, 1 for a diagonal-only
            run (SWAG-diag); 0 is SWA.
        num_samples: samples kept for the predictive.
        bn_update: recompute BatchNorm statistics for every sample (when the model has BatchNorm).
        curve_points: for ``"curve"``: three checkpoints (or flat weight vectors) ``w0``, ``w_half``, ``w2``, where
            ``w_half`` is the curve's midpoint ``theta(1/2) = w0/4 + w1/2 + w2/4`` for a quadratic Bezier curve with
            control point ``w1`` (not ``w1`` itself).
        optimizer: for ``"vi"`` (default SGD, lr 0.1, momentum 0.9, as the reference); ``lr_scheduler`` likewise.
        init_scale: for ``"vi"``: initial ``sigma``.
        num_data: for ``"vi"``: ``N`` in ``T KL / N`` (default: the training set's size).
        seed: seed of every random draw (directions, ESS, VI noise, SWAG draws).
        likelihood: as in :class:`~lightning_bayes.modules.base.BayesianModule`.
    """

    wide_buffers = ("samples", "partial")  # the chain's samples and log-likelihood stay float64 under bf16-true

    # buffers (register_buffer), typed for readers and checkers
    draws: Tensor
    bn_statistics: Tensor
    bn_ready: Tensor
    samples: Tensor
    collected: Tensor
    partial: Tensor
    started: Tensor

    def __init__(
        self,
        model: nn.Module,
        checkpoint: str | None = None,
        swag_state: Mapping[str, Any] | None = None,
        params: ParamSelector | None = None,
        subspace: str = "pca",
        rank: int = 5,
        method: str = "ess",
        temperature: float = 1.0,
        prior_scale: float = 1.0,
        swag_scale: float | None = None,
        num_samples: int = 30,
        bn_update: bool = True,
        curve_points: Sequence[Union[str, Tensor]] | None = None,
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = _sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_scale: float = 1.0,
        num_data: int | None = None,
        seed: int = 0,
    ) -> None:
        check_network(model, "model")
        super().__init__(likelihood=likelihood, optimizer=optimizer, lr_scheduler=lr_scheduler, num_samples=num_samples)
        self.save_hyperparameters(ignore=["model", "likelihood", "swag_state", "curve_points", "optimizer", "lr_scheduler"])
        if subspace not in _SUBSPACES:
            raise ValueError(f"subspace must be one of {_SUBSPACES}; got {subspace!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
        if subspace == "swag" and method != "none":
            raise ValueError(f"subspace='swag' is sampled directly: method must be 'none'; got {method!r}")
        if not (is_finite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
        if not (is_finite(prior_scale) and prior_scale > 0):
            raise ValueError(f"prior_scale must be a finite number > 0; got {prior_scale!r}")
        if swag_scale is not None and not (is_number(swag_scale) and 0 <= swag_scale < math.inf):
            raise ValueError(f"swag_scale must be None or a finite number >= 0; got {swag_scale!r}")
        check_seed(seed, bits=32)  # shifted by 32 bits, plus a draw counter
        if num_data is not None and (not is_int(num_data) or num_data < 1):
            raise ValueError(f"num_data must be None or a positive int; got {num_data!r}")
        check_flags(bn_update=bn_update)
        if (checkpoint is None) == (swag_state is None):
            raise ValueError("give exactly one of checkpoint (a SWASubspace run's checkpoint) or swag_state")
        path = None
        if checkpoint is not None:
            path = str(resolve_checkpoint_path(checkpoint))
            saved = load_checkpoint(path)
            swag_state = swag_state_from_checkpoint(path, saved)
            load_trained_weights(model, path)
            load_trained_likelihood(self.likelihood, saved.get("state_dict", {}))
        self.likelihood.requires_grad_(False)  # e.g. a Gaussian noise scale: the trained run's, fixed
        if not isinstance(swag_state, Mapping):
            raise ValueError(f"swag_state must be SWASubspace.state_dict() (a dict); got {type(swag_state).__name__}")
        if not swag_state:
            raise ValueError("swag_state is empty: the SWASubspace callback collected nothing")
        if not _SWAG_KEYS <= set(swag_state):
            raise ValueError(
                f"swag_state must be SWASubspace.state_dict(), with keys {sorted(_SWAG_KEYS)}; got keys "
                f"{held(swag_state)}"
            )
        self.model = model.requires_grad_(False).eval()
        names = _names_in_model(swag_state["names"], model)
        if params is not None and list(select_parameters(model, params)) != names:
            raise ValueError(
                f"params={params!r} selects other parameters than the SWASubspace run collected ({names[:4]}...)"
            )
        self.flat = FlatParameters(model, names)
        saved = swag_state["moments"]
        self.moments = SWAGMoments(self.flat.size, int(swag_state["max_rank"]), dtype=saved["mean"].dtype)
        self.moments.load_state_dict(saved)
        if int(self.moments.count) == 0:
            source = "swag_state" if path is None else f"the SWASubspace state of checkpoint {path!r}"
            raise ValueError(
                f"{source} holds no snapshot: its run ended before the callback's start of collection (start_epoch "
                "or start_fraction); train past it"
            )
        self.method, self.kind, self.seed = method, subspace, seed
        self.temperature, self.prior_scale, self.swag_scale = float(temperature), float(prior_scale), (
            default_swag_scale(self.moments) if swag_scale is None else float(swag_scale)
        )
        self.bn_update = bn_update and bool(batchnorm_layers(model))
        self.num_data = num_data
        self.automatic_optimization = method == "vi"
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # counter of seeded random draws
        if subspace == "swag":
            low_rank_part(self.moments, self.swag_scale, "subspace='swag'")
        if subspace != "swag":
            self.subspace = self._build_subspace(subspace, rank, curve_points)
            self.register_buffer("samples", torch.zeros(num_samples, self.subspace.dim, dtype=torch.float64))
            self.register_buffer("collected", torch.zeros((), dtype=torch.long))
        if method == "ess":
            self.sampler = EllipticalSlice(self.subspace.dim, prior_scale)
            self.register_buffer("partial", torch.zeros((), dtype=torch.float64))  # this epoch's log-likelihood
            self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        if method == "vi":
            self.variational = DiagonalGaussian(self.subspace.dim, init_scale)
        if method == "none" and subspace != "swag":
            self.samples.copy_(prior_scale * torch.randn(self.samples.shape, dtype=torch.float64,
                                                         generator=self._generator()))
            self.collected.fill_(num_samples)
        running = list(running_statistics(model).values()) if self.bn_update else []
        width, dtype = sum(b.numel() for b in running), running[0].dtype if running else torch.float32
        self.register_buffer("bn_statistics", torch.zeros(num_samples, width, dtype=dtype))  # per sample
        self.register_buffer("bn_ready", torch.zeros((), dtype=torch.bool))
        self._swag_draws: Tensor | None = None
        self._extend_chain = False  # set by on_load_checkpoint: a finished ESS chain given more samples
        self._drawn_at: int | None = None  # the global step at which the VI samples were drawn (once per state of q)

    # ----- construction ---------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        """A fresh CPU generator for the next draw: seeded by ``(seed, draws)``; ``draws`` is a buffer, so a
        resumed run makes the same draws as an uninterrupted one."""
        generator = torch.Generator().manual_seed((self.seed << 32) + int(self.draws))
        self.draws.add_(1)
        return generator

    def _weights_of(self, point: Union[str, Tensor]) -> Tensor:
        if isinstance(point, Tensor):
            if point.shape != (self.flat.size,):
                raise ValueError(f"curve points must be vectors of length {self.flat.size}; got {tuple(point.shape)}")
            return point.to(self.moments.mean)
        copy_of_model = copy.deepcopy(self.model)
        load_trained_weights(copy_of_model, point)
        return self.flat.flatten(copy_of_model).to(self.moments.mean)

    def _build_subspace(self, kind: str, rank: int, curve_points: Sequence[Union[str, Tensor]] | None) -> Subspace:
        mean = self.moments.mean
        if kind == "curve":
            if rank != 2 or curve_points is None or len(curve_points) != 3:
                raise ValueError(
                    f"subspace='curve' needs rank=2 and curve_points=[w0, w_half, w2]; got rank={rank!r}, "
                    f"curve_points={curve_points!r}"
                )
            return curve_subspace(*(self._weights_of(p) for p in curve_points))
        deviations = self.moments.deviation_rows()
        if deviations.shape[0] < 2:
            raise ValueError(
                f"subspace={kind!r} needs at least 2 SWAG deviations; the run stored {deviations.shape[0]} "
                "(collect more snapshots, max_rank >= 2)"
            )
        if kind == "pca":
            return pca_subspace(deviations, mean, rank)
        leading = pca_subspace(deviations, mean, min(2, deviations.shape[0] - 1)).basis
        return random_subspace(mean, rank, float(leading.norm(dim=1).mean()), self._generator())

    # ----- the network at given weights -------------------------------------------------------------------
    def forward(self, x: Any) -> Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> SubspaceInference:
        super().train(mode)
        self.model.eval()  # no dropout; BatchNorm runs on batch statistics only inside the likelihood
        return self

    def _outputs(self, weights: Tensor, x: Any, buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        network_dtype = self.model.get_parameter(self.flat.names[0]).dtype  # the moments may be wider (WideBuffers)
        values = {**self.flat.unflatten(weights.to(network_dtype)), **(buffers or {})}
        return functional_call(self.model, values, (x,), strict=False)

    def _summed_nll(self, weights: Tensor, x: Any, y: Tensor) -> Tensor:
        with batch_statistics(self.model):
            return self.likelihood.loss(self._outputs(weights, x), y) * len(y)

    # ----- fitting -----------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.variational.parameters())}]

    def takes_optimizer_steps(self) -> bool:
        return self.method == "vi"  # ESS and prior draws only sample

    def _last_batch(self, batch_idx: int) -> bool:
        return batch_idx == self.trainer.num_training_batches - 1

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if self.method == "vi":
            return self._vi_step(batch)
        if self.method == "ess":  # a sum over the data: DDP's padding repeats must not count twice
            self._ess_step(without_sampler_padding(batch, batch_idx, self.trainer.train_dataloader))
        if self._last_batch(batch_idx):
            if self.method == "ess":
                self._ess_decision()
            if self._sampling_done():
                self._refresh_all_batchnorm()
                self.trainer.should_stop = True
        return None

    def _sampling_done(self) -> bool:
        return self.kind == "swag" or int(self.collected) >= self.num_samples

    def _ess_step(self, batch: Batch) -> None:
        x, y = batch
        if not len(y):
            return
        point = self.sampler.proposal() if bool(self.started) else self.sampler.z
        with torch.no_grad():
            self.partial.sub_(self._summed_nll(self.subspace(point), x, y).double() / self.temperature)

    def _ess_decision(self) -> None:
        value = float(self.trainer.strategy.reduce(self.partial.clone(), reduce_op="sum"))
        self.partial.zero_()
        if not bool(self.started):  # the start point z = 0 was evaluated
            self.sampler.reset(self.sampler.z, value)
            self.started.fill_(True)
            step_done = True
        else:
            step_done = self.sampler.observe(value, self._generator())
            if step_done:
                self.samples[int(self.collected)] = self.sampler.z
                self.collected.add_(1)
        if step_done and not self._sampling_done():
            self.sampler.begin(self._generator())
        self.log_dict(
            {"train/log_likelihood": float(self.sampler.log_likelihood), "train/samples": float(self.collected)},
            on_step=False, on_epoch=True, batch_size=1,
        )

    def _vi_step(self, batch: Batch) -> Tensor:
        x, y = batch
        noise = torch.randn(self.subspace.dim, dtype=torch.float64, generator=self._generator())
        weights = self.subspace(self.variational.reparameterize(noise.to(self.variational.mu.device)))
        nll = self._summed_nll(weights, x, y) / len(y)
        kl = self.variational.kl(self.prior_scale)
        loss = nll + self.temperature * kl / self._num_data()
        self.log_training_loss(loss, len(y), nll=nll, kl=kl)
        return loss

    def _num_data(self) -> int:
        return self.num_data if self.num_data is not None else self.training_set_size("num_data")

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.method == "vi" and (self.trainer.max_epochs is None or self.trainer.max_epochs < 1):
            raise ValueError(f"method='vi' trains for max_epochs and then draws its samples; got {self.trainer.max_epochs!r}")
        if self.method == "ess":  # the slice threshold of one pass is compared with the next pass's likelihood
            self.refuse_dropped_examples("with method='ess' needs the log-likelihood of every training example")
        if self.method == "ess" and batchnorm_layers(self.model):
            self.refuse_shuffled_batches(
                "with method='ess' compares each pass's log-likelihood with the last one's, and on a network with "
                "BatchNorm (batch statistics) it depends on which examples share a batch (a shuffled pass scored one "
                "point differently each time, by several nats)"
            )
        if self.method == "ess" and self._sampling_done():  # resumed from a finished chain: nothing left to draw
            self.trainer.should_stop = True
        if self._extend_chain:  # begin the step after the last sample, as an uninterrupted chain does on accepting it
            self.sampler.begin(self._generator())
            self.bn_ready.fill_(False)  # the new samples' statistics come once sampling is done
            self._extend_chain = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another ``num_samples``: its per-sample buffers cut or zero-padded to this module's (the
        first ``num_samples`` samples; the file is unchanged). A finished ESS chain given more samples goes on from its
        last state, drawing what one uninterrupted chain of the new length draws."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        saved = state.get("samples")
        if saved is None or len(saved) == self.num_samples:
            return
        for name in ("samples", "bn_statistics"):
            state[name] = first_rows(state[name], self.num_samples)
        finished = int(state["collected"]) == len(saved)
        state["collected"] = state["collected"].clamp(max=self.num_samples)
        self._extend_chain = self.method == "ess" and finished and len(saved) < self.num_samples  # acted on by a fit

    def on_train_epoch_end(self) -> None:
        """VI draws its samples after its last epoch: ``max_epochs``, or earlier when ``max_steps`` or a callback
        (e.g. ``EarlyStopping`` at this epoch's validation) ends the fit."""
        if self.method == "vi" and self._fit_ends_now():
            self._draw_vi_samples()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written as a VI fit ends holds its samples, also when a callback's hook after this module's
        epoch end stopped it (``EarlyStopping`` on a training metric, before ``ModelCheckpoint`` saves)."""
        super().on_save_checkpoint(checkpoint)
        fitting = self._trainer is not None and self.trainer.training
        if self.method == "vi" and fitting and self._fit_ends_now() and self._drawn_at != self.global_step:
            self._draw_vi_samples()
            saved = checkpoint["state_dict"]
            saved.update({name: value for name, value in self.state_dict().items() if name in saved})

    def on_train_end(self) -> None:
        """A fit stopped after the epoch's end hooks (e.g. by ``max_time``) still leaves VI with its samples; a chain
        that the Trainer stopped before it held ``num_samples`` is warned of (it ended silently)."""
        if self.method == "vi" and self._drawn_at != self.global_step:
            self._draw_vi_samples()
        length = fit_length(self.trainer, steps_per_batch=True)
        if not self._sampling_done() and not length.smoke_run:
            bound = length.bound if self.current_epoch >= length.epochs else "max_time or a callback (EarlyStopping)"
            rank_zero_warn(
                f"SubspaceInference collected {int(self.collected)} of num_samples={self.num_samples} samples: the "
                f"Trainer stopped its fit at {bound} (method='ess' stops itself once num_samples are accepted, after "
                "about 2-5 epochs a sample): set max_epochs=-1 and fit again, resuming from this fit's checkpoint "
                "(e.g. --ckpt_path last.ckpt) to go on from its chain"
            )

    def _fit_ends_now(self) -> bool:
        """Whether the fit stops after this epoch: its last epoch, its step budget spent, or a stop requested once
        ``min_epochs`` are done (before that Lightning trains on)."""
        trainer = self.trainer
        epochs = self.current_epoch + 1
        stopping = trainer.should_stop and epochs >= (trainer.min_epochs or 0)
        return epochs >= (trainer.max_epochs or 0) or 0 <= trainer.max_steps <= trainer.global_step or stopping

    def _draw_vi_samples(self) -> None:
        with torch.no_grad():
            noise = torch.randn(self.samples.shape, dtype=torch.float64, generator=self._generator())
            self.samples.copy_(self.variational.reparameterize(noise.to(self.samples.device)))
        self.collected.fill_(self.num_samples)
        self._refresh_all_batchnorm()
        self._drawn_at = self.global_step  # q has not moved since: no second draw

    # ----- samples -----------------------------------------------------------------------------------------
    def available_samples(self) -> int:
        """Samples the predictive can use now (ESS during its fit: those accepted so far)."""
        return self.num_samples if self.kind == "swag" else int(self.collected)

    def sample_weights(self, num_samples: int | None = None) -> Tensor:
        """The first ``num_samples`` weight samples of the selected parameters, ``[S, P]``: at most those drawn (during
        the fit's validation those so far; before any, the subspace's centre alone), with a warning outside the fit."""
        n, available = self.resolve_num_samples(num_samples), self.available_samples()
        if n > available and not self._fitting():
            rank_zero_warn(
                f"SubspaceInference predicts with the {available} samples it holds, not num_samples={n}: fit with "
                f"num_samples={n} (a chain resumed from its checkpoint goes on to the new length)"
            )
        n = min(n, available)
        if self.kind == "swag":
            if self._swag_draws is None or self._swag_draws.device != self.moments.mean.device:
                generator = torch.Generator().manual_seed(self.seed)
                self._swag_draws = self.moments.sample(
                    self.swag_scale, self.num_samples, generator=generator,
                    low_rank=low_rank_part(self.moments, self.swag_scale, "subspace='swag'"),
                )
            return self._swag_draws[:n]
        if n == 0:
            return self.subspace.shift.unsqueeze(0)
        return self.subspace(self.samples[:n])

    def _refresh_all_batchnorm(self) -> None:
        """Recompute and cache every sample's BatchNorm statistics over the training data."""
        if not self.bn_update:
            return
        params = dict(self.model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.flat.names}
        with batchnorm_statistics_kept(self.model):
            try:
                for index, weights in enumerate(self.sample_weights(self.num_samples)):
                    with torch.no_grad():
                        for name, value in self.flat.unflatten(weights).items():
                            params[name].copy_(value)
                    refresh_batchnorm(self.model, side_pass(self.trainer.train_dataloader), self.device)
                    current = running_statistics(self.model)
                    flat = torch.cat([b.reshape(-1) for b in current.values()])
                    self.bn_statistics[index] = self.trainer.strategy.reduce(flat, reduce_op="mean")
            finally:
                with torch.no_grad():
                    for name, value in saved.items():
                        params[name].copy_(value)
        self.bn_ready.fill_(True)

    def _sample_buffers(self, index: int) -> dict[str, Tensor]:
        if not self.bn_update:
            return {}
        if not bool(self.bn_ready):
            return {}  # during sampling: the trained model's statistics
        current = running_statistics(self.model)
        values = self.bn_statistics[index].split([b.numel() for b in current.values()])
        return {n: v.view_as(b).to(b.dtype) for (n, b), v in zip(current.items(), values)}

    def _fitting(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING

    def _no_batchnorm_statistics(self) -> str:
        """Why the samples have no BatchNorm statistics: no fit, or a chain's fit stopped before it was done (the
        statistics come once sampling is)."""
        if self.method == "ess" and bool(self.started):
            return (
                f"the model has BatchNorm, whose statistics SubspaceInference recomputes for each sample once sampling "
                f"is done, and its fit collected {int(self.collected)} of num_samples={self.num_samples} samples "
                "before the Trainer stopped it (e.g. at max_epochs): fit on with max_epochs=-1, resuming from its "
                "checkpoint, or pass bn_update=False"
            )
        return (
            "the model has BatchNorm: fit SubspaceInference first (it recomputes each sample's statistics), "
            "or pass bn_update=False"
        )

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        """Ensemble of the first ``num_samples`` samples (at most those drawn: :meth:`sample_weights`), each with its
        own BatchNorm statistics; the model runs in eval mode."""
        if self.bn_update and not bool(self.bn_ready) and not self._fitting():
            raise ValueError(self._no_batchnorm_statistics())
        weights = self.sample_weights(num_samples)
        outputs = [self._outputs(w, x, self._sample_buffers(i)) for i, w in enumerate(weights)]
        return self.likelihood.predictive(torch.stack(outputs))
