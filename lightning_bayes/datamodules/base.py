"""What every in-memory datamodule shares: seeded splits, tensors in memory, the (x, y) batch convention."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


def seeded_permutation(n: int, seed: int) -> Tensor:
    """A permutation of ``range(n)`` that depends only on ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def check_split_fractions(val_fraction: float, test_fraction: float) -> tuple[float, float]:
    """Validate the held-out fractions of a random split: both > 0 and summing below 1."""
    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction and test_fraction must be > 0 and sum below 1; got {val_fraction} and {test_fraction}"
        )
    return val_fraction, test_fraction


class InMemoryDataModule(LightningDataModule):
    """Datasets held as tensors; subclasses fill ``self.train_set``, ``val_set``, ``test_set`` in ``setup``.

    ``num_train`` is the training-set size N (the KL weight of variational methods is 1/N).
    """

    task: Literal["classification", "regression"] = "classification"

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def num_train(self) -> int:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return len(self.train_set)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are used")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
