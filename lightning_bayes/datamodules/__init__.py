"""LightningDataModules on real, offline-packaged data; each classification one offers ``ood_dataloader()``."""

from .digits import DigitsDataModule
from .mnist import MNISTDataModule
from .regression import UCIRegressionDataModule

__all__ = ["DigitsDataModule", "MNISTDataModule", "UCIRegressionDataModule"]
