"""scikit-learn's 8x8 digits (1,797 images), with Fashion-MNIST average-pooled to 8x8 as OOD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .base import InMemoryDataModule, check_split_fractions, seeded_permutation
from .mnist import load_mnist_arrays


def stratified_split(labels: Tensor, fractions: tuple[float, float], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of a train / val / test split taking ``fractions`` (val, test) of every class, by ``seed``."""
    parts: list[list[Tensor]] = [[], [], []]
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[seeded_permutation(len(idx), seed + int(c))]
        n_val, n_test = round(fractions[0] * len(idx)), round(fractions[1] * len(idx))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    train, val, test = (torch.cat(p).sort().values for p in parts)
    return train, val, test


class DigitsDataModule(InMemoryDataModule):
    """8x8 digits scaled to [0, 1], stratified 60/20/20 by ``seed``; flattened ``[B, 64]`` or ``[B, 1, 8, 8]``.

    ``ood_dataloader()`` serves the 10k Fashion-MNIST test images average-pooled to 8x8 in [0, 1].
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        flatten: bool = True,
        num_workers: int = 0,
        fashion_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.fractions = check_split_fractions(val_fraction, test_fraction)
        self.flatten = flatten
        self.fashion_dir = fashion_dir
        self.ood_set: TensorDataset | None = None

    def _shape(self, images: Tensor) -> Tensor:
        return images.reshape(len(images), 64) if self.flatten else images.reshape(len(images), 1, 8, 8)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = self._shape(torch.tensor(digits.images, dtype=torch.float32) / 16.0)
        y = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = stratified_split(y, self.fractions, self.seed)
        self.train_set, self.val_set, self.test_set = (TensorDataset(x[i], y[i]) for i in (train, val, test))
        fashion, fashion_labels = load_mnist_arrays("test", fashion=True, data_dir=self.fashion_dir)
        pooled = F.adaptive_avg_pool2d(fashion.float().unsqueeze(1) / 255.0, 8)
        self.ood_set = TensorDataset(self._shape(pooled), fashion_labels)

    def ood_dataloader(self) -> DataLoader:
        """Fashion-MNIST pooled to 8x8 (OOD for the digits)."""
        return self._loader(self.ood_set)
