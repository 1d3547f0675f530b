"""The posterior of a few interpretable coefficients: marginal histograms, and the joint of the first two."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from torch import Tensor

from ..checks import is_int
from ._figure import as_array, new_figure, save


_COLUMNS = 4  # panels a row: twelve coefficients in one row made a 5,000-pixel strip


def coefficient_posterior(samples: Tensor, names: list[str], path: str | Path, bins: int = 60) -> Path:
    """Write a PNG of posterior ``samples`` ``[S, D]`` of ``D`` named coefficients, four panels a row; return its path.
    Samples with a non-finite value are left out, with a warning saying how many (numpy's histogram refused them)."""
    if not is_int(bins) or bins < 1:  # numpy's error named no value
        raise ValueError(f"bins must be an int >= 1; got {bins!r}")
    values = as_array(samples, "samples")
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"samples must be [S, {len(names)}] for names={names!r}; got shape {values.shape}")
    finite = np.isfinite(values).all(axis=1)
    if not finite.any():
        raise ValueError(f"every one of the {len(values)} samples holds a non-finite value; nothing to draw")
    if not finite.all():
        warnings.warn(
            f"coefficient_posterior: {int((~finite).sum())} of {len(values)} samples hold a non-finite value and are "
            "left out of the figure",
            stacklevel=2,
        )
        values = values[finite]
    panels = len(names) + (len(names) >= 2)
    columns = min(panels, _COLUMNS)
    rows = math.ceil(panels / columns)
    figure = new_figure(3.2 * columns, 3.0 * rows)
    for index, name in enumerate(names):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.hist(values[:, index], bins=bins, density=True, color="tab:blue", alpha=0.7)
        axis.axvline(0.0, color="black", linewidth=0.8)
        axis.set_xlabel(name)
        axis.set_ylabel("posterior density" if index % columns == 0 else "")
    if len(names) >= 2:
        axis = figure.add_subplot(rows, columns, panels)
        axis.scatter(values[:2000, 0], values[:2000, 1], s=2, alpha=0.3, color="tab:blue")
        axis.set_xlabel(names[0])
        axis.set_ylabel(names[1])
        axis.set_title("joint")
    return save(figure, path)
