"""Reliability bins against an explicit loop, the ECE in the diagram against torchmetrics, the PNG on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torchmetrics.functional.classification import binary_calibration_error

from lightning_bayes.plots import ReliabilityBins, reliability_bins, reliability_diagram, reliability_grid


def sample(seed: int = 0, n: int = 500) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.3, 1.0, n)
    confidence[:5] = 1.0  # the closed last bin
    correct = (rng.uniform(size=n) < confidence**2).astype(float)  # overconfident
    return confidence, correct


def test_bins_equal_an_explicit_loop() -> None:
    confidence, correct = sample()
    bins = reliability_bins(torch.from_numpy(confidence), torch.from_numpy(correct), n_bins=10)
    for k in range(10):
        inside = (confidence >= k / 10) & ((confidence < (k + 1) / 10) | ((k == 9) & (confidence == 1.0)))
        assert bins.count[k] == inside.sum()
        if inside.any():
            assert bins.accuracy[k] == pytest.approx(correct[inside].mean(), rel=1e-12)
            assert bins.confidence[k] == pytest.approx(confidence[inside].mean(), rel=1e-12)
        else:
            assert np.isnan(bins.accuracy[k]) and np.isnan(bins.confidence[k])
    assert bins.count.sum() == 500 and bins.count[:3].sum() == 0


def test_diagram_ece_equals_torchmetrics_and_png_is_written(tmp_path: Path) -> None:
    confidence, correct = sample(1)
    confidence[:5] = 0.999  # torchmetrics gives exactly 1.0 a bin of its own; stay below it here
    path = tmp_path / "nested" / "reliability.png"
    bins = reliability_diagram(confidence, correct.astype(bool), path=path)
    expected = binary_calibration_error(torch.from_numpy(confidence), torch.from_numpy(correct).long(), n_bins=15)
    assert bins.ece == pytest.approx(expected.item(), rel=1e-9)
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # something was drawn


@pytest.mark.parametrize("n_bins", [10, 15, 20, 100])
def test_confidences_on_float32_edges_fall_where_the_logged_ece_puts_them(n_bins: int) -> None:
    """Every float32 bin edge as a confidence: the diagram's bins and ECE equal the callback's ExpectedCalibrationError
    on the same float32 values (float32 0.2 of 15 bins went to bin 3 in the diagram and to bin 2 in the ECE)."""
    from lightning_bayes.metrics import ExpectedCalibrationError
    from lightning_bayes.predictive import CategoricalPredictive

    edges = torch.linspace(0, 1, n_bins + 1)[1:-1]  # float32 inner edges
    confidence = torch.cat([edges, edges.clamp_min(0.5)])  # each edge, and top-label confidences (>= 1/2 of 2 classes)
    confidence = confidence[confidence >= 0.5]
    correct = (torch.arange(len(confidence)) % 3 == 0).long()
    bins = reliability_bins(confidence, correct, n_bins=n_bins)
    expected_index = torch.bucketize(confidence, torch.linspace(0, 1, n_bins + 1), right=True) - 1
    assert bins.count.tolist() == torch.bincount(expected_index, minlength=n_bins).double().tolist()
    logits = torch.stack([confidence.log(), (1 - confidence).log()], -1).unsqueeze(0)
    ece = ExpectedCalibrationError(n_bins=n_bins)
    ece.update(CategoricalPredictive(logits), 1 - correct)  # class 0 on top: correct where the label is 0
    stored = torch.cat(ece.confidences)
    assert reliability_bins(stored, torch.cat(ece.accuracies), n_bins=n_bins).ece == pytest.approx(
        ece.compute().item(), rel=1e-5
    )


def test_bins_survive_json_and_the_grid_draws_one_panel_each(tmp_path: Path) -> None:
    bins = reliability_bins(*sample(2), n_bins=10)  # bins 0-2 are empty: NaN <-> None
    restored = ReliabilityBins.from_dict(json.loads(json.dumps(bins.to_dict())))
    assert all(isinstance(c, int) for c in bins.to_dict()["count"])  # examples: 9, not 9.0
    for field in ("edges", "accuracy", "confidence", "count"):
        np.testing.assert_array_equal(getattr(restored, field), getattr(bins, field))
    assert restored.ece == bins.ece
    path = reliability_grid({"a": bins, "b": reliability_bins(*sample(3)), "c": restored}, tmp_path / "grid.png", columns=2)
    image = imread(path)
    reliability_diagram(*sample(2), path=tmp_path / "one.png")
    single = imread(tmp_path / "one.png")
    assert image.shape[0] > 1.4 * single.shape[0]  # two rows of 3-inch panels against one 4-inch figure
    with pytest.raises(ValueError, match="at least one"):
        reliability_grid({}, tmp_path / "empty.png")


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        reliability_bins(np.array([0.5, 1.5]), np.array([1, 0]))
    with pytest.raises(ValueError, match="equal length"):
        reliability_bins(np.array([0.5, 0.6]), np.array([1]))
    with pytest.raises(ValueError, match="only 0/1"):
        reliability_bins(np.array([0.5]), np.array([0.5]))
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        reliability_bins(np.array([0.5]), np.array([1]), n_bins=0)
    with pytest.raises(ValueError, match="must end in .png"):
        reliability_diagram(np.array([0.5]), np.array([1]), path=tmp_path / "plot.pdf")


def test_integer_confidences_are_binned_as_numbers() -> None:
    """0/1 confidences (an integer array) fall in the first and the last bin, not against integer edges."""
    bins = reliability_bins(np.array([0, 1, 1]), [0, 1, 1], n_bins=10)
    assert bins.count.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]


def test_a_bin_of_one_example_counts_in_the_ece() -> None:
    """Two examples, each alone in its bin: ECE = mean |correct - confidence| = (0.9 + 0.7) / 2."""
    bins = reliability_bins(np.array([0.95, 0.35]), np.array([0, 1]), n_bins=10)
    assert bins.count.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    assert bins.ece == pytest.approx((0.95 + 0.65) / 2, rel=1e-12)


def _drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plots module saves, kept for reading back what was drawn."""
    from lightning_bayes.plots import reliability

    figures: list = []
    original = reliability.save
    monkeypatch.setattr(reliability, "save", lambda figure, path: figures.append(figure) or original(figure, path))
    return figures


def test_the_diagram_draws_each_filled_bin_its_gap_and_the_diagonal(tmp_path: Path, monkeypatch) -> None:
    """Read back from the figure: an accuracy bar per filled bin (one example is enough) over the bin's edges, a gap
    bar from the accuracy up to the bin's mean confidence, the diagonal from (0, 0) to (1, 1), the unit square."""
    figures = _drawn(monkeypatch)
    bins = reliability_diagram(np.array([0.95, 0.92, 0.35]), np.array([0, 1, 1]), tmp_path / "one.png", n_bins=10)
    np.testing.assert_allclose(bins.edges, np.arange(11) / 10, rtol=0, atol=1e-15)
    axes = figures[0].axes[0]
    accuracy, gap = axes.containers

    def rectangles(bars) -> np.ndarray:  # x, width, bottom, height of each bar
        return np.array([(bar.get_x(), bar.get_width(), bar.get_y(), bar.get_height()) for bar in bars])

    np.testing.assert_allclose(rectangles(accuracy), [(0.3, 0.1, 0.0, 1.0), (0.9, 0.1, 0.0, 0.5)], atol=1e-12)
    np.testing.assert_allclose(rectangles(gap), [(0.3, 0.1, 1.0, 0.35 - 1.0), (0.9, 0.1, 0.5, 0.435)], atol=1e-12)
    # the under-confident bin's gap lies inside its accuracy bar: an outline, so the bar still shows where it ends
    assert not any(bar.get_fill() for bar in gap)
    legend = axes.get_legend()  # below the axes, where no bar reaches (upper left covered under-confident bars)
    figures[0].canvas.draw()
    assert 0 <= legend.get_window_extent().y0 and legend.get_window_extent().y1 < axes.get_window_extent().y0
    assert axes.get_title() == "Reliability\n3 examples, ECE = 0.5067"  # (0.65 + 2 x 0.435) / 3
    (diagonal,) = axes.lines
    np.testing.assert_array_equal(diagonal.get_xydata(), [[0.0, 0.0], [1.0, 1.0]])
    assert axes.get_xlim() == (0.0, 1.0) and axes.get_ylim() == (0.0, 1.0)


def test_the_grid_fills_rows_of_columns_panels_of_3_2_by_3_inches(tmp_path: Path, monkeypatch) -> None:
    figures = _drawn(monkeypatch)
    panels = {name: reliability_bins(*sample(seed)) for seed, name in enumerate("abc")}
    reliability_grid(panels, tmp_path / "grid.png", columns=2)
    reliability_grid(dict(list(panels.items())[:2]), tmp_path / "row.png", columns=4)  # 2 panels: one row of 2
    assert imread(tmp_path / "grid.png").shape[:2] == (720, 768)  # 120 dpi, 2 rows x 2 columns of 3 x 3.2 inches
    assert imread(tmp_path / "row.png").shape[:2] == (360, 768)
    grid, row = ([axes.get_subplotspec().get_geometry() for axes in figure.axes] for figure in figures)
    assert grid == [(2, 2, 0, 0), (2, 2, 1, 1), (2, 2, 2, 2)] and row == [(1, 2, 0, 0), (1, 2, 1, 1)]
    assert [axes.get_title().split("\n")[0] for axes in figures[0].axes] == ["a", "b", "c"]
