"""Reliability diagram: accuracy per confidence bin against the diagonal (Niculescu-Mizil & Caruana, 2005).

Bins are equal-width, ``[k/n, (k+1)/n)`` with the last one closed (edges as the logged ECE's, in the confidences'
float type), and the ECE in the title is
``sum_b (n_b / N) |acc_b - conf_b|`` over them (Guo et al., 2017).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes

from ..checks import is_int
from ._figure import as_array, new_figure, save


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin accuracy, mean confidence (NaN for empty bins) and example count, ``[n_bins]`` each."""

    edges: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        """``sum_b (n_b / N) |acc_b - conf_b|`` over the filled bins."""
        filled = self.count > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.count[filled] * gaps).sum() / self.count.sum())

    def to_dict(self) -> dict[str, list[float | None] | list[int]]:
        """JSON-ready lists (``None`` for an empty bin's accuracy and confidence; counts as integers)."""

        def listed(values: np.ndarray) -> list[float | None]:
            return [None if math.isnan(v) else float(v) for v in values]

        return {"edges": listed(self.edges), "accuracy": listed(self.accuracy), "confidence": listed(self.confidence),
                "count": [round(float(c)) for c in self.count]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, list[float | None]]) -> ReliabilityBins:
        """Inverse of :meth:`to_dict`."""

        def array(key: str) -> np.ndarray:
            return np.array([math.nan if v is None else v for v in data[key]], dtype=np.float64)

        return cls(array("edges"), array("accuracy"), array("confidence"), array("count"))


def _bin_index(confidences: object, n_bins: int) -> np.ndarray:
    """Each confidence's bin by the logged ECE's rule (torchmetrics): edges ``torch.linspace(0, 1, n + 1)`` in the
    confidences' own float type, ``[edge_k, edge_k+1)``, 1 in the last bin; so an example on an edge (float32 0.2 of
    15 bins) falls where the logged ``ece`` put it."""
    values = confidences if isinstance(confidences, torch.Tensor) else torch.as_tensor(np.asarray(confidences))
    values = values.detach().cpu().reshape(-1)
    if not values.is_floating_point():
        values = values.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=values.dtype)
    return (torch.bucketize(values, edges, right=True) - 1).clamp(0, n_bins - 1).numpy()


def reliability_bins(confidences: object, correct: object, n_bins: int = 15) -> ReliabilityBins:
    """Bin top-label ``confidences`` in ``[0, 1]`` and the 0/1 ``correct`` flags into ``n_bins`` equal-width bins."""
    conf = as_array(confidences, "confidences").reshape(-1)
    hits = as_array(correct, "correct").reshape(-1)
    if not is_int(n_bins) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    if conf.shape != hits.shape or conf.size == 0:
        raise ValueError(
            f"confidences and correct must be non-empty and of equal length; got {conf.size} and {hits.size}"
        )
    if np.any(~np.isfinite(conf)) or conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError(f"confidences must lie in [0, 1]; got values in [{conf.min()}, {conf.max()}]")
    if not np.all((hits == 0) | (hits == 1)):
        raise ValueError("correct must hold only 0/1 (or False/True) values")
    index = _bin_index(confidences, n_bins)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=hits, minlength=n_bins) / count
        confidence = np.bincount(index, weights=conf, minlength=n_bins) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), accuracy, confidence, count)


def reliability_diagram(
    confidences: object, correct: object, path: str | Path, n_bins: int = 15, title: str = "Reliability"
) -> ReliabilityBins:
    """Save a reliability diagram PNG at ``path`` and return the bins it shows.

    Bars: accuracy per bin; hatched red outline: the gap to the bin's mean confidence, above the bar
    (over-confident) or inside it (under-confident); dashed: perfect calibration. The legend sits below the axes,
    where no bar reaches.
    """
    bins = reliability_bins(confidences, correct, n_bins)
    figure = new_figure()
    axes = figure.add_subplot()
    _draw(axes, bins, f"{title}\n{int(bins.count.sum())} examples, ECE = {bins.ece:.4f}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize="small", frameon=False)
    save(figure, path)
    return bins


def reliability_grid(panels: Mapping[str, ReliabilityBins], path: str | Path, columns: int = 4) -> Path:
    """Reliability diagrams side by side, one panel per name (title: name and ECE), saved as a PNG at ``path``."""
    if not panels:
        raise ValueError("panels must hold at least one name -> ReliabilityBins")
    if not is_int(columns) or columns < 1:
        raise ValueError(f"columns must be a positive integer; got {columns!r}")
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = new_figure(3.2 * columns, 3.0 * rows)
    for index, (name, bins) in enumerate(panels.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        _draw(axes, bins, f"{name}\nECE = {bins.ece:.4f}")
        if index % columns:
            axes.set_ylabel("")
    return save(figure, path)


def _draw(axes: Axes, bins: ReliabilityBins, title: str) -> None:
    left, width = bins.edges[:-1], np.diff(bins.edges)
    filled = bins.count > 0
    axes.bar(
        left[filled],
        bins.accuracy[filled],
        width=width[filled],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="accuracy",
    )
    axes.bar(
        left[filled],
        bins.confidence[filled] - bins.accuracy[filled],
        bottom=bins.accuracy[filled],
        width=width[filled],
        align="edge",
        fill=False,  # a filled gap over an under-confident bin's bar hid where the accuracy ends
        hatch="//",
        edgecolor="tab:red",
        label="gap to confidence",
    )
    axes.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
    axes.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), xlabel="confidence", ylabel="accuracy")
    axes.set_title(title, fontsize="medium")
