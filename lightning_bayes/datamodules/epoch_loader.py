"""A training loader that resumes where the unstopped fit was (its sampler's epoch is set before each pass, and
its position inside a pass is checkpoint state), and extra passes over its data that leave it alone."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch import Trainer
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader


def training_pass_epoch(trainer: Trainer | None) -> int | None:
    """The epoch of the training pass about to begin: the counter Lightning hands to ``set_epoch``, restored on
    resume (``trainer.current_epoch`` still says 0 when a fit resumed at an epoch's end creates its iterator);
    ``None`` without a trainer."""
    return (
        trainer.fit_loop.epoch_progress.current.processed  # type: ignore[attr-defined]  # typed as the base tracker
        if trainer is not None
        else None
    )


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
        *args, **kwargs: those of ``StatefulDataLoader`` (and ``torch.utils.data.DataLoader``).
    """

    def __init__(self, *args: Any, epoch: Callable[[], int | None], **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch now deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch()
        if epoch is not None:
            for sampler in loader_samplers(self):
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(epoch)
        return super().__iter__()


def side_pass(loader: Any) -> Any:
    """A loader, in the main process, over the batches ``loader``'s next pass gives, that leaves ``loader`` alone.

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
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
        collate_fn=loader.collate_fn,
    )
