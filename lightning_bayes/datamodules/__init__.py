"""LightningDataModules on real, offline-packaged data; each classification one offers ``ood_dataloader()``."""

from .digits import DigitsDataModule
from .mnist import MNISTDataModule
from .regression import UCIRegressionDataModule
from .text import RottenTomatoesDataModule

__all__ = ["DigitsDataModule", "MNISTDataModule", "RottenTomatoesDataModule", "UCIRegressionDataModule"]
