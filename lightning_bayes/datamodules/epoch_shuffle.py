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
    Iterated without ``set_epoch``, successive passes take epochs ``epoch``, ``epoch + 1``, ... (a loader with
    workers draws its first indices when Lightning creates its iterator, before ``set_epoch``: build the
    sampler with the epoch the fit starts at). It is a ``RandomSampler``, so Lightning swaps it for a shuffling
    ``DistributedSampler`` under DDP as before.
    """

    def __init__(self, data_source: Sized, seed: int = 0, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + _EPOCH_STRIDE * self.epoch)
        self.epoch += 1  # the next pass without set_epoch
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()
