"""Predictive bands of a 1-D regression: the data, the predictive mean and central 50% / 90% intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..predictive import GaussianPredictive
from ._figure import as_array, new_figure, save


_Z90 = 1.6448536269514722  # the standard normal's 95% quantile: a central 90% band


def predictive_band(
    x_1d: object,
    y: object,
    predictive_on_grid: GaussianPredictive,
    grid: object,
    path: str | Path,
    title: str = "Posterior predictive",
    xlabel: str = "x",
    ylabel: str = "y",
) -> Path:
    """Save a PNG of the data ``(x_1d, y)`` and the predictive's mean and 50% / 90% bands over ``grid``.

    ``predictive_on_grid`` is the :class:`GaussianPredictive` at the G grid points (one output, D = 1);
    the bands are the marginal mixture quantiles 5-95% and 25-75%, and (where the predictive has any) the epistemic
    part alone, ``mean +- 1.645 sqrt(epistemic_variance)``. ``x_1d`` and ``grid`` hold one input each.
    """
    if not isinstance(predictive_on_grid, GaussianPredictive):
        raise TypeError(f"predictive_on_grid must be a GaussianPredictive; got {type(predictive_on_grid).__name__}")
    xs, ys, grid_x = as_array(x_1d, "x_1d"), as_array(y, "y").reshape(-1), as_array(grid, "grid")
    for name, values in (("x_1d", xs), ("grid", grid_x)):
        if values.ndim > 1 and values.size != values.shape[0]:
            raise ValueError(f"{name} must hold one input per point; got shape {values.shape}")
    xs, grid_x = xs.reshape(-1), grid_x.reshape(-1)
    if xs.shape != ys.shape:
        raise ValueError(f"x_1d and y must have equal length; got {xs.size} and {ys.size}")
    num_grid, outputs = predictive_on_grid.mean_samples.shape[1:]
    if outputs != 1 or num_grid != grid_x.size:
        raise ValueError(
            f"predictive_on_grid must have batch = len(grid) = {grid_x.size} and one output; "
            f"got batch {num_grid} and {outputs} outputs"
        )
    order = np.argsort(grid_x)
    grid_x = grid_x[order]

    def on_grid(values: object, name: str) -> np.ndarray:
        return as_array(values, name).reshape(-1)[order]

    figure = new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    for low, high, alpha in ((0.05, 0.95, 0.2), (0.25, 0.75, 0.35)):
        axes.fill_between(
            grid_x,
            on_grid(predictive_on_grid.quantile(low), "quantile"),
            on_grid(predictive_on_grid.quantile(high), "quantile"),
            color="tab:blue",
            alpha=alpha,
            linewidth=0,
            label=f"{round(100 * (high - low))}% interval",
        )
    mean = on_grid(predictive_on_grid.mean, "mean")
    epistemic = on_grid(predictive_on_grid.epistemic_variance.sqrt(), "epistemic sd")
    if np.any(epistemic > 0):  # a point estimate (MAP) has none to draw
        axes.fill_between(
            grid_x,
            mean - _Z90 * epistemic,
            mean + _Z90 * epistemic,
            color="tab:orange",
            alpha=0.45,
            linewidth=0,
            label="90% epistemic (mean ± 1.645 sd)",
        )
    axes.plot(grid_x, mean, color="tab:blue", label="predictive mean")
    axes.scatter(xs, ys, s=10, color="black", alpha=0.7, label="test data", zorder=3)
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.legend(loc="best", fontsize="small", framealpha=0.8)
    return save(figure, path)
