"""Scores an anchor's predictive exactly as ``CalibrationMetrics`` scores our modules: the library's metric
collections over the test loader and, for classification, the OOD loader; plus the reliability bins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningDataModule
from torch import Tensor

from lightning_bayes.metrics import classification_metrics, ood_metrics, regression_metrics
from lightning_bayes.plots import ReliabilityBins, reliability_bins
from lightning_bayes.predictive import CategoricalPredictive, Predictive


def score(
    predict: Callable[[Tensor], Predictive], data: LightningDataModule, device: torch.device
) -> tuple[dict[str, float], ReliabilityBins | None]:
    """Flat metrics (the keys of ``metrics.json``: ``acc``, ``nll``, ..., ``ood_auroc``) and, for
    classification, the reliability bins of the test set."""
    metrics, ood, confidences, correct = None, None, [], []
    with torch.no_grad():
        for x, y in data.test_dataloader():
            x, y = move_data_to_device(x, device), y.to(device)
            predictive = predict(x)
            if metrics is None:
                classification = isinstance(predictive, CategoricalPredictive)
                metrics = (classification_metrics() if classification else regression_metrics()).to(device)
                if classification and callable(getattr(data, "ood_dataloader", None)):
                    ood = ood_metrics().to(device)
            metrics.update(predictive, y)
            if ood is not None:
                ood.update(predictive, False)
            if isinstance(predictive, CategoricalPredictive):
                confidence, label = predictive.probs.max(-1)
                confidences.append(confidence.cpu())
                correct.append((label == y).cpu())
        if metrics is None:
            raise ValueError("the datamodule's test_dataloader() yielded no batches")
        values = {name: float(value) for name, value in metrics.compute().items()}
        if ood is not None:
            for batch in cast(Any, data).ood_dataloader():  # an optional hook, found by getattr above
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                ood.update(predict(move_data_to_device(x, device)), True)
            values.update({f"ood_{name}": float(value) for name, value in ood.compute().items()})
    bins = reliability_bins(torch.cat(confidences), torch.cat(correct).double()) if confidences else None
    return values, bins
