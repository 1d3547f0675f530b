"""Samplers that split a training set across DDP ranks in a known way, so a multi-process run can be compared with
one process on the same global batches (Lightning's own DistributedSampler shuffles the training set under
``ddp_spawn``; fits using these pass ``use_distributed_sampler=False``)."""

from __future__ import annotations

import torch.distributed as dist
from torch.utils.data import Sampler


def rank_and_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class AlternateExamples(Sampler[int]):
    """Rank r of W takes examples r, r + W, r + 2W, ... in order: the ranks' batches of b together are one
    process's batch of W b."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        rank, size = rank_and_size()
        return iter(range(rank, self.count, size))

    def __len__(self) -> int:
        return self.count // rank_and_size()[1]


class AlternateBatches(Sampler[int]):
    """Whole batches of ``batch_size`` consecutive examples dealt out in turn: rank r of W takes batches r, r + W,
    ... (one process takes them all in order), so every batch is one process's batch of the same index."""

    def __init__(self, count: int, batch_size: int) -> None:
        self.count, self.batch_size = count, batch_size

    def __iter__(self):
        rank, size = rank_and_size()
        batches = range(rank, self.count // self.batch_size, size)
        return iter(index for b in batches for index in range(b * self.batch_size, (b + 1) * self.batch_size))

    def __len__(self) -> int:
        return self.count // rank_and_size()[1]
