"""Curves in parameter space between trained solutions: Bezier, polychain and segmented Bezier curves.

A curve with control points ``theta_0, ..., theta_K`` is ``theta(t) = sum_k c_k(t) theta_k`` for
``t in [0, 1]``; only the coefficients ``c(t)`` differ between curve types:

* Bezier of degree ``n``: Bernstein polynomials ``c_k(t) = C(n, k) t^k (1 - t)^(n - k)`` (Garipov et al., 2018,
  "Loss surfaces, mode connectivity, and fast ensembling of DNNs");
* segmented Bezier with ``M`` segments of degree ``n`` (``K = M n``): the global ``t`` falls in segment
  ``m = min(floor(t M), M - 1)`` at local ``s = t M - m``, whose Bezier runs over the points
  ``m n, ..., m n + n``; the junctions ``theta_{m n}`` are the anchors (LoRA-Curve, Dold et al., 2026);
* polychain through ``n + 1`` points: ``c_k(t) = max(0, 1 - |t n - k|)``, the segmented curve of degree 1.

Coefficients are float64 tensors ``[T, K + 1]`` for a batch of ``T`` values of ``t`` (non-negative,
summing to one); they are exact one-hot vectors at ``t = 0``, ``t = 1`` and at the junctions.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ..checks import is_int


def _as_times(t: float | Tensor) -> Tensor:
    times = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if times.numel() == 0 or not bool(((times >= 0.0) & (times <= 1.0)).all()):
        raise ValueError(f"t must hold values in [0, 1]; got {times.tolist()[:8]}")
    return times


def _check_positive(name: str, value: int) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _bernstein(s: Tensor, degree: int) -> Tensor:
    k = torch.arange(degree + 1, dtype=torch.float64)
    binomials = torch.tensor([math.comb(degree, j) for j in range(degree + 1)], dtype=torch.float64)
    return binomials * s.unsqueeze(-1) ** k * (1.0 - s.unsqueeze(-1)) ** (degree - k)  # 0 ** 0 = 1


def bernstein(t: float | Tensor, degree: int) -> Tensor:
    """Bernstein coefficients ``C(n, k) t^k (1 - t)^(n - k)``, ``[T, n + 1]``, of a Bezier curve of degree ``n``."""
    _check_positive("degree", degree)
    return _bernstein(_as_times(t), degree)


def _segment(t: float | Tensor, segments: int) -> tuple[Tensor, Tensor]:
    times = _as_times(t)
    index = torch.clamp(torch.floor(times * segments), max=segments - 1).long()
    return index, times * segments - index


def segmented_bezier(t: float | Tensor, degree: int, segments: int) -> Tensor:
    """Coefficients ``[T, M n + 1]`` of ``M`` Bezier segments of degree ``n`` joined at shared anchors."""
    _check_positive("degree", degree)
    _check_positive("segments", segments)
    index, local = _segment(t, segments)
    coefficients = torch.zeros(index.numel(), segments * degree + 1, dtype=torch.float64)
    columns = index.unsqueeze(-1) * degree + torch.arange(degree + 1)
    return coefficients.scatter(1, columns, _bernstein(local, degree))


def polychain(t: float | Tensor, num_points: int) -> Tensor:
    """Piecewise-linear coefficients ``max(0, 1 - |t n - k|)`` through ``num_points = n + 1`` points."""
    if not is_int(num_points) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2; got {num_points!r}")
    return segmented_bezier(t, 1, num_points - 1)


def straight_line(t: float | Tensor, num_points: int) -> Tensor:
    """Coefficients ``[T, num_points]`` of the straight line ``(1 - t) theta_0 + t theta_K`` between a
    curve's first and last control point (the interior points get weight 0)."""
    if not is_int(num_points) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2; got {num_points!r}")
    times = _as_times(t)
    coefficients = torch.zeros(times.numel(), num_points, dtype=torch.float64)
    coefficients[:, 0] = 1.0 - times
    coefficients[:, -1] = times
    return coefficients


def linear_initialisation(anchors: list[Tensor], degree: int) -> list[Tensor]:
    """All ``M n + 1`` control points from the ``M + 1`` anchors: the interior points of segment ``m`` lie on
    the line between its anchors, ``theta_{m n + j} = (1 - j/n) a_m + (j/n) a_{m + 1}`` (Garipov et al.)."""
    _check_positive("degree", degree)
    if len(anchors) < 2:
        raise ValueError(f"anchors must hold at least 2 tensors (the endpoints); got {len(anchors)}")
    shapes = {tuple(a.shape) for a in anchors}
    if len(shapes) != 1:
        raise ValueError(f"anchors must share one shape; got {sorted(shapes)}")
    points = [anchors[0].clone()]
    for left, right in itertools.pairwise(anchors):
        points.extend(torch.lerp(left, right, j / degree) for j in range(1, degree))
        points.append(right.clone())
    return points
