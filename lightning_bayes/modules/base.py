"""``BayesianModule``: what every method's LightningModule shares.

It owns the likelihood and the optimiser factory, evaluates validation and test batches through
``predictive`` (returning the Predictive so callbacks such as ``CalibrationMetrics`` reuse it instead
of recomputing), stops with a clear error on a non-finite training loss, shards itself with FSDP2
under Lightning's ``ModelParallelStrategy`` where the method supports sharded parameters, refuses FSDP1 on several
processes where it would compute on one shard, and lets DDP wrap a fit that takes no gradient (sampling or a search
over a frozen model).
"""

from __future__ import annotations

import io
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Union

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler

from ..checks import held, is_int
from ..datamodules.epoch_loader import forget_finished_passes, loader_samplers
from ..datamodules.sampler_padding import real_examples, stage_loaders
from ..inference.likelihoods import Likelihood, as_likelihood
from ..models.vocabulary import vocabulary_fingerprint
from ..modes import evaluated_in_eval_mode
from ..predictive import CategoricalPredictive, Predictive
from .lightning_notices import EndQuietOnException, end_quiet, quiet_eval_mode_notice, quiet_no_optimizer_notice
from .fit_length import fit_length
from .random_stream import global_rng_states, restore_rng_states

Batch = tuple[Any, Tensor]


_ANOTHER_METHOD = re.compile(  # Lightning's message for a checkpoint's class outside the loading class's subclasses
    r"The class '(?P<saved>[\w.]+)' requested by the checkpoint does not resolve to an already imported subclass of"
)


def _shortened(message: str, shown: int = 5) -> str:
    """torch's ``load_state_dict`` error with each list of keys cut to its first ``shown`` names and its size
    mismatches to the first ``shown`` (a LoRA model's were 200 names, 17 KB)."""
    lines, mismatches = [], [line for line in message.splitlines() if line.strip().startswith("size mismatch")]
    for line in message.splitlines():
        keys = re.match(r'(\s*(?:Missing|Unexpected) key\(s\) in state_dict: )(.*)', line)
        if keys:
            names = re.findall(r'"([^"]*)"', keys[2])
            more = f", ... ({len(names)} in all)" if len(names) > shown else ""
            lines.append(keys[1] + ", ".join(f'"{n}"' for n in names[:shown]) + more)
        elif not line.strip().startswith("size mismatch") or line in mismatches[:shown]:
            lines.append(line)
    if len(mismatches) > shown:
        lines.append(f"\t... ({len(mismatches)} size mismatches in all)")
    return "\n".join(lines)


def _with_hyperparameter(path: Any, key: str, name: str, value: Any, weights_only: bool | None) -> io.BytesIO:
    """The checkpoint at ``path`` with its hyperparameter ``name`` set to ``value``, as an in-memory file for
    ``load_from_checkpoint`` (whose loader takes ``checkpoint=`` as its own argument's name)."""
    loaded = torch.load(path, map_location="cpu", weights_only=weights_only)
    loaded.setdefault(key, {})[name] = value
    buffer = io.BytesIO()
    torch.save(loaded, buffer)
    buffer.seek(0)
    return buffer


class BayesianModule(LightningModule, ABC):
    """Base class: subclasses implement ``training_step`` and ``predictive``.

    Args:
        likelihood: ``"categorical"``, ``"gaussian"``, a :class:`Likelihood` instance, or ``None`` for a
            method whose layers own their observation model (VBLL heads, ensemble members).
        optimizer: factory ``params -> Optimizer`` (LightningCLI: ``class_path: torch.optim.AdamW``).
        lr_scheduler: optional factory ``optimizer -> LRScheduler``, stepped every epoch.
        num_samples: predictive samples used at validation and test.

    ``supports_sharding``: whether the method works on FSDP2's sharded (DTensor) parameters; methods whose
    posterior computations take whole parameters through ``torch.func`` (Jacobians, vmapped members) do not.
    ``supports_fsdp1``: whether it is right under FSDP1 (``FSDPStrategy``) on several processes, where a wrapped
    unit's parameters are flat shards outside that unit's forward: a KL, a posterior sample or an optimiser's noise
    taken there sees one shard (measured on two CPU ranks: variational inference's KL gradient scaled down, IVON's
    posterior 10-30% off the one-process run). Only point estimates declare it.
    """

    supports_sharding: ClassVar[bool] = False
    supports_fsdp1: ClassVar[bool] = False
    owns_likelihood: ClassVar[bool] = False  # its layers or members hold the observation model (likelihood=None)

    def __init__(
        self,
        likelihood: Union[str, Likelihood, None] = "categorical",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_samples: int = 1,
    ) -> None:
        super().__init__()
        if not is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}")
        if not callable(optimizer):  # a str failed at the fit's start: "'str' object is not callable"
            raise TypeError(
                "optimizer must be a callable taking the parameters (e.g. torch.optim.Adam, or "
                f"functools.partial(torch.optim.AdamW, lr=1e-3)); got {optimizer!r}"
            )
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(
                "lr_scheduler must be None or a callable taking the optimiser (e.g. "
                f"functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=10)); got {lr_scheduler!r}"
            )
        if likelihood is not None or not self.owns_likelihood:
            self.likelihood = as_likelihood(likelihood)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.num_samples = num_samples
        self._before_validation: dict[str, Any] | None = None  # the global generators' states while a fit validates
        self._resumed_rng_states: dict[str, Any] | None = None  # the loaded checkpoint's, until training starts
        self._validated_rng_states: dict[str, Any] | None = None  # a validated checkpoint's, until validation starts
        self._resumed_at_validation = False  # that checkpoint was saved as a fit's validation ended
        self._quiet: list[tuple[object, ...]] = []  # warning filters of Lightning's notices: .lightning_notices

    @_restricted_classmethod  # as Lightning's: not on an instance (it would not load in place)
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``; a command-line checkpoint of another method is named as such (Lightning
        reports it as a class "blocked to prevent arbitrary code execution", to be imported first). A post-hoc
        method's ``checkpoint=`` (the network it started from, e.g. ``None`` where that file is gone: the fitted
        checkpoint holds the weights) is taken too, though Lightning's loader uses the name for its own argument."""
        source = checkpoint_path
        if "checkpoint" in kwargs:
            source = _with_hyperparameter(checkpoint_path, cls.CHECKPOINT_HYPER_PARAMS_KEY, "checkpoint",
                                          kwargs.pop("checkpoint"), kwargs.get("weights_only"))
        try:
            return super().load_from_checkpoint(source, *args, **kwargs)
        except FileNotFoundError as error:  # the network a post-hoc method started from (models.weights' message)
            if not str(error).startswith("checkpoint="):
                raise
            raise FileNotFoundError(
                f"{error}; or, as {str(checkpoint_path)!r} is a fitted {cls.__name__} holding the weights, load it "
                "with checkpoint=None"
            ) from None
        except ValueError as error:
            found = _ANOTHER_METHOD.match(str(error))
            if found is None:
                raise
            saved = found["saved"].rpartition(".")[2]
            raise ValueError(
                f"{str(checkpoint_path)!r} is a checkpoint of {found['saved']}, not of {cls.__name__}: load it with "
                f"{saved}.load_from_checkpoint, or give it to a post-hoc method's checkpoint argument"
            ) from None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every class's own ``predictive`` runs in eval mode (:func:`~lightning_bayes.modes.evaluated_in_eval_mode`;
        MC dropout turns its dropout on itself) and leaves the modes as they were: after ``trainer.fit`` the module is
        in train mode, where a direct call used batch statistics (a ResNet's probabilities 0.37 off) and overwrote
        the running ones."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("predictive")
        if own is not None and not getattr(own, "__isabstractmethod__", False):
            cls.predictive = evaluated_in_eval_mode(own)  # type: ignore[method-assign]

    @abstractmethod
    def predictive(self, x: Any, num_samples: int | None = None) -> Predictive:
        """Posterior predictive for inputs ``x``, with the network in eval mode."""

    def unfitted_refusal(self) -> str | None:
        """Why this module, as built (not fitted, no checkpoint loaded), cannot score data; ``None`` when it can (by
        default: with the weights it was initialised with)."""
        return None

    def resolve_num_samples(self, num_samples: int | None) -> int:
        """``num_samples`` if given, else the module's default; must be a positive integer."""
        n = self.num_samples if num_samples is None else num_samples
        if not is_int(n) or n < 1:
            raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}")
        return n

    def training_set_size(self, argument: str = "dataset_size") -> int:
        """N for a KL weight ``1/N``: the datamodule's ``num_train``, else the length of the training loader's
        dataset; a clear error naming ``argument`` (the method's explicit way to give N) when neither exists."""
        trainer = self._trainer
        size = getattr(getattr(trainer, "datamodule", None), "num_train", None)
        if isinstance(size, int):
            return size
        dataset: Any = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)  # len() tells if sized
        try:
            return len(dataset)
        except TypeError as error:
            raise ValueError(
                f"{type(self).__name__} needs the training-set size N: pass {argument}=N, or fit with a datamodule "
                "that has num_train or a training loader over a sized dataset"
            ) from error

    def sharding_units(self) -> list[nn.Module]:
        """The FSDP2 units, innermost first: by default each child of this module that holds parameters (the
        backbone as one unit: a layer whose parameters are used outside its own ``forward``, such as a variational
        layer's, must not be a unit of its own). Override for finer units, e.g. one per transformer block."""
        return [child for child in self.children() if any(True for _ in child.parameters())]

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy``: ``fully_shard`` each of :meth:`sharding_units` over
        the data-parallel mesh; under any other strategy nothing happens."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        if not self.supports_sharding:
            raise ValueError(
                f"{type(self).__name__} does not support sharded (FSDP2) parameters, so not strategy "
                "ModelParallelStrategy: its posterior computations take whole parameters; use strategy 'ddp'"
            )
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"{type(self).__name__}.configure_model shards data-parallel only; got a tensor-parallel size of "
                f"{mesh['tensor_parallel'].size()} (set tensor_parallel_size=1, or override configure_model)"
            )
        from torch.distributed.fsdp import fully_shard

        data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
        for unit in self.sharding_units():
            fully_shard(unit, mesh=data_parallel)
        self._sharded = True

    def setup(self, stage: str) -> None:
        """A fit that takes no gradient (sampling or a search over a frozen model) under DDP: DDP refuses to wrap a
        module without a trainable parameter, so the frozen ones count as trainable while the fit runs (its steps
        return no loss, so nothing differentiates them) and are frozen again in :meth:`teardown`. Refuses FSDP1 on
        several processes unless the method ``supports_fsdp1``. Subclasses that override ``setup`` call this one."""
        self._validated_rng_states = None  # a checkpoint this stage loads (after set-up) sets them again
        if self._trainer is not None:
            self._refuse_multi_process_fsdp1()
            self._refuse_another_tokenizer()
        parameters = list(self.parameters())
        ddp = self._trainer is not None and isinstance(self.trainer.strategy, DDPStrategy)
        if stage == "fit" and ddp and not any(p.requires_grad for p in parameters):
            self._frozen_during_fit: list[nn.Parameter] = parameters
            for parameter in parameters:
                parameter.requires_grad_(True)

    def _refuse_another_tokenizer(self) -> None:
        """A datamodule whose tokenizer is not the network's (another vocabulary: its ids index other tokens'
        embeddings) is refused; training on such inputs ran without an error."""
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if not callable(getattr(tokenizer, "get_vocab", None)):
            return
        given = vocabulary_fingerprint(tokenizer)
        for network in self.modules():
            if isinstance(getattr(network, "vocabulary", None), str) and network.vocabulary != given:
                source = getattr(network, "tokenizer_source", "?")
                name = getattr(datamodule, "tokenizer_name", getattr(tokenizer, "name_or_path", "?"))
                raise ValueError(
                    f"the datamodule's tokenizer {name!r} is not the tokenizer of {type(network).__name__}'s model "
                    f"{source!r} (their vocabularies differ): give the datamodule the network's tokenizer, e.g. "
                    f"--data.init_args.tokenizer {source}"
                )

    def takes_optimizer_steps(self) -> bool:
        """Whether a fit steps an optimiser; a fit that only passes over the data (a sweep, a search, a sampler)
        does not: it gets no optimiser, and each of its batches counts as a step of Lightning's ``global_step``
        (:meth:`on_train_batch_start`)."""
        return True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A fit without optimiser steps counts its batches in ``global_step``, which Lightning's ``ModelCheckpoint``
        needs to move before it saves again: a sweep's or a chain's epochs were never checkpointed (only at the end
        of the fit), so a stopped run had nothing to resume from. Counted as the batch starts, as an optimiser step
        inside ``training_step`` would be, so that a checkpoint the callbacks save after batch ``k`` says step ``k``.
        Subclasses that override it call it. A batch that is not an ``(x, y)`` pair is refused here
        (:meth:`_check_pair`)."""
        self._check_pair(batch)
        if not self.takes_optimizer_steps():
            progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            progress.increment_ready()
            progress.increment_completed()

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_pair(batch)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_pair(batch)

    def _check_pair(self, batch: Any) -> None:
        """Training, validation and test batches are ``(x, y)`` pairs (``x`` a tensor or a dict of them, e.g. a
        tokenizer's): another structure is refused by name (a dict unpacked to its keys gave ``'str' object has no
        attribute ...`` inside the network, a triple "too many values to unpack"). Checked at the loops' batch hooks,
        not in ``on_after_batch_transfer``, through which Lightning also passes single inputs (the model summary's
        ``example_input_array``, ``to_torchscript``)."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return
        got = (f"a dict with keys {held(batch)}" if isinstance(batch, Mapping)
               else f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list))
               else f"a {type(batch).__name__}")
        raise ValueError(
            f"{type(self).__name__} expects batches (x, y) (x a tensor or a dict of tensors, y the targets); got "
            f"{got}: give the loader a collate_fn that returns (x, y)"
        )

    def _refuse_a_step_budget_without_steps(self) -> None:
        """A fit without optimiser steps passes over the data in whole epochs (each batch a step): a ``max_steps``
        that ends the fit inside an epoch would stop one part-way (``fast_dev_run=N`` is one epoch of N or fewer)."""
        max_steps, batches = self.trainer.max_steps, self.trainer.num_training_batches
        if max_steps in (None, -1) or self.takes_optimizer_steps():
            return
        name = type(self).__name__
        if not math.isfinite(batches):
            raise ValueError(
                f"{name} takes no optimiser steps (its fit passes over the training data in whole epochs), and the "
                f"training loader has no length, so max_steps={max_steps} would stop it inside its pass: leave "
                "max_steps at -1 and bound the pass with --trainer.limit_train_batches N"
            )
        epochs = fit_length(self.trainer, steps_per_batch=True).epochs  # max_epochs may end it first (fast_dev_run)
        if epochs != int(epochs):
            raise ValueError(
                f"{name} takes no optimiser steps (its fit passes over the training data in whole epochs, each batch "
                f"counting as a step), so max_steps={max_steps} would stop it inside an epoch of {batches} batches: "
                "bound the fit by max_epochs (--trainer.max_epochs N) and leave max_steps at -1, or give a multiple "
                f"of {batches}"
            )

    def _refuse_multi_process_fsdp1(self) -> None:
        processes = self.trainer.world_size
        if isinstance(self.trainer.strategy, FSDPStrategy) and processes > 1 and not self.supports_fsdp1:
            alternative = "Lightning's ModelParallelStrategy (FSDP2) or 'ddp'" if self.supports_sharding else "'ddp'"
            raise ValueError(
                f"{type(self).__name__} does not support FSDP1 (strategy 'fsdp', FSDPStrategy) on {processes} "
                "processes: outside a wrapped unit's forward its parameters are flat shards, and the posterior's "
                f"terms read there (a KL, a sample, an optimiser's noise) would see one shard; use {alternative}"
            )

    def teardown(self, stage: str) -> None:
        self.end_quiet_notices()  # a fit whose loop never started (e.g. max_epochs=0)
        for parameter in getattr(self, "_frozen_during_fit", ()):
            parameter.requires_grad_(False)
        self._frozen_during_fit = []

    def batches_done_at_resume(self) -> int:
        """Batches of the current epoch done before this fit started: > 0 only when it resumed from a checkpoint
        saved inside an epoch (not one written as an epoch cut short ended, which Lightning counts as done)."""
        started = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        cut_short = getattr(self.trainer.fit_loop, "resumed_on_epoch_end", False)  # Lightning 2.5 and later
        return started if 0 < started < self.trainer.num_training_batches and not cut_short else 0

    def _warn_of_an_epoch_cut_short(self) -> None:
        """A fit counted in epochs resumed from a checkpoint written as an epoch ended early (its fit stopped by
        ``max_steps``, ``max_time`` or a callback): Lightning counts that epoch done and goes on with the next."""
        loop, batches = self.trainer.fit_loop, self.trainer.num_training_batches
        done = loop.epoch_loop.batch_progress.current.ready
        if getattr(loop, "resumed_on_epoch_end", False) and 0 < done < batches:  # Lightning 2.5 and later
            rank_zero_warn(
                f"{type(self).__name__} resumes from a checkpoint written as epoch {self.current_epoch - 1} ended "
                f"after {done} of its {batches} batches (its fit was stopped by max_steps, max_time or a callback): "
                f"Lightning counts that epoch done, so its other {batches - done} batches are not trained; to go on "
                "inside it, bound the resumed fit by max_steps"
            )

    def refuse_dropped_examples(self, reason: str) -> None:
        """A clear error when the training loader drops its last batch (``drop_last``) for a method that needs every
        example: ``reason`` completes "{Method} ..." with why."""
        if getattr(self.trainer.train_dataloader, "drop_last", False):
            raise ValueError(
                f"{type(self).__name__} {reason}; the training loader drops its last batch: set the datamodule's "
                "drop_last=False (LightningCLI: --data.drop_last false)"
            )

    def refuse_shuffled_batches(self, reason: str) -> None:
        """A clear error when the training loader shuffles (a random sampler, or the ``DistributedSampler`` Lightning
        puts in its place) for a method whose passes must see the same batches in the same order: ``reason``
        completes "{Method} ..." with why."""
        samplers = loader_samplers(self.trainer.train_dataloader)
        random = (RandomSampler, StatefulRandomSampler, SubsetRandomSampler, WeightedRandomSampler)
        distributed = any(isinstance(s, DistributedSampler) and s.shuffle for s in samplers)
        if distributed or any(isinstance(s, random) for s in samplers):
            where = (  # Lightning's, put in a loader without a DistributedSampler of its own
                " (under DDP Lightning gives a training loader without a DistributedSampler a shuffling one; the "
                "library's datamodules bring an unshuffled one with shuffle=False, a loader of yours needs "
                "sampler=DistributedSampler(dataset, shuffle=False))" if distributed else ""
            )
            raise ValueError(
                f"{type(self).__name__} {reason}; the training loader shuffles: set the datamodule's shuffle=False "
                f"(LightningCLI: --data.shuffle false){where}"
            )

    def on_fit_start(self) -> None:
        """A resumed fit: the global generators again as saved, undoing what the set-up drew after the checkpoint
        was loaded (e.g. an optimiser drawing its seed when it is built), before the training loader's iterator
        draws its seed, as the unstopped run's did after that checkpoint. Lightning's notice of modules in eval mode
        is quieted until the fit loop starts when they are the ones this module keeps there (frozen features, a
        post-hoc method's network: :mod:`.lightning_notices`). Subclasses that override it call it."""
        if self._resumed_rng_states is not None:
            restore_rng_states(self._resumed_rng_states)
        self.end_quiet_notices()  # configure_optimizers' (Lightning's check has run)
        entry = quiet_eval_mode_notice(self)
        if entry is not None:
            self._quiet.append(entry)

    def configure_callbacks(self) -> list[Callback]:
        """:class:`~.lightning_notices.EndQuietOnException`, which ends the notices' quiet when a fit fails.
        Subclasses that override it return it too. None where the trainer has one already (a test after a fit), which
        Lightning would replace with a notice."""
        if any(isinstance(c, EndQuietOnException) for c in getattr(self._trainer, "callbacks", [])):
            return []
        return [EndQuietOnException()]

    def end_quiet_notices(self) -> None:
        """Removes the filters by which :meth:`configure_optimizers` and :meth:`on_fit_start` quieted Lightning's
        notices (if they did)."""
        end_quiet(self._quiet)

    def on_train_start(self) -> None:
        """A fit resumed from a checkpoint saved inside an epoch, or as a validation after its last batch ended: the
        global generators again as saved (a loader draws its workers' seed from them when Lightning creates its
        iterator, which the unstopped run did at the epoch's start); and a warning if the loader has no
        ``state_dict``: Lightning restarts it from its first batch, so the rest of that epoch repeats its first
        batches. Refuses a ``max_steps`` that would stop a fit without optimiser steps inside an epoch. Subclasses
        that override it call it."""
        self.end_quiet_notices()  # Lightning's check has run
        self._refuse_a_step_budget_without_steps()
        self._warn_of_an_epoch_cut_short()
        started, batches = self.batches_done_at_resume(), self.trainer.num_training_batches
        # also from a validation's checkpoint after an epoch's last batch, before the epoch ended: Lightning has made
        # an iterator for that finished epoch, drawing from the generators
        if (started or self._resumed_at_validation) and self._resumed_rng_states is not None:
            restore_rng_states(self._resumed_rng_states)
        self._resumed_rng_states, self._resumed_at_validation = None, False
        if started and not callable(getattr(self.trainer.train_dataloader, "state_dict", None)):
            rank_zero_warn(
                f"{type(self).__name__} resumes from a checkpoint saved inside an epoch (after batch {started} of "
                f"{batches}); Lightning restarts the training loader from its first batch, so this epoch's remaining "
                f"{batches - started} steps see batches 0 to {batches - started - 1}, not the unstopped run's: save "
                "checkpoints at epoch ends (ModelCheckpoint's default) to resume exactly"
            )

    # ----- the global random stream (dropout, weight noise) -------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The global generators' states: a fit resumed from this checkpoint draws what the unstopped one would.
        A checkpoint saved as a fit's validation ends (``ModelCheckpoint`` saves before this module's
        ``on_validation_end`` runs) keeps the states before validation, the ones training goes on from."""
        checkpoint["rng_states"] = self._before_validation or global_rng_states()
        checkpoint["rng_states_before_validation"] = self._before_validation is not None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        forget_finished_passes(checkpoint)
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
            function = self.trainer.state.fn if self._trainer is not None else None
            if function == TrainerFn.FITTING:
                # a resumed fit's, not a test's of this checkpoint: a fit after such a test starts afresh
                self._resumed_rng_states = checkpoint["rng_states"]
                self._resumed_at_validation = bool(checkpoint.get("rng_states_before_validation", False))
            elif function == TrainerFn.VALIDATING:
                self._validated_rng_states = checkpoint["rng_states"]  # see on_validation_start

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; when the checkpoint's tensors do not fit this module, the error says that
        the network comes from the constructor (the config), not from the checkpoint."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            if not str(error).startswith("Error(s) in loading state_dict"):
                raise
            raise RuntimeError(
                f"{_shortened(str(error))}\nThe checkpoint was saved from another network or method settings than this "
                f"{type(self).__name__}'s: the network is built from the constructor's arguments (the config's "
                "model.init_args), not read from the checkpoint; build it as the checkpoint's run did (on the command "
                "line: --config <its run folder>/config.yaml)"
            ) from None

    def on_validation_start(self) -> None:
        """Validation inside a fit (the sanity check included) leaves the global generators as it found them, so the
        training stream does not depend on when validation runs: a fit resumed from a checkpoint saved on an epoch's
        last batch skips that epoch's validation (Lightning restarts after it), and a resumed run's sanity check is
        extra; either would otherwise shift every later dropout mask or weight draw. A ``validate`` of a checkpoint
        starts from the checkpoint's states again (its loader's iterator drew its seed since they were restored):
        those a fit's validation started from when that epoch validated (a checkpoint saved as the epoch or its
        validation ended), so a sampling method scores the checkpoint as the fit did."""
        self._before_validation = global_rng_states() if self.trainer.state.fn == TrainerFn.FITTING else None
        validated, self._validated_rng_states = self._validated_rng_states, None
        if validated is not None and self.trainer.state.fn == TrainerFn.VALIDATING:
            restore_rng_states(validated)

    def on_validation_end(self) -> None:
        if self._before_validation is not None:
            restore_rng_states(self._before_validation)
        self._before_validation = self._validated_rng_states = None

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: every trainable parameter, the likelihood's apart (see
        :meth:`without_decay_for`); methods split further."""
        return self.without_decay_for([p for p in self.parameters() if p.requires_grad])

    def without_decay_for(self, parameters: Sequence[Tensor], exempt: Iterable[object] = ()) -> list[dict[str, Any]]:
        """``parameters`` as two groups: the optimiser's, and a group without weight decay of those in ``exempt`` and,
        when the optimiser decays weights, of every likelihood's (a Gaussian's noise, a deep ensemble's members' too:
        decay pulled it towards ``softplus(0) = 0.69``, 7% wider at AdamW's 0.1 on a clean linear fit). An optimiser
        without decay keeps one group (as checkpoints from before this split hold; LBFGS takes no groups)."""
        ids = {id(p) for p in exempt}
        if self._optimiser_decays():
            ids |= {id(p) for m in self.modules() if isinstance(m, Likelihood) for p in m.parameters()}
        return [
            {"params": [p for p in parameters if id(p) not in ids]},
            {"params": [p for p in parameters if id(p) in ids], "weight_decay": 0.0},
        ]

    def _optimiser_decays(self) -> bool:
        """Whether ``optimizer``, built over a probe parameter, has a non-zero default weight decay (one it cannot be
        built over is taken to decay)."""
        try:
            probe = self.optimizer_factory([nn.Parameter(torch.zeros(1))])
        except Exception:  # noqa: BLE001  # the real build names its own failure
            return True
        return bool(probe.defaults.get("weight_decay", 0.0))

    def configure_optimizers(self) -> Any:
        """The optimiser over :meth:`parameter_groups` (and its scheduler); none for a fit that takes no steps (and
        Lightning's notice that this fit runs without one quieted)."""
        if not self.takes_optimizer_steps():
            self._quiet.append(quiet_no_optimizer_notice())
            return None
        groups = [g for g in self.parameter_groups() if g["params"]]
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters to optimise")
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def on_before_backward(self, loss: Tensor) -> None:
        if torch.isfinite(loss).all():
            return
        broken = next((n for n, p in self.named_parameters() if p.requires_grad and not p.isfinite().all()), None)
        hint = (
            "lower the learning rate or check the inputs"
            if broken is None
            else f"parameter {broken!r} is already non-finite: an earlier step's gradient was, although its loss was "
            "finite; --trainer.detect_anomaly true names the operation"
        )
        raise FloatingPointError(
            f"{type(self).__name__}: training loss is {loss.detach().cpu().tolist()} at global step "
            f"{self.global_step}; expected a finite value ({hint})"
        )

    def _evaluate(self, batch: Batch, stage: str, batch_idx: int, dataloader_idx: int) -> Predictive:
        """The predictive of the batch, and ``{stage}/nll`` logged over its examples that are not a
        ``DistributedSampler``'s repeats (Lightning's epoch mean then weighs every example once, across ranks)."""
        x, y = batch
        predictive = self.predictive(x, self.num_samples)
        self._check_output_width(predictive)
        loaders = stage_loaders(self.trainer, stage) if self._trainer is not None else []
        keep = real_examples(batch_idx, len(y), loaders[dataloader_idx]) if loaders else len(y)
        log_prob = predictive.log_prob(y)
        nll = -log_prob[:keep].mean() if keep else log_prob.new_zeros(())
        self.log(f"{stage}/nll", nll, prog_bar=stage == "val", sync_dist=True, batch_size=keep)
        return predictive

    def _check_output_width(self, predictive: Predictive) -> None:
        """The predictive's classes (or output dimension) against the datamodule's ``num_classes`` (``output_dim``):
        a network with more logits than the data's classes trained and was scored without a word."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(predictive, CategoricalPredictive):
            name, given = "num_classes", predictive.logits.shape[-1]
        else:
            name, given = "output_dim", predictive.mean_samples.shape[-1]
        expected = getattr(datamodule, name, None)
        if is_int(expected) and expected != given:
            raise ValueError(
                f"{type(self).__name__}'s network gives {given} outputs per example, but {type(datamodule).__name__} "
                f"has {name}={expected}: give the network {expected} outputs"
            )

    # dataloader_idx: Lightning refuses several loaders for a step without it (their logs get /dataloader_idx_k)
    def validation_step(  # type: ignore[override]  # Lightning passes any output to callbacks; STEP_OUTPUT is narrower
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> Predictive:
        return self._evaluate(batch, "val", batch_idx, dataloader_idx)

    def test_step(  # type: ignore[override]  # Lightning passes any output to callbacks; STEP_OUTPUT is narrower
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> Predictive:
        return self._evaluate(batch, "test", batch_idx, dataloader_idx)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Predictive:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.predictive(x, self.num_samples)

    def log_training_loss(self, loss: Tensor, batch_size: int, **terms: Tensor | float) -> None:
        """Log the training objective as ``train/loss`` at every step (on the progress bar, for callbacks that monitor
        it) and its parts ``terms`` as ``train/<name>`` only at the steps whose logs Lightning writes (every
        ``log_every_n_steps`` batches, and when stopping): the other steps' values of a step-level metric are never
        written, and each ``self.log`` costs a fixed 0.15 to 0.3 ms of Lightning bookkeeping."""
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if terms and self._writes_step_logs():
            for name, value in terms.items():
                self.log(f"train/{name}", torch.as_tensor(value).detach(), batch_size=batch_size)

    def _writes_step_logs(self) -> bool:
        """Whether Lightning writes this training step's logs (True where it cannot tell)."""
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning
            return True
        return bool(getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True))


def first_rows(rows: Tensor, count: int) -> Tensor:
    """The first ``count`` rows of ``rows``, zero-padded to ``count``: a per-sample buffer of a checkpoint loaded
    by a module built with another ``num_samples``."""
    kept = rows[:count]
    return torch.cat([kept, kept.new_zeros(count - len(kept), *kept.shape[1:])])
