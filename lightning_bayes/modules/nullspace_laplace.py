"""``NullSpaceLaplace``: the projected (null-space) Laplace posterior of a trained network, post hoc.

``q(theta) = N(theta_hat, alpha^-1 P)`` with ``P`` the projector onto the kernel of the training
Jacobian of the constraint map (all logits, or the per-example loss). Its ``fit`` is the alternating
projection sweeps of :mod:`lightning_bayes.inference.nullspace`: one training step projects every sample
onto the kernel of one micro-batch, one epoch is one sweep (the extrapolation runs after its last batch,
except in the fit's last epoch: a plain last sweep leaves the samples nearest the training kernel), so
progress bars, devices, checkpoints and exact resumption come from the Trainer. The samples are buffers;
``theta_hat`` never changes; a Gaussian likelihood's trained noise comes from ``checkpoint`` with the network.
``train/kernel_residual`` is the sweep's mean ``||J_b v|| / ||v||`` on the training batches as the samples
reached them (zero at convergence); ``val/kernel_residual`` is the same on the validation batches (it tends to
how far the training kernel is from theirs, not to zero). Under DDP every process sweeps all the training
batches (the loader is not split: ``use_distributed_sampler=False``) and projects its own contiguous share of
the samples; the shares are summed across processes at the end of each sweep, before a checkpoint and before
validation, so every process holds all the samples. Reference: Miani, Roy & Hauberg, AISTATS 2025.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import vmap
from torch.utils.data import DistributedSampler

from ..checks import check_network, is_int, is_number
from ..datamodules.epoch_loader import loader_samplers
from ..heap import ReleaseOnGrowth
from ..inference.likelihoods import Likelihood
from ..inference.linalg import ConstraintFn, LossConstraint, ParameterFunction, output_constraint, take_examples
from ..inference.nullspace import AlternatingProjections, largest_scale, prior_precision
from ..inference.wide_buffers import WideBuffers
from ..models.weights import load_trained_likelihood, load_trained_weights
from ..params import ParamSelector
from ..predictive import Predictive
from .base import Batch, BayesianModule
from .fit_length import fit_length

_CONSTRAINTS = ("auto", "output", "loss")
_PREDICTIVES = ("linearized", "neural")
_MAX_OUTPUT_CONSTRAINTS = 10  # "auto" picks the output kernel up to this many outputs per example
# CPU: hand the freed Jacobians back once this much has built up since the last time (glibc keeps them resident:
# lightning_bayes.heap); a fixed count of micro-batches instead (every 20: MNIST LeNet-5 1.6 GB instead of 5.5 GB)
# let the digits MLP's 27 MB a batch reach 870 MB, and every batch costs 12 to 60% more time
_RELEASE_AFTER_BYTES = 256 * 2**20
_DENSE_RESIDUAL_ENTRIES = 2**25  # a validation batch's Jacobian above this (128 MB in float32) is not formed


class NullSpaceLaplace(WideBuffers, BayesianModule):
    """Post-hoc null-space Laplace on a trained ``model`` (any ``nn.Module``, any parameter subset).

    Args:
        model: the network; its current weights are ``theta_hat`` unless ``checkpoint`` is given.
        checkpoint: a trained model's Lightning checkpoint or state dict (a glob picks the newest match),
            e.g. ``runs/mnist_map/version_*/checkpoints/best.ckpt`` from ``configs/mnist/map.yaml``.
        params: the parameters the posterior covers (``"all"``, ``"lora"``, globs; see ``params.py``).
        constraint: ``"output"`` (every output of every training point stays fixed), ``"loss"`` (every
            per-example loss stays fixed to first order; for many outputs and LLMs), ``"auto"`` (output up to
            10 outputs), or a per-example callable ``(outputs, y) -> [m]``.
        num_samples: posterior samples S drawn and projected.
        alpha: prior precision: a number, ``"evidence"`` (``r/||theta_hat||^2``) or ``"reference_code"``.
        scale: sample scale ``c`` (``theta_s = theta_hat + c alpha^-1/2 v_s``) or ``"line_search"``: the
            largest ``c`` raising the training NLL of the predictive by at most a fraction ``scale_tolerance``.
        predictive: ``"linearized"`` (``f(theta_hat, x) + J(x)(theta_s - theta_hat)``, one JVP per sample) or
            ``"neural"`` (``f(theta_s, x)``).
        rtol: relative eigenvalue cutoff of each micro-batch Gram matrix.
        atol: absolute eigenvalue cutoff, used instead of ``rtol`` when given.
        accelerate: extrapolate after every sweep but the fit's last (by ``max_epochs`` or ``max_steps``).
        cache_gram: keep each micro-batch's Gram factor across sweeps (float64, ``M_b^2`` numbers a batch: 0.7 GB
            for MNIST's 3,438 output-kernel batches of 16); ``False`` recomputes it every sweep (less memory, about
            the first sweep's cost each time).
        chunk_size: samples (and examples) per vmapped chunk; lower it to save memory.
        compile_jacobian: build each micro-batch's per-example Jacobians under ``torch.compile``
            (:func:`~lightning_bayes.inference.linalg.compiled_per_example_jacobian`): the same values without
            ``torch.func``'s per-operation dispatch (LeNet-5's output kernel, batches of 16, one CPU thread: a
            batch's Jacobians 15 -> 8.5 ms, 3 sweeps over 60 batches 6.4 -> 5.7 s, the first sweep's float32
            Gram matrices being the larger cost); the first batches pay the compilation (seconds).
        seed: seed of the Gaussian draws.
        scale_batches: training micro-batches the line search evaluates.
        scale_tolerance: for ``scale="line_search"``, the largest relative increase of the training NLL allowed
            (0.01: 1%).
        likelihood: as in :class:`~lightning_bayes.modules.base.BayesianModule`.
    """

    wide_buffers = ("scale_value",)  # the line search's scale stays float32 or wider under bf16-true

    # buffers (register_buffer), typed for readers and checkers
    scale_value: Tensor

    def __init__(
        self,
        model: nn.Module,
        checkpoint: str | None = None,
        params: ParamSelector = "all",
        constraint: Union[str, ConstraintFn] = "auto",
        likelihood: Union[str, Likelihood] = "categorical",
        num_samples: int = 30,
        alpha: Union[float, str] = "evidence",
        scale: Union[float, str] = 1.0,
        scale_tolerance: float = 0.01,
        scale_batches: int = 8,
        predictive: str = "linearized",
        rtol: float = 1e-5,
        atol: float | None = None,
        accelerate: bool = True,
        cache_gram: bool = True,
        chunk_size: int | None = None,
        compile_jacobian: bool = False,
        seed: int = 0,
    ) -> None:
        check_network(model, "model")
        super().__init__(likelihood=likelihood, num_samples=num_samples)
        self.save_hyperparameters(ignore=["model", "likelihood", "constraint"])
        if isinstance(constraint, str):  # a checkpoint rebuilds (and a resume checks) the kernel it was fitted in
            self.hparams["constraint"] = constraint
        if not (constraint in _CONSTRAINTS if isinstance(constraint, str) else callable(constraint)):
            raise ValueError(f"constraint must be one of {_CONSTRAINTS} or a callable; got {constraint!r}")
        if predictive not in _PREDICTIVES:
            raise ValueError(f"predictive must be one of {_PREDICTIVES}; got {predictive!r}")
        if not (scale == "line_search" or (is_number(scale) and 0 <= scale < math.inf)):
            raise ValueError(f"scale must be a finite number >= 0 or 'line_search'; got {scale!r}")
        if not is_int(scale_batches) or scale_batches < 1:
            raise ValueError(f"scale_batches must be an int >= 1; got {scale_batches!r}")
        if not (is_number(scale_tolerance) and 0 < scale_tolerance < math.inf):  # else refused after the sweeps
            raise ValueError(
                f"scale_tolerance must be a finite number > 0 (a relative training-NLL increase); "
                f"got {scale_tolerance!r}"
            )
        prior_precision(alpha, 1.0, torch.ones(1))  # validates a number or a rule's name
        self.automatic_optimization = False
        if checkpoint is not None:
            load_trained_likelihood(self.likelihood, load_trained_weights(model, checkpoint))
        self.model = model.requires_grad_(False).eval()
        self.alpha_rule, self.scale_rule, self.scale_tolerance = alpha, scale, scale_tolerance
        self.scale_batches, self.predictive_mode = scale_batches, predictive
        chosen: dict[str, ConstraintFn] = {
            "output": output_constraint, "loss": LossConstraint(self.likelihood), "auto": output_constraint
        }
        self.function = ParameterFunction(
            model,
            params,
            chosen[constraint] if isinstance(constraint, str) else constraint,
            chunk_size=chunk_size,
            compile_jacobian=compile_jacobian,
        )
        self._constraint_pending = constraint == "auto"
        self.projections = AlternatingProjections(
            self.function.size, num_samples, seed=seed, rtol=rtol, atol=atol, accelerate=accelerate, cache=cache_gram,
            dtype=torch.promote_types(self.function.theta().dtype, torch.float32),  # bf16 samples left the kernel
        )
        self.register_buffer("scale_value", torch.tensor(1.0, dtype=torch.float32))  # the line search's result
        self._scale_batches: list[Batch] = []  # the sweep's first batches, for the line search at its end
        self._sweep_under_way = False
        self._forward_mode: bool | None = None  # whether forward-mode AD runs through the network (found once)
        self._rows_per_example: int | None = None  # constraint rows of one validation example (found once)
        self._release_freed = ReleaseOnGrowth(_RELEASE_AFTER_BYTES)

    # ----- the trained network -----------------------------------------------------------------------
    def forward(self, x: Any) -> Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> NullSpaceLaplace:
        super().train(mode)
        self.model.eval()  # theta_hat's network always runs in eval mode (BatchNorm statistics, no dropout)
        return self

    def takes_optimizer_steps(self) -> bool:
        return False  # nothing is trained: the sweeps update buffers

    def _resolve_constraint(self, x: Any) -> None:
        """``constraint="auto"``: the loss kernel once the outputs per example exceed 10 (seen on a first batch)."""
        if self._constraint_pending:
            with torch.no_grad():
                if self.model(x).shape[-1] > _MAX_OUTPUT_CONSTRAINTS:
                    self.function.constraint = LossConstraint(self.likelihood)
            self._constraint_pending = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's projected samples, whatever ``num_samples`` is now: the predictive uses the first
        ``num_samples`` of them (alpha and the scale stay the fit's, which used them all); more needs a new fit."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        if "projections.samples" not in state:
            raise ValueError(
                f"this checkpoint holds no null-space Laplace samples (its tensors: {list(state)[:4]}...): to start "
                "from a trained network's weights pass the file as NullSpaceLaplace(checkpoint=...), not as ckpt_path"
            )
        saved, own = checkpoint.get("hyper_parameters", {}).get("constraint"), self.hparams.get("constraint")
        if isinstance(saved, str) and isinstance(own, str) and saved != own:
            raise ValueError(
                f"the checkpoint's samples were projected with constraint={saved!r}; this module has "
                f"constraint={own!r}: build it with constraint={saved!r}, or fit anew"
            )
        self._scale_batches = checkpoint.get("line_search_batches", [])
        self._sweep_under_way = "line_search_batches" in checkpoint
        for name in ("noise", "samples", "sweep_start"):  # this module's buffers take the saved shapes
            saved = checkpoint["state_dict"][f"projections.{name}"]
            setattr(self.projections, name, getattr(self.projections, name).new_empty(saved.shape))
        held = self.projections.samples.shape[0]
        if self.num_samples > held:
            raise ValueError(
                f"num_samples={self.num_samples} exceeds the {held} samples the checkpoint's fit projected; pass "
                f"num_samples <= {held}, or fit again with num_samples={self.num_samples}"
            )

    # ----- the sweeps ----------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.end_quiet_notices()  # Lightning's check has run; before this method's own refusals below
        loader = self.trainer.train_dataloader
        samplers = loader_samplers(loader)
        if any(isinstance(sampler, DistributedSampler) for sampler in samplers):
            raise ValueError(
                f"NullSpaceLaplace under {self.trainer.world_size} processes needs every training batch on every "
                "process (each projects its share of the samples onto the kernel of all of them); the Trainer split "
                "the training loader: set use_distributed_sampler=False (LightningCLI: "
                "--trainer.use_distributed_sampler false)"
            )
        started, batches = self.batches_done_at_resume(), self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                "NullSpaceLaplace's sweep is one pass over the training loader, which has no length (an "
                "IterableDataset): give it a length, or bound the pass with --trainer.limit_train_batches N"
            )
        if started and not callable(getattr(loader, "state_dict", None)):
            raise ValueError(
                f"the checkpoint was saved inside a sweep (after batch {started} of {batches}); Lightning restarts a "
                "training loader without state_dict from its first batch, so the sweep cannot go on exactly: resume "
                "from a checkpoint saved at the end of a sweep (ModelCheckpoint saves at epoch ends by default), or "
                "train from a torchdata StatefulDataLoader (the library's datamodules do)"
            )
        self.refuse_dropped_examples("projects onto the kernel of every training example")
        self.refuse_shuffled_batches(
            "sweeps the training batches in one fixed order (cached Gram factors, exact resumption)"
        )
        super().on_train_start()

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """One micro-batch of the sweep, in full precision also under ``precision="bf16-mixed"``: bf16 Jacobians
        (5% off on an MLP) move every projection and the rank estimate behind ``alpha``."""
        with torch.autocast(self.device.type, enabled=False):
            self._sweep_step(batch, batch_idx)

    def _sweep_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        self._resolve_constraint(x)
        if batch_idx == 0:
            if self.predictive_mode == "linearized":
                self.function.check_forward_mode(x)  # fail now, naming the model, not at the first evaluation
            self.projections.begin_sweep()
            self._scale_batches, self._sweep_under_way = [], True
        if self.scale_rule == "line_search" and len(self._scale_batches) < self.scale_batches:
            self._scale_batches.append((x, y))
        self.projections.project(self.function.jacobian(x, y), key=batch_idx, rows=self._own_rows())
        if self.device.type == "cpu":
            self._release_freed()  # the freed Jacobians would otherwise stay resident (lightning_bayes.heap)
        if batch_idx == self.trainer.num_training_batches - 1:
            self._end_sweep()

    def _own_rows(self) -> slice:
        """The samples this process projects: all of them on one process, a contiguous share under DDP."""
        if self._trainer is None or self.trainer.world_size == 1:
            return slice(None)
        share = torch.arange(self.projections.samples.shape[0]).tensor_split(self.trainer.world_size)[self.global_rank]
        return slice(int(share[0]), int(share[-1]) + 1) if len(share) else slice(0, 0)

    def _share_samples(self) -> None:
        """Under DDP, every process's share summed into the samples of all (the other rows are zero in each
        term, so the sum is exact); idempotent, and nothing to do on one process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return
        own = torch.zeros_like(self.projections.samples)
        rows = self._own_rows()
        own[rows] = self.projections.samples[rows]
        self.projections.samples.copy_(self.trainer.strategy.reduce(own, reduce_op="sum"))

    def _end_sweep(self) -> None:
        self._sweep_under_way = False
        self._share_samples()
        last = self.current_epoch + 1 >= fit_length(self.trainer, steps_per_batch=True).epochs
        self.projections.end_sweep(extrapolate=not last)
        if self.scale_rule == "line_search":
            self.scale_value.fill_(largest_scale(self._training_nll, tolerance=self.scale_tolerance))
        self.log_dict(
            {"train/sweeps": float(self.projections.sweeps_done), "train/rank": self.rank(), "train/alpha": self.alpha(),
             "train/scale": self.scale(), "train/kernel_residual": self._sweep_residual()},
            on_step=False, on_epoch=True, batch_size=1, sync_dist=True,  # equal on every process: quiets Lightning
        )

    def _sweep_residual(self) -> float:
        """The sweep's mean ``||J_b v|| / ||v||`` over every process's samples (their sums added up)."""
        residual = self.projections.sweep_residual
        residual.copy_(self.trainer.strategy.reduce(residual.clone(), reduce_op="sum"))
        return self.projections.mean_sweep_residual()

    def _training_nll(self, scale: float) -> float:
        with torch.no_grad():
            batches = move_data_to_device(self._scale_batches, self.device)  # resumed ones come on the CPU
            nll = [-self.predictive(x, scale=scale).log_prob(y).mean() for x, y in batches]
        return float(torch.stack(nll).mean())

    # ----- the posterior ---------------------------------------------------------------------------------
    def rank(self) -> float:
        """Hutchinson estimate of ``rank J`` from the current samples."""
        return float(self.projections.rank_estimate())

    def alpha(self) -> float:
        """The prior precision ``alpha`` from its rule and the current rank estimate."""
        if isinstance(self.alpha_rule, str) and not self.projections.sweeps_done and self.rank() == 0:
            raise RuntimeError(
                f"NullSpaceLaplace's alpha={self.alpha_rule!r} needs the rank estimate of projected samples, and no "
                "sweep has projected them yet: fit first (trainer.fit), or load a fitted checkpoint"
            )
        return prior_precision(self.alpha_rule, self.rank(), self.function.theta())

    def scale(self) -> float:
        """The sample scale ``c``: the argument, or the line search's result (kept in the checkpoint)."""
        return float(self.scale_value) if self.scale_rule == "line_search" else float(self.scale_rule)

    def deltas(self, num_samples: int | None = None, scale: float | None = None) -> Tensor:
        """``theta_s - theta_hat = c alpha^-1/2 v_s`` for the first ``num_samples`` samples, ``[S, P]``."""
        s = self.resolve_num_samples(num_samples)
        if s > self.projections.samples.shape[0]:
            raise ValueError(f"num_samples={s} exceeds the {self.projections.samples.shape[0]} projected samples")
        c = self.scale() if scale is None else scale
        return self.projections.samples[:s] * (c / math.sqrt(self.alpha()))

    def predictive(self, x: Any, num_samples: int | None = None, scale: float | None = None) -> Predictive:
        """Posterior predictive with the first ``num_samples`` samples at sample scale ``scale`` (default: ``scale()``)."""
        deltas = self.deltas(num_samples, scale)
        theta = self.function.theta()
        if self.predictive_mode == "linearized":
            outputs, tangents = self.function.jvp(x, deltas.to(theta.dtype), theta)
            samples = outputs.unsqueeze(0) + tangents
        else:
            samples = vmap(lambda d: self.function.outputs(theta + d, x), chunk_size=self.function.chunk_size)(deltas)
        return self.likelihood.predictive(samples)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._share_samples()  # a validation inside a sweep sees every process's latest rows

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Inside a sweep, the batches the line search has collected (a resumed sweep goes on from the next batch).
        Under DDP, only rank 0 writes the file: its samples must hold every process's rows (mid-sweep too)."""
        super().on_save_checkpoint(checkpoint)
        if self._sweep_under_way and self.scale_rule == "line_search":
            checkpoint["line_search_batches"] = move_data_to_device(self._scale_batches, "cpu")
        if self._trainer is not None and self.trainer.world_size > 1:
            self._share_samples()
            checkpoint["state_dict"]["projections.samples"] = self.projections.samples.clone()

    def _kernel_residual(self, x: Any, y: Tensor) -> Tensor:
        """``||J_b v_s|| / ||v_s||`` per sample on a validation batch: from its dense Jacobian while that is small (the
        per-example gradients are then the quicker route), else by ``S`` forward-mode products with nothing ``M_b x
        P`` formed (a ResNet-18's output Jacobian of 16 images took 7.2 GB and 16.5 s, its 30 products 0.2 s)."""
        theta = self.function.theta()
        if self._rows_per_example is None and len(y):  # one forward, once: the constraint rows of one example
            self._rows_per_example = self.function.constraints(theta, take_examples(x, 1), y[:1]).numel()
        rows = (self._rows_per_example or 0) * len(y)
        if rows * self.function.size > _DENSE_RESIDUAL_ENTRIES:
            if self._forward_mode is None:
                try:
                    self.function.check_forward_mode(x)
                    self._forward_mode = True
                except RuntimeError as error:  # e.g. a 4-bit base's matmul: the dense Jacobian as before
                    rank_zero_warn(f"val/kernel_residual forms each batch's {rows} x {self.function.size} Jacobian: "
                                   f"{error}")
                    self._forward_mode = False
            if self._forward_mode:
                return self.projections.residual(lambda v: self.function.constraint_jvp(x, y, v, theta), theta.dtype)
        return self.projections.residual(self.function.jacobian(x, y))

    def validation_step(  # type: ignore[override]  # Lightning passes any output to callbacks; STEP_OUTPUT is narrower
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> Predictive:
        x, y = batch
        self._resolve_constraint(x)
        residual = self._kernel_residual(x, y).mean()
        self.log("val/kernel_residual", residual, batch_size=len(y), sync_dist=True)  # all ranks' batches
        if self.trainer.sanity_checking and not self.projections.sweeps_done:
            return None  # type: ignore[return-value]  # no posterior before the first sweep: nothing to score
        return super().validation_step(batch, batch_idx, dataloader_idx)
