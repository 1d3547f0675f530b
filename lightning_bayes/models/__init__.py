"""Backbone builders (timm's convention: ``num_classes=0`` / ``out_features=0`` gives a feature
extractor, and every model exposes ``num_features``, the width before the head).

The timm and transformers builders are imported on first use, so ``LeNet5``/``MLP`` work without the
``vision``/``llm`` extras and without their import time.
"""

from __future__ import annotations

import importlib
from typing import Any

from .lenet import LeNet5
from .mlp import MLP
from .semi_structured import SemiStructured

_LAZY = {
    "timm_backbone": ".timm",
    "TimmImageModel": ".timm_images",
    "load_packaged_efficientnet_lite0": ".timm",
    "resolve_pretrained": ".pretrained",
    "LoraSpec": ".hf",
    "HFSequenceClassifier": ".hf",
    "CausalLMAnswerClassifier": ".hf",
    "CausalLMFeatures": ".hf",
    "LinearProbe": ".probe",
    "FrozenFeatures": ".frozen",
    "load_trained_weights": ".weights",
    "trained_state_dict": ".weights",
}

__all__ = ["LeNet5", "MLP", "SemiStructured", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
