"""LightningDataModules on real, offline-packaged data; each classification one offers ``ood_dataloader()``."""

from .digits import DigitsDataModule
from .mnist import MNISTDataModule

__all__ = ["DigitsDataModule", "MNISTDataModule"]
