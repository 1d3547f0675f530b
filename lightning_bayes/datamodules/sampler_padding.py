"""The examples a ``DistributedSampler`` repeats to give every process as many, dropped from a batch.

Without ``drop_last`` the sampler pads the ``N`` indices to ``W ceil(N / W)`` by repeating the first ones and deals
them out in turn (process ``r`` takes positions ``r, r + W, ...``), so its local position ``i`` is a repeat exactly
when ``r + i W >= N``: the tail of its pass. A mean over batches hardly notices; a sum over the whole data set that
must count each example once (e.g. subspace inference's log-likelihood) does.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.utils.data import DistributedSampler
from torch.utils._pytree import tree_flatten, tree_map

from .epoch_loader import loader_samplers


def distributed_sampler(loader: Any) -> DistributedSampler | None:
    """The ``DistributedSampler`` dealing ``loader``'s examples out to the processes (Lightning's, in the loader or,
    for a ``StatefulDataLoader``, in its batch sampler), if any."""
    return next((s for s in loader_samplers(loader) if isinstance(s, DistributedSampler)), None)


def real_examples(batch_idx: int, batch_size: int, loader: Any) -> int:
    """How many of the ``batch_size`` examples of batch ``batch_idx`` of ``loader``'s pass are not the sampler's
    repeats (all of them when the loader has no padding ``DistributedSampler`` or a batch sampler of its own)."""
    sampler = distributed_sampler(loader)
    loader_batch = getattr(loader, "batch_size", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if loader_batch is None and getattr(batch_sampler, "sampler", None) is sampler:  # Lightning's StatefulDataLoader
        loader_batch = getattr(batch_sampler, "batch_size", None)
    if sampler is None or sampler.drop_last or loader_batch is None:  # none, or a batch sampler of the user's
        return batch_size
    size = len(sampler.dataset)  # type: ignore[arg-type]  # a map-style dataset: DistributedSampler needs its length
    if sampler.total_size == size:
        return batch_size
    real = math.ceil((size - sampler.rank) / sampler.num_replicas)  # local positions before the repeats
    return min(max(real - batch_idx * loader_batch, 0), batch_size)


def without_sampler_padding(batch: tuple[Any, Tensor], batch_idx: int, loader: Any) -> tuple[Any, Tensor]:
    """``(x, y)`` batch ``batch_idx`` of ``loader``'s pass without the sampler's repeats (unchanged when the loader
    has no padding ``DistributedSampler`` or a batch sampler of its own)."""
    x, y = batch
    keep = real_examples(batch_idx, len(y), loader)
    if keep == len(y):
        return batch
    return tree_map(lambda t: t[:keep] if isinstance(t, Tensor) else t, x), y[:keep]


def stage_loaders(trainer: Any, stage: str) -> list[Any]:
    """The ``"val"`` or ``"test"`` stage's loaders in Lightning's ``dataloader_idx`` order (a list, a dict's values,
    ... flattened)."""
    return tree_flatten(trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders)[0]
