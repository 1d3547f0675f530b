"""The loss-along-curve PNG: one panel per quantity, the straight line drawn only when given, bad input named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lightning_bayes.plots.curve import loss_along_curve

T = torch.linspace(0, 1, 11)
CURVE = 0.05 + 0.01 * torch.sin(np.pi * T)
LINE = 0.05 + 1.5 * torch.sin(np.pi * T) ** 2


def _has_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    pixels = (image[..., :3] * 255).round().astype(int)
    return bool((np.abs(pixels - np.array(rgb)).sum(-1) <= 6).any())


BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two cycle colours: curve, line


def test_two_panels_with_the_line_and_one_without(tmp_path: Path) -> None:
    both = loss_along_curve(T, CURVE, tmp_path / "both.png", curve_error=CURVE / 5, line_nll=LINE, line_error=LINE / 3)
    alone = loss_along_curve(T.numpy(), CURVE.tolist(), tmp_path / "alone.png")
    wide, narrow = imread(both), imread(alone)
    assert wide.shape[:2] == (480, 1200) and narrow.shape[:2] == (480, 600)  # 120 dpi, 5 x 4 inches per panel
    assert _has_colour(wide, BLUE) and _has_colour(wide, ORANGE)
    assert _has_colour(narrow, BLUE) and not _has_colour(narrow, ORANGE)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"t": [0.0, 0.5, 0.4]}, "t must hold at least 2 increasing finite values"),
        ({"curve_nll": [1.0, 2.0]}, r"curve_nll must have one value per t \(11\); got 2"),
        ({"line_nll": np.ones(3)}, r"line_nll must have one value per t \(11\); got 3"),
        ({"line_error": np.ones(11)}, "line_error needs curve_error"),
        ({"path": "plot.jpg"}, "path must end in .png"),
    ],
)
def test_bad_input_is_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"t": T, "curve_nll": CURVE, "path": tmp_path / "x.png", **kwargs}
    with pytest.raises(ValueError, match=message):
        loss_along_curve(**arguments)


def test_each_panel_spans_t_from_its_first_to_its_last_value(tmp_path: Path, monkeypatch) -> None:
    """The curve's endpoints (the two trained networks) are inside the plotted range, not cut off."""
    from lightning_bayes.plots import curve

    figures = []
    original = curve.save
    monkeypatch.setattr(curve, "save", lambda figure, path: figures.append(figure) or original(figure, path))
    t = torch.linspace(-0.25, 1.25, 7)
    loss_along_curve(t, torch.ones(7), tmp_path / "x.png", curve_error=torch.zeros(7))
    assert [axes.get_xlim() for axes in figures[0].axes] == [(-0.25, 1.25)] * 2


def test_a_non_finite_loss_is_said_not_dropped_silently(tmp_path: Path) -> None:
    """matplotlib leaves a gap at an infinite NLL, which looks like a curve without a barrier there."""
    line = LINE.clone()
    line[5] = float("inf")
    with pytest.warns(UserWarning, match="line_nll is not finite at 1 of"):
        loss_along_curve(T, CURVE, tmp_path / "inf.png", line_nll=line)
