"""The coefficient posterior PNG: a density histogram per coefficient with its zero line, then the joint of the
first two, read back from the figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lightning_bayes.plots import coefficient_posterior


def _drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    from lightning_bayes.plots import coefficients

    figures: list = []
    original = coefficients.save
    monkeypatch.setattr(coefficients, "save", lambda figure, path: figures.append(figure) or original(figure, path))
    return figures


def posterior_samples(draws: int = 3000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(draws, 3, generator=generator, dtype=torch.float64)
    return noise * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + torch.tensor([3.0, -1.0, 0.0])


def test_a_histogram_per_coefficient_then_the_joint_of_the_first_two(tmp_path: Path, monkeypatch) -> None:
    figures = _drawn(monkeypatch)
    samples, names = posterior_samples(), ["age", "bmi", "bp"]
    path = coefficient_posterior(samples, names, tmp_path / "coefficients.png", bins=30)
    assert imread(path).shape[:2] == (360, 1536)  # 120 dpi, 4 panels of 3.2 x 3 inches
    figure = figures[0]
    assert [axes.get_subplotspec().get_geometry() for axes in figure.axes] == [(1, 4, k, k) for k in range(4)]
    for index, (axes, name) in enumerate(zip(figure.axes, names)):
        density, _ = np.histogram(samples[:, index].numpy(), bins=30, density=True)
        np.testing.assert_allclose([bar.get_height() for bar in axes.patches], density, rtol=1e-12)
        (zero,) = axes.lines
        assert list(zero.get_xdata()) == [0.0, 0.0]  # is the coefficient away from 0?
        assert axes.get_xlabel() == name and axes.get_ylabel() == ("posterior density" if index == 0 else "")
    joint = figure.axes[3]
    np.testing.assert_array_equal(joint.collections[0].get_offsets(), samples[:2000, :2].numpy())
    assert (joint.get_xlabel(), joint.get_ylabel(), joint.get_title()) == ("age", "bmi", "joint")


def test_two_coefficients_have_a_joint_panel_and_one_has_none(tmp_path: Path, monkeypatch) -> None:
    figures = _drawn(monkeypatch)
    coefficient_posterior(posterior_samples()[:, :2], ["a", "b"], tmp_path / "two.png")
    coefficient_posterior(posterior_samples()[:, :1], ["a"], tmp_path / "one.png")
    two, one = ([axes.get_subplotspec().get_geometry() for axes in figure.axes] for figure in figures)
    assert two == [(1, 3, 0, 0), (1, 3, 1, 1), (1, 3, 2, 2)] and figures[0].axes[2].get_title() == "joint"
    assert one == [(1, 1, 0, 0)]


@pytest.mark.parametrize("bins", [0, 2.5, "60"])
def test_a_bin_count_that_is_not_a_positive_int_is_refused_by_name(tmp_path: Path, bins: object) -> None:
    """bins=0 failed in numpy ("`bins` must be positive, when an integer"), naming no value."""
    with pytest.raises(ValueError, match=rf"bins must be an int >= 1; got {bins!r}"):
        coefficient_posterior(posterior_samples()[:, :2], ["a", "b"], tmp_path / "bad.png", bins=bins)  # type: ignore


def test_many_coefficients_wrap_four_panels_a_row(tmp_path: Path, monkeypatch) -> None:
    """Twelve coefficients made one 13-panel row, 4,992 pixels wide."""
    figures = _drawn(monkeypatch)
    samples = torch.randn(500, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    path = coefficient_posterior(samples, [f"c{k}" for k in range(12)], tmp_path / "many.png")
    assert imread(path).shape[:2] == (1440, 1536)  # 4 rows x 4 columns of 3 x 3.2 inches at 120 dpi
    geometry = [axes.get_subplotspec().get_geometry() for axes in figures[0].axes]
    assert geometry == [(4, 4, k, k) for k in range(13)] and figures[0].axes[12].get_title() == "joint"
    assert [axes.get_ylabel() for axes in figures[0].axes[:5]] == ["posterior density", "", "", "", "posterior density"]


def test_samples_with_a_non_finite_value_are_left_out_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    """One infinite sample made numpy's histogram fail ("range ... is not finite"), after CoefficientPosterior had
    written coefficients.json, so the test stage failed."""
    figures = _drawn(monkeypatch)
    samples = posterior_samples(200)
    samples[7, 1] = float("inf")
    with pytest.warns(UserWarning, match="1 of 200 samples hold a non-finite value"):
        coefficient_posterior(samples, ["a", "b", "c"], tmp_path / "inf.png", bins=10)
    kept = torch.cat([samples[:7], samples[8:]])
    density, _ = np.histogram(kept[:, 0].numpy(), bins=10, density=True)
    np.testing.assert_allclose([bar.get_height() for bar in figures[0].axes[0].patches], density, rtol=1e-12)
    with pytest.raises(ValueError, match="every one of the 2 samples holds a non-finite value"):
        coefficient_posterior(torch.full((2, 2), float("nan")), ["a", "b"], tmp_path / "nan.png")
