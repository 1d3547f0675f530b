"""Batches of an in-memory ``TensorDataset`` gathered whole, one index per tensor.

A ``DataLoader`` over a ``TensorDataset`` calls ``dataset[i]`` once per example and stacks the rows in
``default_collate``: 0.7 to 1 ms for a batch of 64 small images, against 0.02 ms for ``tensor[indices]``. torch's
and torchdata's fetchers call ``dataset.__getitems__(indices)`` where a dataset has it, so the batch arrives
gathered and the collate only passes it on: the same tensors, in the same order, with any sampler (shuffles,
``DistributedSampler``, a resumed ``StatefulDataLoader``) and in worker processes.
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import TensorDataset


class GatheredBatch(tuple[Tensor, ...]):
    """A batch :class:`GatheredTensorDataset` gathered: one tensor per field, ``[B, ...]`` each."""


class GatheredTensorDataset(TensorDataset):
    """A ``TensorDataset`` whose loader batches are gathered by one index per tensor (use with
    :func:`gathered_batch` as the loader's ``collate_fn``); ``dataset[i]`` is unchanged."""

    def __getitems__(self, indices: list[int]) -> GatheredBatch:
        return GatheredBatch(tensor[indices] for tensor in self.tensors)


def gathered_batch(batch: GatheredBatch) -> list[Tensor]:
    """The collate of a :class:`GatheredTensorDataset`: its fields as ``default_collate`` lists them."""
    return list(batch)
