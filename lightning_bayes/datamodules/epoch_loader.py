"""A training loader that resumes where the unstopped fit was (its sampler's epoch is set before each pass, and
its position inside a pass is checkpoint state), and extra passes over its data that leave it alone."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from .epoch_shuffle import EpochShuffle


def training_pass_epoch(trainer: Trainer | None) -> int | None:
    """The epoch of the training pass about to begin, as the unstopped fit numbers it (``None`` without a trainer).

    Read from the fit loop's counters, restored on resume (``trainer.current_epoch`` still says 0 when a fit resumed
    at an epoch's end creates its iterator). Lightning counts an epoch ``processed`` before its end hooks (where
    checkpoints are saved) and ``completed`` after them:

    - a fit counted in epochs resumes from a checkpoint saved in the end hooks with the next epoch, ``processed``;
    - a fit counted in steps (``max_steps``) goes on with epoch ``completed``: Lightning never sets it to
      ``processed`` there (the gap grows by one with every resume) and resumes an epoch that ``max_steps`` cut short
      although its end hooks ran;
    - either goes on with the next epoch after a checkpoint saved once the epoch's batches had all run (e.g.
      ``every_n_train_steps`` on its last batch).

    Lightning itself hands ``processed`` to ``set_epoch``, the next epoch in a resumed fit counted in steps;
    :class:`EpochLoader` sets this one as each pass begins."""
    if trainer is None:
        return None
    loop = trainer.fit_loop
    processed: int = loop.epoch_progress.current.processed  # type: ignore[attr-defined]  # typed as the base tracker
    completed: int = loop.epoch_progress.current.completed
    batches: int = loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]
    whole = 0 < batches and batches >= training_pass_batches(trainer)  # the saved epoch had run all its batches
    if processed > completed and trainer.max_steps == -1:
        return processed
    return completed + int(whole)


def training_pass_batches(trainer: Trainer) -> float:
    """The training batches of an epoch as the new iterator is made (``trainer.num_training_batches`` is not set
    yet then): the loader's length under ``limit_train_batches``; infinite when unknown."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or not isinstance(getattr(loader, "dataset", None), Sized):
        return math.inf
    return limited_batches(len(loader), trainer.limit_train_batches)


def limited_batches(length: int, limit: float | None) -> int:
    """The batches Lightning runs of a loader of ``length`` under a ``limit_*_batches`` of ``limit``: a count
    (at most ``length``) or a fraction of ``length``, rounded down (at least one batch unless the limit is 0, where
    Lightning would refuse a fraction that rounds to none)."""
    if isinstance(limit, int):
        return min(length, limit)
    return max(int(length * limit), 1) if limit else 0


def loader_samplers(loader: Any) -> tuple[Any, Any]:
    """A loader's sampler and its batch sampler's (``None`` where absent): Lightning puts its
    ``DistributedSampler`` into the batch sampler of a ``StatefulDataLoader`` (torchdata's is not torch's)."""
    return getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)


class EpochLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` (Lightning saves its ``state_dict`` in checkpoints and a fit resumed
    inside an epoch goes on from the next batch) that calls ``sampler.set_epoch(epoch())`` as each pass begins
    (unless ``epoch()`` is ``None``: outside a fit).

    Lightning calls ``set_epoch`` on the sampler at the start of every epoch, but a resumed fit creates its
    first iterator before that, and the loader fixes the order when the iterator is created (torchdata's
    batching draws the indices at once, as do loader workers): the resumed epoch would take epoch 0's order,
    whether the sampler is an :class:`EpochShuffle` or the ``DistributedSampler`` Lightning puts in its place
    under DDP (Lightning-AI/pytorch-lightning#21938). ``epoch`` tells the pass's epoch from the trainer:
    ``EpochLoader(data, sampler=EpochShuffle(data, seed), epoch=lambda: training_pass_epoch(trainer))``.

    Args:
        epoch: the epoch of the pass about to begin, or ``None`` to leave the sampler's own.
        pass_batches: how many batches a pass runs (:func:`training_pass_batches`: fewer under the Trainer's
            ``limit_train_batches``); ``None``, or a call that answers ``None``: the loader's length.
        *args, **kwargs: those of ``StatefulDataLoader`` (and ``torch.utils.data.DataLoader``).
    """

    def __init__(
        self, *args: Any, epoch: Callable[[], int | None], pass_batches: Callable[[], float | None] | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch now deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)
        self.epoch, self.pass_batches = epoch, pass_batches

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A state saved inside a pass; one saved after its last batch (a checkpoint on an epoch's last step, the
        last under ``limit_train_batches`` too) is ignored: torchdata would apply it to the next pass, which then
        skipped the batches already run (every batch: a lost epoch)."""
        batches = None if self.pass_batches is None else self.pass_batches()
        if not _pass_finished(state_dict, len(self) if batches is None else batches):
            super().load_state_dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch()
        if epoch is not None:
            for sampler in loader_samplers(self):
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(epoch)
                if isinstance(sampler, EpochShuffle):
                    sampler.fixed_on_iter = True
        return super().__iter__()


def _pass_finished(state: dict[str, Any], batches: float) -> bool:
    """Whether a ``StatefulDataLoader`` state was saved after its pass's last batch (torchdata 0.11's layout: the
    batches handed out are ``_num_yielded`` in the main process, the snapshot's step plus the steps since with
    workers)."""
    if state.get("_iterator_finished"):
        return True
    snapshot = state.get("_snapshot")
    yielded = state.get("_num_yielded") if snapshot is None else snapshot.get("_snapshot_step", 0) + state.get(
        "_steps_since_snapshot", 0
    )
    return isinstance(yielded, int) and yielded >= batches


def forget_finished_passes(checkpoint: dict[str, Any]) -> None:
    """Drops from a Lightning checkpoint the training loaders' states when it was written after the epoch's last
    batch (on that step, at a validation after it, or at the epoch's end): Lightning would hand them to the loaders
    as the fit resumes, and torchdata's ``StatefulDataLoader`` applies a finished pass's state to the next pass,
    which then yields nothing (an epoch lost without a word). The next pass starts afresh, as in a fit not stopped.
    :class:`EpochLoader` ignores such a state itself; this serves a user's own loader. For ``on_load_checkpoint``
    (before Lightning restores its loops from the same dictionary)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    if fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch") and "state_dict" in fit_loop:
        fit_loop["state_dict"]["combined_loader"] = []


def step_batch(trainer: Trainer, batch: Any, device: torch.device) -> Any:
    """``batch`` as Lightning hands it to a step, for a pass over data outside the loops: moved to ``device`` (the
    module's: after a fit it is back on the CPU while the strategy's root device is the GPU) through the module's
    ``transfer_batch_to_device`` and cast by the precision (``convert_input``: floating tensors to float64 under
    ``precision="64-true"``, to bf16 under ``"bf16-true"``)."""
    return trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch, device))


def side_pass(loader: Any, epoch: int | None = None) -> Any:
    """A loader, in the main process, over the batches ``loader``'s next pass gives (or, with ``epoch``, the pass of
    that epoch, for a sampler with ``set_epoch``), that leaves ``loader`` alone.

    For a pass over the training data inside a fit (e.g. a sweep as an epoch begins): iterating the training
    loader itself would reset the iterator its persistent workers share with the fit (the epoch's batches
    would be gone) and, for a ``StatefulDataLoader``, replace the iterator whose position checkpoints keep. The
    sampler is a deep copy (its generator too) sharing the dataset, so the fit's own pass is not moved. Any
    other iterable is returned as it is.
    """
    if not isinstance(loader, DataLoader):
        return loader
    keep_dataset = {id(loader.dataset): loader.dataset}
    if loader.batch_size is None:  # the user's own batch sampler
        batches = copy.deepcopy(loader.batch_sampler, keep_dataset)
        return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn)
    sampler = copy.deepcopy(loader_samplers(loader)[1], keep_dataset)  # the batch sampler's: see loader_samplers
    if epoch is not None and callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
        collate_fn=loader.collate_fn,
    )
