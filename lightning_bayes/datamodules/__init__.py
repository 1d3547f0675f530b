"""LightningDataModules on real, offline-packaged data, deterministic by ``seed``.

Every one holds its data in memory, serves ``(x, y)`` batches, exposes ``task`` and ``num_classes`` /
``output_dim`` before ``setup`` and ``num_train`` after it; the classification ones also serve an
``ood_dataloader()`` with the in-distribution preprocessing.
"""

from .base import InMemoryDataModule
from .digits import DigitsDataModule
from .epoch_loader import (
    EpochLoader, limited_batches, side_pass, step_batch, training_pass_batches, training_pass_epoch,
)
from .epoch_shuffle import EpochShuffle
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .regression import UCIRegressionDataModule
from .sampler_padding import without_sampler_padding
from .text import RottenTomatoesDataModule

__all__ = [
    "DigitsDataModule",
    "EpochLoader",
    "EpochShuffle",
    "FashionMNISTDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
    "RottenTomatoesDataModule",
    "UCIRegressionDataModule",
    "limited_batches",
    "side_pass",
    "step_batch",
    "training_pass_batches",
    "training_pass_epoch",
    "without_sampler_padding",
]
