"""Loss along a curve in parameter space against the straight line between its endpoints.

The picture of mode connectivity (Garipov et al., 2018; Draxler et al., 2018): two independently trained
networks joined by a straight line show a loss barrier in between, a trained curve does not. Left panel:
NLL against ``t``; right panel (when given): error rate against ``t``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ._figure import as_array, new_figure, save


def _values(value: object, name: str, length: int) -> np.ndarray:
    array = as_array(value, name).reshape(-1)
    if array.size != length:
        raise ValueError(f"{name} must have one value per t ({length}); got {array.size}")
    if not np.isfinite(array).all():  # matplotlib leaves a gap there, which could hide a barrier
        warnings.warn(
            f"loss_along_curve: {name} is not finite at {int((~np.isfinite(array)).sum())} of {length} values of t "
            "(drawn as gaps)",
            stacklevel=3,
        )
    return array


def loss_along_curve(
    t: object,
    curve_nll: object,
    path: str | Path,
    curve_error: object | None = None,
    line_nll: object | None = None,
    line_error: object | None = None,
) -> Path:
    """Save the NLL (and error, when ``curve_error`` is given) along the curve and, when given, along the
    straight line at the same ``t`` as a PNG at ``path``; return the path."""
    grid = as_array(t, "t").reshape(-1)
    if grid.size < 2 or np.any(~np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise ValueError(f"t must hold at least 2 increasing finite values; got {grid.tolist()[:8]}")
    if line_error is not None and curve_error is None:
        raise ValueError("line_error needs curve_error (the error panel shows both)")
    panels = [("NLL", " (nats per example)", curve_nll, line_nll, "curve_nll", "line_nll")]
    if curve_error is not None:
        panels.append(("error rate", "", curve_error, line_error, "curve_error", "line_error"))
    figure = new_figure(width=5.0 * len(panels), height=4.0)
    for index, (label, unit, curve, line, curve_name, line_name) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        axes.plot(
            grid,
            _values(curve, curve_name, grid.size),
            marker="o",
            markersize=3,
            label="curve",
        )
        if line is not None:
            axes.plot(
                grid,
                _values(line, line_name, grid.size),
                linestyle="--",
                marker="s",
                markersize=3,
                label="line",
            )
        axes.set(xlabel="t", ylabel=label + unit, xlim=(grid[0], grid[-1]))
        axes.set_title(f"{label} along the curve")
        axes.legend(loc="best")
    return save(figure, path)
