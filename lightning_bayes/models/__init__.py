"""Backbone builders. ``num_classes=0`` / ``out_features=0`` returns a feature extractor with ``num_features``."""

from .hf import CausalLMAnswerClassifier, HFSequenceClassifier, LoraSpec
from .lenet import LeNet5
from .mlp import MLP
from .pretrained import resolve_pretrained
from .timm import TimmBackbone, timm_backbone

__all__ = ["CausalLMAnswerClassifier", "HFSequenceClassifier", "LeNet5", "LoraSpec", "MLP", "TimmBackbone", "resolve_pretrained", "timm_backbone"]
