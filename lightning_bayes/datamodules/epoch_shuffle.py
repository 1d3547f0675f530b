"""A training-set shuffle that is a function of the seed and the epoch, so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler

_EPOCH_STRIDE = 1_000_003  # a prime: the seeds of (seed, epoch) pairs of nearby runs do not collide


class EpochShuffle(RandomSampler):
    """Epoch ``e`` visits ``randperm(N)`` drawn from a generator seeded with ``seed + 1_000_003 e``.

    A shuffling ``DataLoader`` draws each epoch's order from one generator that runs on from epoch to epoch,
    and a run resumed from a checkpoint starts a fresh one: it would see epoch 0's order again. Lightning
    calls ``set_epoch(e)`` at the start of every epoch (as for a ``DistributedSampler``), so here the order
    depends on ``(seed, e)`` only and a run resumed at an epoch boundary trains on the unstopped run's batches.
    Iterated without ``set_epoch``, successive passes take epochs ``epoch``, ``epoch + 1``, ... (a resumed fit
    creates its first iterator before Lightning's ``set_epoch``: :class:`EpochLoader` sets it as each pass
    begins). Inside a torchdata ``StatefulDataLoader`` its pass is checkpoint state: a fit resumed inside an
    epoch finishes that epoch's order. It is a ``RandomSampler``, so Lightning swaps it for a shuffling
    ``DistributedSampler`` under DDP as before.

    Args:
        data_source: the dataset (only its length is read).
        seed: seed of every epoch's order.
        epoch: the epoch of the first pass when ``set_epoch`` is never called.
    """

    def __init__(self, data_source: Sized, seed: int = 0, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, epoch
        self._visiting: int | None = None  # the epoch of the pass under way
        self._yielded = 0  # indices that pass has handed out
        self._skip = 0  # indices the next pass skips (set by load_state_dict)
        self.fixed_on_iter = False  # read the pass's epoch as the iterator is made (see __iter__)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation the next iteration draws (Lightning calls it at every epoch start)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        """A pass over epoch ``epoch``'s permutation, read as its first index is drawn, so that Lightning's
        ``set_epoch`` after a resumed fit made its iterator still counts; with ``fixed_on_iter`` (set by
        :class:`EpochLoader`, which sets the epoch itself) read here, as ``DistributedSampler`` does: Lightning's
        late ``set_epoch`` after a fit counted in steps stopped inside an epoch gave the resumed epoch the next one's
        order. Either way the pass begins at its first index (torchdata's worker iterator makes one and discards it
        unstarted)."""
        return self._pass(self.epoch, self._skip) if self.fixed_on_iter else self._pass()

    def _pass(self, epoch: int | None = None, skip: int | None = None) -> Iterator[int]:
        epoch = self.epoch if epoch is None else epoch
        skip = self._skip if skip is None else skip
        self._visiting, self.epoch = epoch, epoch + 1  # the next pass without set_epoch: epoch + 1
        self._yielded, self._skip = skip, 0
        generator = torch.Generator().manual_seed(self.seed + _EPOCH_STRIDE * epoch)
        for index in torch.randperm(len(self.data_source), generator=generator)[skip:].tolist():
            self._yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """The pass under way (its epoch and the indices handed out), for torchdata's ``StatefulDataLoader``,
        which saves it in checkpoints: a loader resumed inside an epoch finishes that epoch's order."""
        if self._visiting is None:
            return {"epoch": self.epoch, "yielded": 0}
        if self._yielded >= len(self.data_source):  # a finished pass: the next one is the next epoch's, from its start
            return {"epoch": self._visiting + 1, "yielded": 0}
        return {"epoch": self._visiting, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume inside an epoch: the next iteration skips the ``yielded`` indices of that epoch's permutation."""
        self.epoch, self._skip, self._visiting = state["epoch"], state["yielded"], None
