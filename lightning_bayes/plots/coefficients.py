"""The posterior of a few interpretable coefficients: marginal histograms, and the joint of the first two."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..checks import is_int
from ._figure import as_array, new_figure, save


def coefficient_posterior(samples: Tensor, names: list[str], path: str | Path, bins: int = 60) -> Path:
    """Write a PNG of posterior ``samples`` ``[S, D]`` of ``D`` named coefficients; return its path."""
    if not is_int(bins) or bins < 1:  # numpy's error named no value
        raise ValueError(f"bins must be an int >= 1; got {bins!r}")
    values = as_array(samples, "samples")
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"samples must be [S, {len(names)}] for names={names!r}; got shape {values.shape}")
    panels = len(names) + (len(names) >= 2)
    figure = new_figure(3.2 * panels, 3.0)
    for index, name in enumerate(names):
        axis = figure.add_subplot(1, panels, index + 1)
        axis.hist(values[:, index], bins=bins, density=True, color="tab:blue", alpha=0.7)
        axis.axvline(0.0, color="black", linewidth=0.8)
        axis.set_xlabel(name)
        axis.set_ylabel("posterior density" if index == 0 else "")
    if len(names) >= 2:
        axis = figure.add_subplot(1, panels, panels)
        axis.scatter(values[:2000, 0], values[:2000, 1], s=2, alpha=0.3, color="tab:blue")
        axis.set_xlabel(names[0])
        axis.set_ylabel(names[1])
        axis.set_title("joint")
    return save(figure, path)
