"""A tiny classifier / regressor with a deterministic ``predictive`` and a datamodule with OOD data."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive, Predictive


class CountingDataset(TensorDataset):
    """A TensorDataset that counts how many examples were read (to see how much OOD data was used)."""

    def __init__(self, *tensors: Tensor) -> None:
        super().__init__(*tensors)
        self.reads = 0

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        self.reads += 1
        return super().__getitem__(index)


class LinearModel(LightningModule):
    """A linear net; predictive sample s adds a fixed offset ``s``-th row to the outputs (deterministic).

    ``returns_predictive`` makes ``validation_step``/``test_step`` return the Predictive as the library's
    modules do; otherwise they return a loss and the callback must call ``predictive`` itself.
    """

    def __init__(self, regression: bool = False, returns_predictive: bool = True, num_samples: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.regression = regression
        self.returns_predictive = returns_predictive
        self.num_samples = num_samples
        self.net = nn.Linear(1 if regression else 2, 1 if regression else 3)
        self.register_buffer("offsets", torch.randn(8, self.net.out_features))

    def predictive(self, x: Tensor, num_samples: int) -> Predictive:
        outputs = self.net(x).unsqueeze(0) + self.offsets[:num_samples, None, :]
        if self.regression:
            return GaussianPredictive(outputs, torch.full_like(outputs, 0.25) + 0.1 * x.abs().unsqueeze(0))
        return CategoricalPredictive(outputs)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        outputs = self.net(x)
        if self.regression:
            return nn.functional.mse_loss(outputs, y)
        return nn.functional.cross_entropy(outputs, y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Predictive | Tensor:
        return self.predictive(batch[0], self.num_samples) if self.returns_predictive else self._loss(batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Predictive | Tensor:
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def blobs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Three overlapping Gaussian blobs in 2-D with labels 0, 1, 2."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor([[0.0, 1.0], [1.0, -0.5], [-1.0, -0.5]])
    return centres[labels] + 0.8 * torch.randn(n, 2, generator=generator), labels


def curve(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """1-D inputs ``[n, 1]`` and noisy linear targets ``[n, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.linspace(-2, 2, n).unsqueeze(-1)
    return x, 0.7 * x + 0.3 * torch.randn(n, 1, generator=generator)


class ToyData(LightningDataModule):
    """Train / val / test splits (64 / 48 / 60 examples); for classification an OOD set of 36 far-away points."""

    def __init__(self, regression: bool = False, batch_size: int = 16) -> None:
        super().__init__()
        make = curve if regression else blobs
        self.batch_size = batch_size
        self.train, self.val, self.test = (TensorDataset(*make(n, seed)) for n, seed in ((64, 0), (48, 1), (60, 2)))
        generator = torch.Generator().manual_seed(3)
        self.ood = CountingDataset(4.0 * torch.randn(36, 2, generator=generator), torch.zeros(36, dtype=torch.long))
        self.regression = regression

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.batch_size)


class ToyDataWithOOD(ToyData):
    def ood_dataloader(self) -> DataLoader:
        return DataLoader(self.ood, batch_size=self.batch_size)
