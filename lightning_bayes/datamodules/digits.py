"""scikit-learn's 8x8 digits (1,797 images), with Fashion-MNIST average-pooled to 8x8 as OOD."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..checks import check_flags
from .base import InMemoryDataModule, check_split_fractions, train_val_test_indices
from .locate import FASHION_MNIST
from .mnist import load_idx_split, to_float_images

DIGITS_SIDE = 8


class DigitsDataModule(InMemoryDataModule):
    """8x8 digits (UCI optdigits test set, in scikit-learn's ``load_digits``), pixel values / 16 in [0, 1].

    A stratified train / val / test split by ``seed`` (default 60 / 20 / 20); inputs flattened ``[B, 64]``
    or, with ``flatten=False``, images ``[B, 1, 8, 8]``. ``ood_dataloader()`` serves the 10k Fashion-MNIST
    test images in [0, 1], average-pooled 28x28 -> 8x8 (each output pixel the mean of its adaptive
    window), shaped like the digits.

    Args:
        data_dir: folder with the Fashion-MNIST IDX files for the OOD set (the digits themselves ship
            with scikit-learn); ``None`` uses the Debian package ``dataset-fashion-mnist``.
        download: let torchvision download Fashion-MNIST if it is not found (needs internet).
        val_fraction: share of the images held out for validation (stratified by class).
        test_fraction: share of the images held out for test (stratified by class).
        flatten: inputs ``[B, 64]``; ``False``: images ``[B, 1, 8, 8]``.
        batch_size, seed, num_workers, shuffle, drop_last: as in
            :class:`~lightning_bayes.datamodules.base.InMemoryDataModule`.
    """

    num_classes: ClassVar[int] = 10

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        flatten: bool = True,
        num_workers: int = 0,
        data_dir: str | None = None,
        download: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, data_dir, shuffle, drop_last)
        self.val_fraction, self.test_fraction = check_split_fractions(val_fraction, test_fraction)
        check_flags(flatten=flatten, download=download)
        self.flatten = flatten
        self.download = download
        self.ood_set: TensorDataset | None = None

    def _shape(self, images: Tensor) -> Tensor:
        """``[N, 8, 8]``-like images -> ``[N, 64]`` or ``[N, 1, 8, 8]``."""
        side = DIGITS_SIDE
        return images.reshape(len(images), side * side) if self.flatten else images.reshape(len(images), 1, side, side)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = self._shape(torch.tensor(digits.images, dtype=torch.float32) / 16.0)
        y = torch.tensor(digits.target, dtype=torch.long)
        parts = train_val_test_indices(len(y), self.val_fraction, self.test_fraction, self.seed, stratify=y)
        self.train_set, self.val_set, self.test_set = (TensorDataset(x[i], y[i]) for i in parts)
        fashion, fashion_labels = load_idx_split(FASHION_MNIST, "test", self.data_dir, self.download)
        pooled = F.adaptive_avg_pool2d(to_float_images(fashion), DIGITS_SIDE)
        self.ood_set = TensorDataset(self._shape(pooled), fashion_labels)

    def ood_dataloader(self) -> DataLoader:
        """Fashion-MNIST test images pooled to 8x8 in [0, 1] (OOD for the digits)."""
        return self._loader(self.ood_set)
