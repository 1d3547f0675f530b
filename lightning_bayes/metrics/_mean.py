"""The base of every "mean of a per-example value" metric: torchmetrics' ``MeanMetric`` with NaN kept."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics.aggregation import MeanMetric


class MeanOverValues(MeanMetric):
    """Mean of the values passed to ``MeanMetric.update``; sum states (``mean_value``, ``weight``), DDP-safe.

    NaNs are kept (``nan_strategy="disable"``) so a diverged model reports NaN instead of a silently
    filtered mean. Subclasses override ``update(predictive, target)`` and pass per-example values on.
    """

    full_state_update = False
    higher_is_better: bool | None  # type: ignore[assignment]  # Metric's type; torchmetrics' BaseAggregator says None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)

    def compute(self) -> Tensor:
        """The mean; an error naming the metric when no example was seen (torchmetrics: NaN and a warning)."""
        refuse_empty(self.weight, type(self).__name__)
        return super().compute()


def refuse_empty(count: Tensor, metric: str) -> None:
    """An error naming ``metric`` when its (synced) example count is 0, as the calibration errors give."""
    if not bool(count > 0):
        raise ValueError(f"{metric}.compute needs at least one example; update was never given any")
