"""The 1-D predictive band plot: a PNG with the data and bands, clear errors on mismatched inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lightning_bayes.plots import predictive_band
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive


def band_inputs() -> tuple[torch.Tensor, torch.Tensor, GaussianPredictive, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(40, generator=generator) * 4 - 2
    y = torch.sin(x) + 0.2 * torch.randn(40, generator=generator)
    grid = torch.linspace(-2.5, 2.5, 100)
    mean = torch.stack([torch.sin(grid), torch.sin(grid) + 0.3]).unsqueeze(-1)  # two components
    return x, y, GaussianPredictive(mean, torch.full_like(mean, 0.04) * (1 + grid.abs()).unsqueeze(-1)), grid


def test_band_png_is_written(tmp_path: Path) -> None:
    x, y, predictive, grid = band_inputs()
    path = predictive_band(x.numpy(), y, predictive, grid.flip(0), path=tmp_path / "band.png")  # grid order is free
    image = imread(path)
    assert path == tmp_path / "band.png" and image.ndim == 3 and image[..., :3].std() > 0.05


def test_mismatched_inputs_are_clear_errors(tmp_path: Path) -> None:
    x, y, predictive, grid = band_inputs()
    with pytest.raises(ValueError, match="batch = len\\(grid\\) = 99"):
        predictive_band(x, y, predictive, grid[:99], path=tmp_path / "band.png")
    with pytest.raises(ValueError, match="x_1d and y must have equal length; got 40 and 39"):
        predictive_band(x, y[:39], predictive, grid, path=tmp_path / "band.png")
    with pytest.raises(TypeError, match="must be a GaussianPredictive"):
        predictive_band(x, y, CategoricalPredictive(torch.zeros(1, 100, 2)), grid, path=tmp_path / "band.png")
    two_outputs = GaussianPredictive(torch.zeros(1, 100, 2), torch.ones(1, 100, 2))
    with pytest.raises(ValueError, match="one output"):
        predictive_band(x, y, two_outputs, np.asarray(grid), path=tmp_path / "band.png")


def test_the_bands_drawn_are_the_mixtures_5_95_and_25_75_quantiles(tmp_path: Path, monkeypatch) -> None:
    """The filled areas' edges, read back from the figure, are the mixture's quantiles on the sorted grid."""
    from lightning_bayes.plots import regression

    figures = []
    original = regression.save
    monkeypatch.setattr(regression, "save", lambda figure, path: figures.append(figure) or original(figure, path))
    x, y, predictive, grid = band_inputs()
    predictive_band(x, y, predictive, grid, path=tmp_path / "band.png")
    outer, inner = figures[0].axes[0].collections[:2]
    for band, (low, high) in ((outer, (0.05, 0.95)), (inner, (0.25, 0.75))):
        vertices = band.get_paths()[0].vertices  # start, lower edge, then back along the upper one
        lower = vertices[1 : len(grid) + 1, 1]
        upper = vertices[len(grid) + 2 : 2 * len(grid) + 2, 1][::-1]
        np.testing.assert_allclose(lower, predictive.quantile(low).reshape(-1).numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(upper, predictive.quantile(high).reshape(-1).numpy(), rtol=0, atol=1e-6)


def test_the_epistemic_band_is_the_means_spread_alone_and_a_point_estimate_has_none(tmp_path: Path, monkeypatch):
    """The 5-95% band of a homoscedastic fit is mostly noise (mcycle: sd 22 g of 23): the epistemic part is drawn
    on its own, mean +- 1.645 sd of the components' means; one component (MAP) draws the two quantile bands only."""
    from lightning_bayes.plots import regression

    figures = []
    original = regression.save
    monkeypatch.setattr(regression, "save", lambda figure, path: figures.append(figure) or original(figure, path))
    x, y, predictive, grid = band_inputs()
    predictive_band(x, y, predictive, grid, path=tmp_path / "band.png")
    vertices = figures[0].axes[0].collections[2].get_paths()[0].vertices
    mean = predictive.mean.reshape(-1).numpy().astype(np.float64)
    sd = predictive.mean_samples.std(0, unbiased=False).reshape(-1).numpy()  # 0.15 everywhere: two means 0.3 apart
    np.testing.assert_allclose(sd, 0.15, rtol=1e-5)
    np.testing.assert_allclose(vertices[1 : len(grid) + 1, 1], mean - 1.6448536 * sd, rtol=0, atol=1e-5)
    np.testing.assert_allclose(vertices[len(grid) + 2 : 2 * len(grid) + 2, 1][::-1], mean + 1.6448536 * sd, atol=1e-5)
    point = GaussianPredictive(predictive.mean_samples[:1], predictive.variance_samples[:1])
    predictive_band(x, y, point, grid, path=tmp_path / "point.png")
    assert len(figures[1].axes[0].collections) == 3  # the two bands and the data
