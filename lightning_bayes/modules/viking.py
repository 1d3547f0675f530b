"""``VIKING``: variational inference with kernel and image Gaussians, trained jointly with the network.

``q(theta) = N(theta_hat, sigma_ker^2 P + sigma_im^2 (I - P))`` over the selected parameters
(:mod:`lightning_bayes.inference.viking`), ``P`` the projector onto the kernel of the training
constraint Jacobian (per-example loss by default, as in the paper; or all outputs). Training follows the
reference's three phases, counted in epochs (``phase_epochs``):

1. maximum likelihood on ``theta_hat`` (a plain training step);
2. the ELBO with ``theta_hat`` frozen: only ``log alpha`` and ``log sigma_im`` learn;
3. the full ELBO ``sum_batch NLL(theta) + beta KL(q || p)`` with one sample
   ``theta = theta_hat + sigma_ker k + sigma_im (e - k)``, where ``e = sqrt(gamma) k_prev + sqrt(1 - gamma) eta``
   mixes the carried kernel noise with a fresh draw and ``k = P_b(theta_hat) e`` is projected onto this
   batch's kernel, differentiably (:func:`~lightning_bayes.inference.kernel_projection.project_to_kernel`):
   its gradient in ``theta_hat`` is a second derivative of the network, so a network with an operation torch cannot
   differentiate twice (``nn.Hardsigmoid``, in timm's MobileNetV3) is refused at the fit's first step.

At every epoch start one alternating-projection sweep over the training batches at the current
``theta_hat`` projects the carried noise and ``num_samples`` posterior draws together (one Jacobian per
batch serves all of them); ``gamma = 1`` keeps that epoch-start split all epoch without per-step
projections. The predictive samples ``theta_s = theta_hat + sigma_ker k_s + sigma_im (e_s - k_s)`` from the
last sweep: validation during fit uses the epoch-start sweep; test, predict and a ``validate`` outside a fit
re-sweep when ``theta_hat`` has moved since (a direct ``predictive`` call then warns: ``module.sweep(loader)``
re-projects). Noise, carried kernel part, samples and the generator state live in the checkpoint, so a
resumed run continues exactly. Under DDP every rank draws its own noise (``seed + rank``; DDP does not broadcast
these buffers) and sweeps its own shard; checkpoints keep every rank's noise and generator. The first two phases
leave parameters without gradients, so DDP needs ``find_unused_parameters=True``.

From the scale warm-up on, the network runs as a function of the selected parameters in eval mode (BatchNorm's
running statistics, no dropout: per-example Jacobians need examples that do not depend on each other), and the
parameters outside ``params`` keep the values the MLE phase gave them. The per-batch projections and the sweeps
run with autocast off (at the parameters' precision) under ``bf16-mixed``; the sampled forward keeps autocast.
Logged: ``train/nll``, ``kl``, ``alpha``, ``sigma_image``, ``sigma_kernel``, ``image_dim`` (Hutchinson's
``P - R``), ``kernel_dim`` and, with ``gamma < 1``, ``kernel_residual`` ``||J_b k|| / ||k||`` of the step's
projection (at the steps whose logs Lightning writes); ``val/kernel_residual`` is the first posterior sample's
on the validation batches (how far the training kernel is from theirs).
Reference: Fadel et al., NeurIPS 2025 (arXiv 2510.23684).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Union, cast

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import AttributeDict, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.func import vmap

from ..checks import check_network, check_seed, is_int, is_number
from ..datamodules import limited_batches, side_pass, step_batch
from ..generator import PicklableGenerator
from ..inference.kernel_projection import (
    SOLVERS, Solver, build_system, missing_second_derivative, project, project_to_kernel,
)
from ..inference.likelihoods import Likelihood
from ..inference.linalg import ConstraintFn, LossConstraint, ParameterFunction, output_constraint
from ..inference.viking import KernelImageGaussian, image_dimension, mix_noise
from ..inference.wide_buffers import WideBuffers
from ..models.weights import load_trained_likelihood, load_trained_weights
from ..modes import modes_kept
from ..params import ParamSelector
from ..predictive import Predictive
from ..skipped_epoch_hooks import epoch_hooks_skipped
from .base import Batch, BayesianModule, first_rows
from .fit_length import fit_length

_CONSTRAINTS = ("loss", "output")
_PREDICTIVES = ("neural", "linearized")
_RANK_NOISE = ("epoch_noise", "carried", "sample_noise", "sample_kernel")  # each DDP rank's own draws


class VIKING(WideBuffers, BayesianModule):
    """VIKING on ``backbone`` (any ``nn.Module``; the posterior covers the parameters selected by ``params``).

    Args:
        backbone: the network; its selected parameters are the variational mean ``theta_hat``.
        checkpoint: optional trained weights to start from (a Lightning checkpoint or state dict; a glob picks the
            newest match), e.g. the MAP of ``configs/mnist/map.yaml``: the reference warm-starts from the MLE.
        params: the parameters the posterior covers (``"all"``, ``"last_layer"``, globs; see ``params.py``).
        constraint: ``"loss"`` (per-example losses, one row per example; the paper's choice), ``"output"``
            (every output) or a per-example callable ``(outputs, y) -> [m]``.
        phase_epochs: epochs of maximum likelihood, of the scale warm-up (``theta_hat`` frozen) and of the full
            ELBO; the Trainer's ``max_epochs`` or ``max_steps`` ends the fit (a warning when it cuts the phases
            short), and training continues with the full ELBO after their sum.
        gamma: weight of the carried kernel noise in each step's noise (0: fresh noise every step; 1: the
            epoch-start split all epoch).
        kl_weight: ``beta``; ``"elbo"`` is ``B/N`` (the ELBO of a batch), a number is used as given (the
            reference's classifier uses 1e-2).
        solver: per-batch projection solver: ``"dense"`` (exact; per-example Jacobians; our default, cheaper
            than CG's 10 JVP/VJP pairs for the loss constraint's ``B`` rows) or ``"cg"`` (reorthogonalised CG,
            matrix-free: the paper's solver).
        iterations: CG steps per projection with ``solver="cg"`` (reference: 10).
        log_alpha: initial log prior precision, ``sigma_ker = alpha^-1/2`` (reference: 4).
        log_sigma_image: initial log image scale (reference: -2).
        scale_lr: learning rate of ``log alpha`` and ``log sigma_im`` (a second parameter group); ``None``: the
            optimiser's.
        num_samples: posterior samples of the predictive (all projected at every sweep).
        sweep_every_n_epochs: sweep at the start of every n-th ELBO epoch (reference: 1); ``0`` sweeps only
            before test and predict (validation then keeps the last samples): with ``gamma < 1`` the
            epoch-start kernel part fades from the carried noise as ``gamma^(steps/2)``, so the sweep mostly
            serves the predictive. ``gamma = 1`` needs a sweep every epoch.
        predictive: ``"neural"`` (``f(theta_s, x)``) or ``"linearized"`` (``f(theta_hat) + J (theta_s - theta_hat)``).
        chunk_size: vectors per vmapped chunk in Jacobian products and predictive samples.
        compile_jacobian: with ``solver="dense"``, build the per-example Jacobians (and so the projection's
            parameter gradient) under ``torch.compile``
            (:func:`~lightning_bayes.inference.linalg.compiled_per_example_jacobian`): the same values without
            ``torch.func``'s per-operation dispatch (LeNet-5 on 2 CPU threads: an epoch 6.5x -> 5.1x a MAP epoch);
            the first steps pay the compilation (seconds).
        seed: seed of every Gaussian draw (the generator's state is checkpointed).
        likelihood, optimizer, lr_scheduler: as in :class:`~lightning_bayes.modules.base.BayesianModule`.
    """

    wide_buffers = (*_RANK_NOISE, "swept_at")  # bf16-true keeps the noise in the kernel and the fingerprint exact
    # buffers (register_buffer), typed for readers and checkers
    epoch_noise: Tensor
    carried: Tensor
    sample_noise: Tensor
    sample_kernel: Tensor
    swept_at: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        checkpoint: str | None = None,
        params: ParamSelector = "all",
        constraint: Union[str, ConstraintFn] = "loss",
        likelihood: Union[str, Likelihood] = "categorical",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        phase_epochs: Sequence[int] = (5, 5, 50),
        gamma: float = 0.2,
        kl_weight: Union[float, str] = "elbo",
        solver: Solver = "dense",
        iterations: int = 10,
        log_alpha: float = 4.0,
        log_sigma_image: float = -2.0,
        scale_lr: float | None = None,
        num_samples: int = 30,
        sweep_every_n_epochs: int = 1,
        predictive: str = "neural",
        chunk_size: int | None = None,
        compile_jacobian: bool = False,
        seed: int = 0,
    ) -> None:
        check_network(backbone, "backbone")
        super().__init__(likelihood=likelihood, optimizer=optimizer, lr_scheduler=lr_scheduler, num_samples=num_samples)
        self.save_hyperparameters(ignore=["backbone", "likelihood", "constraint"])
        if isinstance(constraint, str):  # a checkpoint rebuilds the kernel it was trained in
            self.hparams["constraint"] = constraint
        if not (constraint in _CONSTRAINTS if isinstance(constraint, str) else callable(constraint)):
            raise ValueError(f"constraint must be one of {_CONSTRAINTS} or a callable; got {constraint!r}")
        if not isinstance(phase_epochs, Sequence) or len(phase_epochs) != 3 or not all(
            is_int(e) and e >= 0 for e in phase_epochs
        ):
            raise ValueError(f"phase_epochs must be three ints >= 0 (MLE, warm-up, ELBO); got {phase_epochs!r}")
        if not (is_number(gamma) and 0 <= gamma <= 1):
            raise ValueError(f"gamma must be a number in [0, 1]; got {gamma!r}")
        if not (kl_weight == "elbo" or (is_number(kl_weight) and 0 <= kl_weight < math.inf)):
            raise ValueError(f"kl_weight must be a finite number >= 0 or 'elbo'; got {kl_weight!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
        if not is_int(iterations) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1; got {iterations!r}")
        if scale_lr is not None and not (is_number(scale_lr) and 0 < scale_lr < math.inf):
            raise ValueError(f"scale_lr must be None or a finite number > 0; got {scale_lr!r}")
        if not is_int(sweep_every_n_epochs) or sweep_every_n_epochs < 0 or (gamma == 1 and sweep_every_n_epochs != 1):
            raise ValueError(
                f"sweep_every_n_epochs must be an int >= 0 (1 when gamma = 1); got {sweep_every_n_epochs!r} "
                f"with gamma={gamma}"
            )
        if predictive not in _PREDICTIVES:
            raise ValueError(f"predictive must be one of {_PREDICTIVES}; got {predictive!r}")
        if checkpoint is not None:  # a Gaussian likelihood's trained noise with the network
            load_trained_likelihood(self.likelihood, load_trained_weights(backbone, checkpoint))
        self.backbone = backbone
        self.family = KernelImageGaussian(log_alpha, log_sigma_image)
        maps: dict[str, ConstraintFn] = {"loss": LossConstraint(self.likelihood), "output": output_constraint}
        self.function = ParameterFunction(
            backbone,
            params,
            maps[constraint] if isinstance(constraint, str) else constraint,
            chunk_size=chunk_size,
            compile_jacobian=compile_jacobian,
        )
        self.phase_epochs, self.gamma, self.kl_weight = tuple(phase_epochs), gamma, kl_weight
        self.solver, self.iterations, self.predictive_mode = solver, iterations, predictive
        self.scale_lr, self.sweep_every_n_epochs = scale_lr, sweep_every_n_epochs
        check_seed(seed, bits=48)  # + the rank
        self.generator = PicklableGenerator().manual_seed(seed)  # ddp_spawn pickles the module
        size, dtype = self.function.size, self.function.theta().dtype
        self.family.to(dtype)
        self.register_buffer("epoch_noise", torch.zeros(size, dtype=dtype))  # e of the epoch-start sweep (gamma = 1)
        self.register_buffer("carried", torch.zeros(size, dtype=dtype))  # the carried kernel part k
        self.register_buffer("sample_noise", torch.zeros(num_samples, size, dtype=dtype))  # e_s of the predictive
        self.register_buffer("sample_kernel", torch.zeros(num_samples, size, dtype=dtype))  # k_s = P e_s
        self.register_buffer("swept_at", torch.full((2,), float("nan"), dtype=torch.float64))  # fingerprint
        self._ddp_params_and_buffers_to_ignore = list(_RANK_NOISE)  # DDP must not broadcast rank 0's noise
        self._second_derivatives_checked = False  # per fit: see _check_second_derivatives
        self._seeded_rank: int | None = None  # the DDP rank whose stream the generator was seeded for (see setup)

    def forward(self, x: Any) -> Tensor:
        return self.backbone(x)

    def phase(self, epoch: int | None = None) -> int:
        """1 (maximum likelihood), 2 (scale warm-up) or 3 (full ELBO) at ``epoch`` (default: the current one)."""
        epoch = self.current_epoch if epoch is None else epoch
        mle, warmup, _ = self.phase_epochs
        return 1 if epoch < mle else 2 if epoch < mle + warmup else 3

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The network's parameters, the likelihood's (a Gaussian's noise, without weight decay), and the two
        log-scales (at ``scale_lr`` when given)."""
        scales: dict[str, Any] = {"params": list(self.family.parameters())}
        if self.scale_lr is not None:
            scales["lr"] = self.scale_lr
        model = [*self.backbone.parameters(), *self.likelihood.parameters()]
        return [*self.without_decay_for([p for p in model if p.requires_grad]), scales]

    # ----- the flat parameters and the noise -----------------------------------------------------------
    def theta_hat(self) -> Tensor:
        """The selected parameters as one flat vector, differentiable."""
        named = dict(self.backbone.named_parameters())
        return torch.cat([named[n].reshape(-1) for n in self.function.flat.names])

    def _randn(self, *shape: int) -> Tensor:
        """Standard normal draws, always from the float32 stream: Lightning's 64-true makes float64 the default dtype
        inside steps only, which gave a run two streams and none of a float32 run's draws."""
        return torch.randn(*shape, generator=self.generator, dtype=torch.float32).to(self.carried)

    def _fingerprint(self) -> Tensor:
        theta = self.function.theta().double()
        return torch.stack([theta.sum(), theta.norm()]).to(self.swept_at)

    # ----- sweeps ----------------------------------------------------------------------------------------
    def sweep(self, batches: Iterable[Batch], max_batches: float | None = None) -> None:  # inf (unsized loader): all
        """Draw fresh noise for the carried vector and the ``num_samples`` posterior samples and project all of
        them onto the kernel of every batch in turn (one alternating-projection sweep at the current ``theta_hat``)."""
        noise = self._randn(1 + self.sample_noise.shape[0], self.function.size)
        vectors, theta = noise.clone(), self.function.theta()
        with torch.no_grad(), torch.autocast(theta.device.type, enabled=False):
            for index, (x, y) in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                x, y = self._step_batch((x, y))
                system = build_system(self.function, x, y, theta, self.solver, self.iterations)
                vectors = project(system, vectors)[0]  # in the noise's precision (float32 under bf16-true)
        self.epoch_noise.copy_(noise[0])
        self.carried.copy_(vectors[0])
        self.sample_noise.copy_(noise[1:])
        self.sample_kernel.copy_(vectors[1:])
        self.swept_at.copy_(self._fingerprint())

    def _step_batch(self, batch: Batch) -> Batch:
        if self._trainer is not None:  # as a step gets it: on the device, in the precision's dtype
            return cast(Batch, step_batch(self.trainer, batch, self.device))
        return cast(Batch, move_data_to_device(batch, self.device))  # a sweep called outside a Trainer

    def setup(self, stage: str) -> None:
        """Under DDP, each rank's own noise stream (``seed + rank``), seeded at the first set-up on that rank only: the
        test after a fit sets up again, and reseeding there gave its sweep other draws than a test of the fit's last
        checkpoint (which holds each rank's generator) did."""
        super().setup(stage)
        if self.trainer.world_size > 1 and self._seeded_rank != self.global_rank:  # independent noise on every rank
            self.generator.manual_seed(cast(AttributeDict, self.hparams).seed + self.global_rank)
            self._seeded_rank = self.global_rank

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._second_derivatives_checked = False  # every fit checks at its first step
        model = self.trainer.strategy.model
        strict_ddp = isinstance(model, DistributedDataParallel) and not model.find_unused_parameters
        if strict_ddp and any(self.phase_epochs[:2]):
            raise ValueError(
                f"VIKING with phase_epochs={self.phase_epochs} trains the network alone in the MLE phase and the "
                "scales alone in the warm-up, which DDP must be told: use strategy='ddp_find_unused_parameters_true' "
                "(or DDPStrategy(find_unused_parameters=True)), or phase_epochs=(0, 0, n)"
            )

    def on_train_start(self) -> None:
        """Warns when the Trainer's ``max_epochs`` or ``max_steps`` ends the fit before the phases do; a fit resumed
        on an epoch's last batch sweeps here (Lightning starts the next epoch without ``on_train_epoch_start``)."""
        super().on_train_start()
        if epoch_hooks_skipped(self.trainer):
            self.on_train_epoch_start()
        mle, warmup, elbo = self.phase_epochs
        length = fit_length(self.trainer)
        if length.epochs < mle + warmup + elbo and not length.smoke_run:
            rank_zero_warn(
                f"VIKING's phase_epochs={self.phase_epochs} need {mle + warmup + elbo} epochs but the Trainer stops "
                f"after {length.bound}: "
                + ("the fit ends before the ELBO phase, so theta_hat never trains as a posterior mean"
                   if length.epochs <= mle + warmup
                   else f"the ELBO phase gets {length.epochs - mle - warmup:.3g} of its {elbo} epochs")
            )

    def on_train_epoch_start(self) -> None:
        if self.phase() == 1:  # in the MLE phase the samples stay at theta_hat (zero noise)
            return
        first_elbo_epoch = sum(self.phase_epochs[:1])
        every = self.sweep_every_n_epochs
        if every and (self.current_epoch - first_elbo_epoch) % every == 0:
            self.sweep(side_pass(self.trainer.train_dataloader, self.current_epoch), self.trainer.num_training_batches)
        elif self.current_epoch == first_elbo_epoch:
            self.carried.copy_(self._randn(self.function.size))  # an unprojected start; the first step projects it

    # ----- training ----------------------------------------------------------------------------------------
    def _check_second_derivatives(self, x: Any, y: Tensor) -> None:
        """At a fit's first step: the ELBO phase's per-step projections (``gamma < 1``) need second derivatives of
        the network, which torch lacks for some operations; refuse before the first two phases run, not after (a fit
        that ends before the ELBO phase is not refused)."""
        self._second_derivatives_checked = True
        length = fit_length(self.trainer)  # a smoke run checks: the fit it stands for reaches the ELBO phase
        if self.gamma == 1 or self.phase_epochs[2] == 0 or (length.epochs <= sum(self.phase_epochs[:2])
                                                             and not length.smoke_run):
            return
        with modes_kept(self.backbone):  # the function runs the network in eval mode; the MLE phase in its own
            missing = missing_second_derivative(self.function, x, y, self.theta_hat())
        if missing is not None:
            raise ValueError(
                f"VIKING with gamma={self.gamma} differentiates each ELBO step's kernel projection with respect to "
                f"theta_hat, a second derivative of {type(self.backbone).__name__}, and torch has none for one of "
                f"its operations ({missing}). Replace that operation with a twice-differentiable one computing the "
                "same function (e.g. nn.Hardsigmoid by F.relu6(x + 3) / 6), or use gamma=1 (the epoch-start "
                "projections only)"
            )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        if not self._second_derivatives_checked:
            self._check_second_derivatives(x, y)
        phase = self.phase()
        if phase == 1:
            loss = self.likelihood.loss(self(x), y)
            self.log_training_loss(loss, len(y))
            return loss
        theta_hat = self.theta_hat() if phase == 3 else self.theta_hat().detach()
        dtype = theta_hat.dtype  # the noise buffers may be wider (WideBuffers)
        if self.gamma == 1:
            noise, kernel = self.epoch_noise[None].to(dtype), self.carried[None].to(dtype)
        else:
            noise = mix_noise(self.carried, self._randn(self.function.size), self.gamma)[None].to(dtype)
            kernel = project_to_kernel(theta_hat, noise, self.function, x, y, self.solver, self.iterations)
            self.carried.copy_(kernel.detach()[0])
        theta = self.family.sample(theta_hat, noise, kernel)[0]
        nll = self.likelihood.loss(self.function.outputs(theta, x), y)
        image_dim = image_dimension(noise, kernel)[0]
        logs_residual = self.gamma < 1 and self._writes_step_logs()
        residual = {"kernel_residual": self._residual(x, y, kernel)} if logs_residual else {}
        kl = self.family.kl(theta_hat, image_dim)
        beta = len(y) / self.training_set_size("kl_weight") if self.kl_weight == "elbo" else float(self.kl_weight)
        loss = nll + beta * kl / len(y)  # (sum NLL + beta KL) / B
        self.log_training_loss(
            loss, len(y), nll=nll, kl=kl, alpha=self.family.alpha, sigma_image=self.family.sigma_image,
            sigma_kernel=self.family.sigma_kernel, image_dim=image_dim, kernel_dim=self.function.size - image_dim,
            **residual,
        )
        return loss

    def _residual(self, x: Any, y: Tensor, kernel: Tensor) -> Tensor:
        """``||J_b k|| / ||k||`` for vectors ``k`` ``[1, P]`` on the batch ``(x, y)``, at the current ``theta_hat``."""
        kernel = kernel.detach().to(self.function.theta().dtype)
        with torch.no_grad(), torch.autocast(kernel.device.type, enabled=False):
            return self.function.constraint_jvp(x, y, kernel).norm() / kernel.norm().clamp_min(1e-30)

    # ----- the posterior -------------------------------------------------------------------------------
    def _ensure_posterior(self) -> None:
        """Re-sweep before test or predict when ``theta_hat`` has moved since the last sweep, over the training batches
        in their first epoch's order: a shuffled order would follow the trainer's epoch count, which a test after
        the fit and a test of its checkpoint do not share (their samples differed)."""
        if torch.equal(self.swept_at, self._fingerprint()) or (self._trainer is not None and self.trainer.training):
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            raise RuntimeError(
                "VIKING's posterior samples are stale (theta_hat changed since the last sweep) and no training data "
                "are attached: call module.sweep(train_loader) first"
            )
        loader = datamodule.train_dataloader()
        # the sweep covers what a training epoch covers
        self.sweep(side_pass(loader, epoch=0), limited_batches(len(loader), self.trainer.limit_train_batches))

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.trainer.state.fn != TrainerFn.FITTING:  # a fit validates with its epoch-start sweep
            self._ensure_posterior()

    def on_test_start(self) -> None:
        self._ensure_posterior()

    def on_predict_start(self) -> None:
        self._ensure_posterior()

    def samples(self, num_samples: int | None = None) -> Tensor:
        """Posterior samples ``theta_s``, ``[S, P]``."""
        return self._wide_samples(num_samples).to(self.function.theta().dtype)

    def _wide_samples(self, num_samples: int | None) -> Tensor:
        """``theta_s`` in the noise's precision, wider than ``theta_hat`` under bf16-true (a linearised predictive's
        ``theta_s - theta_hat`` in bf16 would lose most of a small perturbation)."""
        s = self.resolve_num_samples(num_samples)
        if s > self.sample_noise.shape[0]:
            raise ValueError(f"num_samples={s} exceeds the {self.sample_noise.shape[0]} projected samples")
        running = self._trainer is not None and self.trainer.state.status == TrainerStatus.RUNNING
        if not running and not torch.equal(self.swept_at, self._fingerprint()):
            rank_zero_warn(
                "VIKING's posterior samples were projected at other parameters than theta_hat now (the last sweep "
                "ran at an epoch start, or never): call module.sweep(train_loader) first for samples in its kernel"
            )
        with torch.no_grad():
            return self.family.sample(self.function.theta(), self.sample_noise[:s], self.sample_kernel[:s])

    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        wide, theta_hat = self._wide_samples(num_samples), self.function.theta()
        with torch.no_grad():
            if self.predictive_mode == "linearized":
                outputs, tangents = self.function.jvp(x, (wide - theta_hat).to(theta_hat.dtype), theta_hat)
                samples = outputs.unsqueeze(0) + tangents
            else:
                thetas = wide.to(theta_hat.dtype)
                samples = vmap(lambda t: self.function.outputs(t, x), chunk_size=self.function.chunk_size)(thetas)
        return self.likelihood.predictive(samples)

    def validation_step(  # type: ignore[override]  # Lightning passes any output to callbacks; STEP_OUTPUT is narrower
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> Predictive:
        x, y = batch
        residual = self._residual(x, y, self.sample_kernel[:1])
        self.log("val/kernel_residual", residual, batch_size=len(y), sync_dist=True)  # every rank's share
        return super().validation_step(batch, batch_idx, dataloader_idx)

    # ----- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rank 0's generator; under DDP also every rank's noise and generator (``viking_ranks``), gathered here
        because only rank 0 writes the file."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["viking_generator"] = self.generator.get_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            own = {name: getattr(self, name) for name in _RANK_NOISE}
            own["generator"] = self.generator.get_state().to(self.device)
            gathered = cast(dict[str, Tensor], self.all_gather(own))  # all_gather keeps the dict
            checkpoint["viking_ranks"] = [  # clones: a view would save every rank's storage
                {name: value[rank].cpu().clone() for name, value in gathered.items()}
                for rank in range(self.trainer.world_size)
            ]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's noise and generator when the checkpoint has them; otherwise rank 0 takes the saved
        generator and the other ranks keep their own seeds (``seed + rank``)."""
        super().on_load_checkpoint(checkpoint)
        rank = self.global_rank if self._trainer is not None else 0
        saved = checkpoint.get("viking_ranks", [])
        if rank < len(saved):
            checkpoint["state_dict"].update({name: saved[rank][name] for name in _RANK_NOISE})
            self.generator.set_state(saved[rank]["generator"])
        elif rank == 0 and "viking_generator" in checkpoint:
            self.generator.set_state(checkpoint["viking_generator"])
        self._fit_samples_to(checkpoint["state_dict"])

    def _fit_samples_to(self, state: dict[str, Tensor]) -> None:
        """A checkpoint of another ``num_samples``: its first ``num_samples`` samples; more than it holds are drawn
        and projected by the next sweep (test and predict sweep first)."""
        held = len(state["sample_noise"])
        for name in ("sample_noise", "sample_kernel"):
            state[name] = first_rows(state[name], self.num_samples)
        if held < self.num_samples:
            state["swept_at"] = torch.full_like(state["swept_at"], float("nan"))  # stale: sweep before use
