"""Backbone builders. ``num_classes=0`` / ``out_features=0`` returns a feature extractor with ``num_features``."""

from .lenet import LeNet5
from .mlp import MLP

__all__ = ["LeNet5", "MLP"]
