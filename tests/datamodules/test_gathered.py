"""The in-memory datamodules' loaders gather each batch whole and give exactly the example-by-example batches."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from lightning_bayes.datamodules import DigitsDataModule, EpochShuffle
from lightning_bayes.datamodules.gathered import GatheredTensorDataset, gathered_batch


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    data = DigitsDataModule(batch_size=50, seed=3)
    data.setup("fit")
    return data


def _equal(batches, expected) -> None:
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        assert isinstance(got, list) and len(got) == len(want) == 2
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_every_loader_gathers_whole_batches(digits: DigitsDataModule) -> None:
    calls: list[int] = []
    original = GatheredTensorDataset.__getitems__

    def counted(self, indices):
        calls.append(len(indices))
        return original(self, indices)

    GatheredTensorDataset.__getitems__ = counted  # type: ignore[method-assign]
    try:
        loaders = [digits.train_dataloader(), digits.val_dataloader(), digits.test_dataloader(),
                   digits.ood_dataloader()]  # fmt: skip
        batches = sum(len(list(loader)) for loader in loaders)
    finally:
        GatheredTensorDataset.__getitems__ = original  # type: ignore[method-assign]
    assert len(calls) == batches and max(calls) == 50  # one gather per batch, none per example


def test_batches_equal_the_default_collated_ones(digits: DigitsDataModule) -> None:
    plain = digits.train_set
    assert type(plain) is TensorDataset  # what users get stays a plain TensorDataset
    expected = list(DataLoader(plain, batch_size=50, sampler=EpochShuffle(plain, seed=3)))
    _equal(list(digits.train_dataloader()), expected)
    _equal(list(digits.val_dataloader()), list(DataLoader(digits.val_set, batch_size=50)))


def test_a_worker_and_a_distributed_shard_gather_the_same_batches(digits: DigitsDataModule) -> None:
    plain = digits.test_set
    gathered = GatheredTensorDataset(*plain.tensors)
    for rank in range(2):
        shard = DistributedSampler(plain, num_replicas=2, rank=rank, shuffle=True, seed=5)
        expected = list(DataLoader(plain, batch_size=16, sampler=shard))
        got = DataLoader(gathered, batch_size=16, sampler=shard, collate_fn=gathered_batch, num_workers=1)
        _equal(list(got), expected)


def test_a_users_loader_over_the_loaders_dataset_still_collates_examples(digits: DigitsDataModule) -> None:
    """``DataLoader(loader.dataset)`` and ``Subset(loader.dataset, ...)`` take torch's default collate, which got the
    gathered fields and stacked them ("stack expects each tensor to be equal size")."""
    dataset = digits.val_dataloader().dataset
    expected = list(DataLoader(digits.val_set, batch_size=8))[:2]
    _equal(list(DataLoader(dataset, batch_size=8))[:2], expected)
    _equal(list(DataLoader(Subset(dataset, range(16)), batch_size=8)), expected)
