"""A DistributedSampler's repeats dropped from batches: over all processes every example is kept exactly once."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_bayes.datamodules import without_sampler_padding


@pytest.mark.parametrize("loader_class", [DataLoader, StatefulDataLoader])
@pytest.mark.parametrize(("size", "processes", "batch_size", "shuffle"), [(7, 2, 2, False), (1077, 2, 1077, True),
                                                                         (10, 4, 1, True), (9, 3, 2, False)])
def test_every_example_is_kept_once(loader_class, size: int, processes: int, batch_size: int, shuffle: bool) -> None:
    dataset = TensorDataset(torch.arange(size).float().unsqueeze(1), torch.arange(size))
    kept: list[int] = []
    for rank in range(processes):
        sampler = DistributedSampler(dataset, num_replicas=processes, rank=rank, shuffle=shuffle, seed=3)
        loader = loader_class(dataset, batch_size=batch_size, sampler=sampler)
        seen = 0
        for batch_idx, batch in enumerate(loader):
            x, y = without_sampler_padding(batch, batch_idx, loader)
            assert torch.equal(x[:, 0].long(), y) and torch.equal(y, batch[1][: len(y)])
            kept += y.tolist()
            seen += len(batch[1])
        assert seen == len(sampler)  # the sampler padded: every process got as many
    assert sorted(kept) == list(range(size))


def test_without_a_distributed_sampler_or_with_drop_last_nothing_is_dropped() -> None:
    dataset = TensorDataset(torch.zeros(5, 1), torch.arange(5))
    batch = next(iter(DataLoader(dataset, batch_size=5)))
    assert without_sampler_padding(batch, 0, DataLoader(dataset, batch_size=5)) is batch
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False, drop_last=True)
    loader = DataLoader(dataset, batch_size=5, sampler=sampler)
    batch = next(iter(loader))
    assert without_sampler_padding(batch, 0, loader) is batch and len(batch[1]) == 2


@pytest.mark.parametrize(("size", "batch_size", "shuffle"), [(5, 2, False), (1077, 64, True), (9, 4, True)])
def test_the_librarys_loaders_as_lightning_rebuilds_them_for_ddp_keep_every_example_once(
    size: int, batch_size: int, shuffle: bool
) -> None:
    """Under DDP Lightning rebuilds a StatefulDataLoader (every EpochLoader of the library's datamodules) with its
    DistributedSampler inside a BatchSampler and batch_size=None: the repeats were all kept (1,078 of 1,077)."""
    from lightning.pytorch.utilities.data import _update_dataloader

    from lightning_bayes.datamodules import EpochLoader, EpochShuffle

    dataset = TensorDataset(torch.arange(size).float().unsqueeze(1), torch.arange(size))
    kept: list[int] = []
    for rank in range(2):
        loader = EpochLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(dataset, 0), epoch=lambda: None)
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=shuffle, seed=3)
        rebuilt = _update_dataloader(loader, sampler)
        assert rebuilt.batch_size is None
        for batch_idx, batch in enumerate(rebuilt):
            kept += without_sampler_padding(batch, batch_idx, rebuilt)[1].tolist()
    assert sorted(kept) == list(range(size))
