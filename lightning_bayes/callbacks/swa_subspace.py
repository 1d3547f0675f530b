"""``SWASubspace``: collects SWA / SWAG moments of a parameter subset during any LightningModule's training.

From a start (an epoch, or a fraction of the run) it adds a snapshot of the selected parameters every
``n`` epochs or optimiser steps to :class:`~lightning_bayes.inference.swag.SWAGMoments` (SWA mean,
diagonal second moment, last ``K`` deviations; float32, on the CPU by default). The moments go into the
Lightning checkpoint (``state_dict``), so a resumed run continues exactly; ``swa(pl_module)`` and
``sample(pl_module, ...)`` temporarily write the SWA mean or a SWAG draw into the selected parameters (and
optionally refresh BatchNorm statistics), restoring everything afterwards. A post-hoc
:class:`~lightning_bayes.modules.subspace_inference.SubspaceInference` reads the state from the checkpoint.

Distributed training: under DDP every rank holds the same parameters after each optimiser step, so every
rank collects the same snapshot locally (no communication, nothing counted twice) and rank 0's copy is the
one the checkpoint keeps. Under FSDP only the selected tensors are gathered: DTensor parameters (FSDP2,
``ModelParallelStrategy``) with ``full_tensor()`` one at a time, FSDP1 (``use_orig_params=True``, so that
the original parameter names exist) with ``summon_full_params(unit, recurse=False)`` for only the units that
own a selected parameter; the ``swa``/``sample`` contexts need unsharded parameters. Neither sharded path
runs in the test suite (CPU only). After a ``trainer.fit`` under ``ddp_spawn`` the callback in the main process
has collected nothing (the spawned processes did, and are gone): read the moments from the fit's checkpoint
(:class:`~lightning_bayes.modules.subspace_inference.SubspaceInference`). Reference: Maddox et al., NeurIPS 2019.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..batches import BatchLayout
from ..checks import is_int
from ..inference.batchnorm import batchnorm_statistics_kept, refresh_batchnorm, running_statistics
from ..inference.swag import SWAGMoments, default_swag_scale, learning_rate_factor, low_rank_part
from ..params import ParamSelector, is_dtensor, named_parameters, select_parameters
from ..skipped_epoch_hooks import epoch_hooks_skipped

if TYPE_CHECKING:
    from torch.distributed.fsdp import FullyShardedDataParallel


def _fsdp_units(trainer: Trainer | None) -> list[FullyShardedDataParallel]:
    root = getattr(getattr(trainer, "strategy", None), "model", None)
    if root is None or not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.fsdp_modules(root)


def _is_device_name(device: object) -> bool:
    """Whether ``torch.device`` reads ``device`` (a string such as ``"cpu"`` or ``"cuda:1"``)."""
    if not isinstance(device, str):
        return False
    try:
        torch.device(device)
    except RuntimeError:
        return False
    return True


def collector_states(callback_states: dict[str, Any]) -> dict[str, Any]:
    """The ``SWASubspace`` states among a checkpoint's ``"callbacks"`` (their keys start with the class name and go on
    with the collector's arguments; an earlier version's key is the bare name)."""
    return {key: state for key, state in callback_states.items() if key.startswith(SWASubspace.__name__)}


class SWASubspace(Callback):
    """Collect SWA/SWAG moments of ``params`` alongside training.

    Args:
        params: the parameter subset (``"trainable"``, ``"all"``, ``"last_layer"``, ``"lora"``, globs).
        start_epoch: first epoch (0-based) whose snapshots are collected.
        start_fraction: or start after this fraction of the run (of ``max_epochs`` when collecting per epoch,
            of the estimated optimiser steps when collecting per step). Default (neither given): 0.5.
        every_n_epochs: a snapshot at the end of every n-th epoch from the start (default 1), or
        every_n_steps: one after every n-th optimiser step from the start. Under manual optimisation (the module
            steps its optimisers itself, maybe several, maybe not every batch) steps are training batches, and a
            due snapshot is skipped when no optimiser has stepped since the last one (the same weights twice).
        max_rank: ``K``, the deviations kept (0: diagonal SWAG only).
        device: where the moments live: ``"cpu"`` (default) or ``None`` (the parameters' device).
        swa_lr_ratio: ``r = swa_lr / lr_init``: the callback then sets every optimiser's learning rate at each
            epoch's start to the reference schedule (:func:`~lightning_bayes.inference.swag.learning_rate_factor`
            of ``epoch / start`` times the initial rate: 1 to half the start epoch, linear down to ``r`` at 0.9 of
            it, ``r`` from then on, through collection); ``None`` (default) leaves the rate to the module.
        target_key: for dict batches given to :meth:`swa` / :meth:`sample` (BatchNorm refreshes): the input is every
            entry but ``batch[target_key]``; with neither key, the whole dict.
        input_key: for such dict batches, the input's key (the input is then ``batch[input_key]``, whatever
            ``target_key`` says).
    """

    def __init__(
        self,
        params: ParamSelector = "trainable",
        start_epoch: int | None = None,
        start_fraction: float | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        max_rank: int = 20,
        device: str | None = "cpu",
        swa_lr_ratio: float | None = None,
        target_key: str | None = None,
        input_key: str | None = None,
    ) -> None:
        super().__init__()
        self.layout = BatchLayout(target_key, input_key)
        if start_epoch is not None and start_fraction is not None:
            raise ValueError(f"give start_epoch or start_fraction, not both; got {start_epoch!r} and {start_fraction!r}")
        if start_epoch is not None and (not is_int(start_epoch) or start_epoch < 0):
            raise ValueError(f"start_epoch must be an int >= 0; got {start_epoch!r}")
        if start_fraction is not None and not (isinstance(start_fraction, (int, float)) and 0 <= start_fraction < 1):
            raise ValueError(f"start_fraction must be a number in [0, 1); got {start_fraction!r}")
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError(
                f"give every_n_epochs or every_n_steps, not both; got {every_n_epochs!r} and {every_n_steps!r}"
            )
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if swa_lr_ratio is not None and not (isinstance(swa_lr_ratio, (int, float)) and 0 < swa_lr_ratio <= 1):
            raise ValueError(f"swa_lr_ratio must be None or a number in (0, 1]; got {swa_lr_ratio!r}")
        if not is_int(max_rank) or max_rank < 0:
            raise ValueError(f"max_rank must be an int >= 0; got {max_rank!r}")
        if device is not None and not _is_device_name(device):
            raise ValueError(f"device must be a device name such as 'cpu' or 'cuda:0', or None; got {device!r}")
        self.params = params
        self.start_epoch = start_epoch
        self.start_fraction = 0.5 if start_epoch is None and start_fraction is None else start_fraction
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None or every_n_steps is not None else 1
        self.max_rank = max_rank
        self.device = device
        self.swa_lr_ratio = swa_lr_ratio
        self.names: list[str] = []
        self.moments: SWAGMoments | None = None
        self.last_step = -1  # optimisation step of the last snapshot (never two at one step)
        self.last_global_step = -1  # the Trainer's global_step then (no snapshot of unchanged weights)
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, loaded before setup
        self._module: weakref.ref[LightningModule] | None = None  # the module collected for (set up with)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_module": None}  # a weak reference does not pickle (ddp_spawn pickles callbacks)

    # ---- selection and gathering -----------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.every_n_steps is None:
            start = self._start_epoch(trainer)  # a fit without max_epochs is refused now, not at its first epoch's end
            if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= start:
                rank_zero_warn(
                    f"SWASubspace collects from epoch {start} on (start_epoch), but the Trainer stops after "
                    f"max_epochs={trainer.max_epochs}: this fit collects no snapshot (lower start_epoch or raise "
                    "max_epochs)"
                )
        if self.moments is not None and self._pending is None:
            if self._module is None or self._module() is pl_module:  # a further fit of the same module collects on
                if _optimisation_steps(trainer) == 0:  # a new Trainer counts from 0 again (a resumed fit's
                    self.last_step = self.last_global_step = -1  # state is applied after this hook)
                return  # (None: unpickled, as in a spawned process, where the module is a copy too)
            rank_zero_warn(  # not mixed into this module's: a fit resumed from a checkpoint replaces them anyway
                f"SWASubspace: this {type(pl_module).__name__} is not the module its {int(self.moments.count)} "
                "snapshots came from; they are dropped and this fit collects afresh (one instance collects one "
                "module's posterior: make one per module, e.g. inside a loop over seeds, to keep each)"
            )
            self.last_step = self.last_global_step = -1
        self._module = weakref.ref(pl_module)
        selected = select_parameters(pl_module, self.params)
        self.names = list(selected)
        with self._full_parameters(trainer, pl_module) as full:
            size = sum(full[name].numel() for name in self.names)
            wide = any(full[name].dtype == torch.float64 for name in self.names)
        # the parameters are cast after this hook: precision="64-true" makes them float64
        wide = wide or trainer.precision_plugin.convert_input(torch.zeros(())).dtype == torch.float64
        self.moments = SWAGMoments(size, self.max_rank, dtype=torch.float64 if wide else torch.float32)
        device = pl_module.device if self.device is None else torch.device(self.device)
        try:
            self.moments.to(device)
        except (RuntimeError, AssertionError) as error:  # e.g. "Found no NVIDIA driver", "Torch not compiled with CUDA"
            raise ValueError(
                f"SWASubspace(device={self.device!r}): that device is not available here ({error}); use 'cpu' or None "
                "(the parameters' device)"
            ) from error
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None

    @contextmanager
    def _full_parameters(self, trainer: Trainer | None, pl_module: LightningModule) -> Iterator[dict[str, Tensor]]:
        """Full (unsharded) values of the selected parameters, gathered tensor by tensor or unit by unit."""
        named = named_parameters(pl_module)
        wanted = {name: named[name] for name in self.names}
        units = _fsdp_units(trainer)
        if not units:
            yield {n: p.full_tensor() if is_dtensor(p) else p for n, p in wanted.items()}
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        by_id = {id(p): n for n, p in wanted.items()}
        with ExitStack() as stack:
            for unit in units:
                nested = {id(p) for sub in FullyShardedDataParallel.fsdp_modules(unit) if sub is not unit
                          for p in sub.parameters()}
                if any(id(p) in by_id and id(p) not in nested for p in unit.parameters()):
                    stack.enter_context(FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False))
            yield {n: p.detach().clone() for n, p in wanted.items()}  # copies: the gathered storage is freed on exit

    def _flat(self, trainer: Trainer | None, pl_module: LightningModule) -> Tensor:
        assert self.moments is not None  # set up: checked by _collect, the caller
        with self._full_parameters(trainer, pl_module) as full:
            return torch.cat([full[n].detach().reshape(-1).to(self.moments.mean) for n in self.names])

    # ---- the schedule ----------------------------------------------------------------------------

    def _start_epoch(self, trainer: Trainer) -> int:
        if self.start_epoch is not None:
            return self.start_epoch
        assert self.start_fraction is not None  # set whenever start_epoch is not
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError(
                f"SWASubspace(start_fraction={self.start_fraction}) with per-epoch collection needs a finite "
                f"trainer max_epochs; got {trainer.max_epochs!r} (or give start_epoch, or collect every_n_steps, "
                "which takes the fit's length from max_steps)"
            )
        return math.floor(self.start_fraction * trainer.max_epochs)

    def _start_step(self, trainer: Trainer) -> int:
        if self.start_epoch is not None:
            batches = trainer.num_training_batches
            if not math.isfinite(batches):
                raise ValueError("SWASubspace(start_epoch=...) with every_n_steps needs a sized training loader")
            return self.start_epoch * math.ceil(batches / trainer.accumulate_grad_batches)
        assert self.start_fraction is not None  # set whenever start_epoch is not
        optimisers, total = len(trainer.optimizers), trainer.estimated_stepping_batches
        if not trainer.lightning_module.automatic_optimization and trainer.max_steps != -1 and (
            optimisers > 1 or total == trainer.max_steps
        ):
            raise ValueError(
                f"SWASubspace(start_fraction={self.start_fraction}, every_n_steps={self.every_n_steps}) counts "
                f"training batches under manual optimisation, but max_steps={trainer.max_steps} counts every "
                f"optimiser's step() ({optimisers} optimiser{'s' if optimisers > 1 else ''} here, which the module "
                "may step less often than once a batch), so the fit's number of batches is not known in advance: "
                "give start_epoch, or bound the fit by max_epochs"
            )
        if not math.isfinite(total):
            raise ValueError(
                f"SWASubspace(start_fraction={self.start_fraction}) with every_n_steps needs a bounded fit (trainer "
                "max_steps, or max_epochs and a sized training loader); this one has no last step (or give start_epoch)"
            )
        return math.floor(self.start_fraction * total)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps is not None:
            self._start_step(trainer)  # a schedule it cannot place is refused before the first batch trains
        if epoch_hooks_skipped(trainer):  # resumed on an epoch's last batch: its end and this epoch's start
            self._epoch_end(trainer, pl_module, trainer.current_epoch - 1)
            self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``swa_lr_ratio``: this epoch's learning rates, ``learning_rate_factor(epoch / start)`` times each
        parameter group's initial rate (kept in the group as ``swag_initial_lr``, so in the optimiser's checkpoint)."""
        if self.swa_lr_ratio is None:
            return
        if trainer.lr_scheduler_configs:
            raise ValueError(
                f"SWASubspace(swa_lr_ratio={self.swa_lr_ratio}) sets the learning rate itself, but the module also "
                f"has a learning-rate scheduler ({type(trainer.lr_scheduler_configs[0].scheduler).__name__}): "
                "remove one of them"
            )
        if self.start_epoch is None and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise ValueError(
                f"SWASubspace(swa_lr_ratio={self.swa_lr_ratio}) schedules the learning rate by epoch, up to "
                f"start_epoch or start_fraction={self.start_fraction} of max_epochs; this Trainer has max_epochs="
                f"{trainer.max_epochs!r}: give start_epoch or a finite max_epochs"
            )
        start = self._start_epoch(trainer)
        factor = learning_rate_factor(trainer.current_epoch / start if start else math.inf, self.swa_lr_ratio)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("swag_initial_lr", group["lr"]) * factor

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps is None:
            return
        step, start = _optimisation_steps(trainer), self._start_step(trainer)
        if step > start and (step - start) % self.every_n_steps == 0 and self._weights_moved(trainer):
            self._collect(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end(trainer, pl_module, trainer.current_epoch)

    def _epoch_end(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """The snapshot due at the end of ``epoch`` (0-based), when collecting per epoch."""
        if self.every_n_steps is not None:
            return
        assert self.every_n_epochs is not None  # set whenever every_n_steps is not
        start = self._start_epoch(trainer)
        due = epoch >= start and (epoch - start) % self.every_n_epochs == 0
        if due and self._weights_moved(trainer):
            self._collect(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Say so when training ended before the first snapshot (a posterior from this run would have nothing)."""
        if self.moments is None or int(self.moments.count) > 0 or trainer.sanity_checking:
            return
        if self.every_n_steps is None:
            ended = f"after {trainer.current_epoch} epochs"
            first = f"at the end of epoch {self._start_epoch(trainer)} (0-based)"
        else:
            ended, first = f"at step {_optimisation_steps(trainer)}", f"after step {self._start_step(trainer)}"
        rank_zero_warn(
            f"SWASubspace collected no snapshot: training ended {ended}, and the first is taken {first} "
            f"(start_epoch={self.start_epoch}, start_fraction={self.start_fraction}); train longer or start earlier"
        )

    def _weights_moved(self, trainer: Trainer) -> bool:
        """Whether this is a later step than the last snapshot's, and an optimiser has stepped since it (and at all):
        under manual optimisation a batch that steps none leaves the weights of the last snapshot (or the initial)."""
        global_step = trainer.global_step
        return _optimisation_steps(trainer) != self.last_step and global_step not in (0, self.last_global_step)

    def _collect(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.moments is None:
            raise RuntimeError("SWASubspace: setup('fit') has not run; attach the callback to the Trainer")
        self.moments.update(self._flat(trainer, pl_module))
        self.last_step, self.last_global_step = _optimisation_steps(trainer), trainer.global_step
        pl_module.log("swa/snapshots", float(self.moments.count), on_step=False, on_epoch=True, batch_size=1)

    # ---- checkpointing ---------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """Unique per set-up, as ``ModelCheckpoint``'s, so that several collectors (SWA and SWAG, other subsets)
        share a Trainer."""
        return self._generate_state_key(
            params=self.params,
            start_epoch=self.start_epoch,
            start_fraction=self.start_fraction,
            every_n_epochs=self.every_n_epochs,
            every_n_steps=self.every_n_steps,
            max_rank=self.max_rank,
        )

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """The Trainer's only collector takes a checkpoint's only ``SWASubspace`` state under another key (saved by
        an earlier version as ``"SWASubspace"``, or with other arguments, which :meth:`load_state_dict` then
        checks), rather than leaving the collected moments behind."""
        states = checkpoint.get("callbacks") or {}
        theirs = list(collector_states(states))
        mine = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, SWASubspace)]  # Lightning sets callbacks
        if self.state_key not in states and len(theirs) == 1 and len(mine) == 1:
            states[self.state_key] = states[theirs[0]]

    def state_dict(self) -> dict[str, Any]:
        if self.moments is None:
            return {}
        return {
            "names": list(self.names),
            "max_rank": self.max_rank,
            "last_step": self.last_step,
            "last_global_step": self.last_global_step,
            "moments": {k: v.detach().cpu().clone() for k, v in self.moments.state_dict().items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint's moments: applied at once after ``setup('fit')`` (a resumed fit); otherwise kept for it and
        usable at once (``trainer.test(ckpt_path=...)`` restores callbacks after a ``setup('test')``, which selects
        nothing), on the CPU, with the checkpoint's selection."""
        if not state_dict:
            return
        if self.moments is not None and self._pending is None:
            self._apply_state(state_dict)
            return
        self._pending = state_dict
        mean = state_dict["moments"]["mean"]
        self.names = list(state_dict["names"])
        self.moments = SWAGMoments(mean.numel(), self.max_rank, dtype=mean.dtype)
        self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state["max_rank"] != self.max_rank:
            raise ValueError(
                f"SWASubspace checkpoint state keeps max_rank={state['max_rank']} deviations; this callback has "
                f"max_rank={self.max_rank}: expected the same"
            )
        if state["names"] != self.names:
            raise ValueError(
                f"SWASubspace checkpoint state covers {len(state['names'])} tensors; this callback selects "
                f"{len(self.names)} (params={self.params!r}): expected the same selection"
            )
        assert self.moments is not None  # set up, or built from the state by load_state_dict
        self.moments.load_state_dict(state["moments"])
        self.last_step = int(state["last_step"])
        self.last_global_step = int(state.get("last_global_step", state["last_step"]))  # older: automatic only

    # ---- using the moments -----------------------------------------------------------------------

    @contextmanager
    def _written(self, pl_module: LightningModule, flat: Tensor, batches: Iterable[Any] | None) -> Iterator[None]:
        named = named_parameters(pl_module)
        params = [named[n] for n in self.names]
        if any(is_dtensor(p) for p in params) or _fsdp_units(getattr(pl_module, "_trainer", None)):
            raise NotImplementedError("SWASubspace.swa()/sample() write into unsharded parameters only (not FSDP)")
        saved = [p.detach().clone() for p in params]
        with batchnorm_statistics_kept(pl_module):
            try:
                with torch.no_grad():
                    for p, value in zip(params, flat.split([p.numel() for p in params])):
                        p.copy_(value.view_as(p))
                if batches is not None:
                    refresh_batchnorm(pl_module, batches, pl_module.device, self.layout)
                elif running_statistics(pl_module):
                    rank_zero_warn(
                        "SWASubspace: without batches the BatchNorm layers keep the statistics of the last training "
                        "iterate, not of the weights written; pass batches=<the training loader> to recompute them"
                    )
                yield
            finally:
                with torch.no_grad():
                    for p, value in zip(params, saved):
                        p.copy_(value)

    def _require_moments(self) -> SWAGMoments:
        if self.moments is None or int(self.moments.count) == 0:
            raise ValueError(
                "SWASubspace has collected no snapshot yet; train past the start of collection first (after a fit "
                "under ddp_spawn the spawned processes collected them: read them from the fit's checkpoint)"
            )
        return self.moments

    @contextmanager
    def swa(self, pl_module: LightningModule, batches: Iterable[Any] | None = None) -> Iterator[None]:
        """Inside, the selected parameters hold the SWA mean; with ``batches`` (``x``, ``(x, y)`` or dicts), BatchNorm
        statistics are recomputed by ``pl_module(x)`` passes (and restored on exit)."""
        moments = self._require_moments()
        with self._written(pl_module, moments.mean, batches):
            yield

    @contextmanager
    def sample(
        self,
        pl_module: LightningModule,
        scale: float | None = None,
        generator: torch.Generator | None = None,
        batches: Iterable[Any] | None = None,
    ) -> Iterator[None]:
        """Inside, the selected parameters hold one SWAG draw at ``scale`` (``None``: 0.5, or 1 for SWAG-diag when
        ``max_rank=0``; BatchNorm refreshed from ``batches``)."""
        moments = self._require_moments()
        scale = default_swag_scale(moments) if scale is None else scale
        low_rank = low_rank_part(moments, scale, "SWASubspace.sample")
        draw = moments.sample(scale, generator=generator, low_rank=low_rank)
        with self._written(pl_module, draw, batches):
            yield


def _optimisation_steps(trainer: Trainer) -> int:
    """Optimisation steps so far, in the units of ``every_n_steps`` and ``estimated_stepping_batches``:
    ``global_step`` under automatic optimisation; the training batches under manual optimisation, where
    ``global_step`` counts every optimiser's ``step()`` (two a batch with two optimisers)."""
    if trainer.lightning_module.automatic_optimization:
        return trainer.global_step
    progress = trainer.fit_loop.epoch_loop.batch_progress.total
    return int(progress.processed)  # type: ignore[attr-defined]  # a _ProcessedTracker
