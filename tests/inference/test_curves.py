"""Curve coefficients, the parametrisation of a network's tensors along a curve, and the JS divergence."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_bayes.inference.curve_parametrization import CurvePosition, register_curve, remove_curve
from lightning_bayes.inference.curves import (
    bernstein,
    linear_initialisation,
    polychain,
    segmented_bezier,
    straight_line,
)
from lightning_bayes.inference.jensen_shannon import jensen_shannon
from lightning_bayes.predictive import CategoricalPredictive

GRID = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
COEFFICIENTS = {
    "bezier-1": lambda t: bernstein(t, 1),
    "bezier-2": lambda t: bernstein(t, 2),
    "bezier-5": lambda t: bernstein(t, 5),
    "polychain-4": lambda t: polychain(t, 4),
    "segmented-3x2": lambda t: segmented_bezier(t, 2, 3),
    "segmented-2x3": lambda t: segmented_bezier(t, 3, 2),
    "line-5": lambda t: straight_line(t, 5),
}


@pytest.mark.parametrize("name", COEFFICIENTS)
def test_coefficients_are_a_partition_of_unity(name):
    c = COEFFICIENTS[name](GRID)
    assert c.dtype == torch.float64 and c.shape[0] == 1001
    assert bool((c >= 0).all())
    torch.testing.assert_close(c.sum(1), torch.ones(1001, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", COEFFICIENTS)
def test_endpoints_are_one_hot_exactly(name):
    c = COEFFICIENTS[name](torch.tensor([0.0, 1.0]))
    first, last = torch.zeros(c.shape[1], dtype=torch.float64), torch.zeros(c.shape[1], dtype=torch.float64)
    first[0], last[-1] = 1.0, 1.0
    assert torch.equal(c[0], first) and torch.equal(c[1], last)


def test_quadratic_bezier_midpoint_is_quarter_half_quarter():
    torch.testing.assert_close(
        bernstein(0.5, 2)[0], torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_bernstein_matches_the_binomial_formula():
    t, n = GRID[::50], 4
    expected = torch.stack([math.comb(n, k) * t**k * (1 - t) ** (n - k) for k in range(n + 1)], dim=1)
    torch.testing.assert_close(bernstein(t, n), expected, rtol=0, atol=1e-15)


def test_polychain_passes_through_its_knots_exactly():
    n = 4
    knots = torch.arange(n + 1, dtype=torch.float64) / n
    assert torch.equal(polychain(knots, n + 1), torch.eye(n + 1, dtype=torch.float64))
    torch.testing.assert_close(  # halfway between knots 1 and 2: the mean of those two points
        polychain(0.375, n + 1)[0], torch.tensor([0, 0.5, 0.5, 0, 0], dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_segmented_curve_is_continuous_and_passes_through_the_anchors():
    degree, segments = 2, 3
    torch.manual_seed(0)
    points = torch.randn(segments * degree + 1, 7, dtype=torch.float64)
    junctions = torch.arange(segments + 1, dtype=torch.float64) / segments
    at_junctions = segmented_bezier(junctions, degree, segments) @ points
    assert torch.equal(at_junctions, points[::degree])
    eps = 1e-15  # the curve moves by about |theta'| eps ~ 1e-14 within eps of a junction
    for side in (-eps, eps):
        near = segmented_bezier(junctions[1:-1] + side, degree, segments) @ points
        torch.testing.assert_close(near, points[degree:-1:degree], rtol=0, atol=1e-12)


def test_linear_initialisation_is_collinear_and_keeps_the_anchors():
    torch.manual_seed(1)
    start, end = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    points = torch.stack([p.reshape(-1) for p in linear_initialisation([start, end], 4)])
    assert torch.equal(points[0], start.reshape(-1)) and torch.equal(points[-1], end.reshape(-1))
    centred = points - points.mean(0)
    singular = torch.linalg.svdvals(centred)
    assert singular[1:].max() < 1e-12 * singular[0]  # the residual of the best rank-1 fit
    torch.testing.assert_close(points[1], 0.75 * points[0] + 0.25 * points[-1], rtol=0, atol=1e-15)


def test_linear_initialisation_of_segments_runs_through_each_anchor():
    anchors = [torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([-2.0])]
    points = linear_initialisation(anchors, 2)
    assert [float(p) for p in points] == [0.0, 1.0, 2.0, 0.0, -2.0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bernstein(1.5, 2), "t must hold values in"),
        (lambda: bernstein(0.5, 0), "degree must be a positive integer"),
        (lambda: segmented_bezier(0.5, 2, 0), "segments must be a positive integer"),
        (lambda: polychain(0.5, 1), "num_points must be an integer >= 2"),
        (lambda: linear_initialisation([torch.zeros(2)], 2), "anchors must hold at least 2"),
        (lambda: linear_initialisation([torch.zeros(2), torch.zeros(3)], 2), "anchors must share one shape"),
        (lambda: CurvePosition(3).set([1.0, 0.0]), "coefficients must have 3 entries"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- the parametrisation ---------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _curve_on(net: nn.Module, trainable=(False, True, False)):
    names = ["0.weight", "2.bias"]
    points = {n: [torch.randn_like(net.get_parameter(n)) for _ in range(3)] for n in names}
    position = CurvePosition(3)
    curves = register_curve(net, points, trainable, position)
    return names, points, position, curves


def test_parametrised_tensors_follow_the_curve_and_leave_the_rest_alone(single_thread):
    net = _net()
    other = net[2].weight.detach().clone()
    names, points, position, _ = _curve_on(net)
    for name in names:  # a new curve starts at its start point, t = 0
        assert torch.equal(_value(net, name), points[name][0])
    for t in (0.0, 0.3, 1.0):
        position.set(bernstein(t, 2)[0])
        c = bernstein(t, 2)[0]
        for name in names:
            expected = sum(float(c[k]) * points[name][k] for k in range(3))
            torch.testing.assert_close(_value(net, name), expected)
    position.set(bernstein(0.0, 2)[0])
    assert torch.equal(_value(net, "0.weight"), points["0.weight"][0])
    position.set(bernstein(1.0, 2)[0])
    assert torch.equal(_value(net, "2.bias"), points["2.bias"][2])
    assert torch.equal(net[2].weight, other) and not parametrize.is_parametrized(net[2], "weight")


def _value(net: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attribute = name.rpartition(".")
    return getattr(net.get_submodule(module_name), attribute)


def test_gradients_reach_only_the_trainable_control_points(single_thread):
    net = _net()
    names, _points, position, curves = _curve_on(net)
    t = 0.3
    c = bernstein(t, 2)[0]
    position.set(c)
    x = torch.randn(5, 3, dtype=torch.float64)
    net(x).square().sum().backward()
    for name in names:
        curve = curves[name]
        assert [n for n, _ in curve.named_parameters()] == ["point_1"]
        assert {n for n, _ in curve.named_buffers()} == {"point_0", "point_2"}
        owner = net.get_submodule(name.rpartition(".")[0])
        assert owner.parametrizations[name.rpartition(".")[2]].original.grad is None
    # d loss / d theta_1 = c_1(t) d loss / d theta(t): compare with the plain network at theta(t)
    plain = _net()
    with torch.no_grad():
        for name in names:
            _value(plain, name).copy_(_value(net, name))
    plain(x).square().sum().backward()
    for name in names:
        torch.testing.assert_close(curves[name].point_1.grad, float(c[1]) * _value(plain, name).grad)
    assert net[2].weight.grad is not None  # a parameter off the curve trains as before


def test_remove_bakes_theta_t_into_plain_tensors(single_thread):
    net = _net()
    original = net[0].weight
    names, _points, position, _ = _curve_on(net)
    assert not original.requires_grad  # frozen while the curve is registered
    position.set(bernstein(0.25, 2)[0])
    expected = {name: _value(net, name).detach().clone() for name in names}
    remove_curve(net, names)
    assert not parametrize.is_parametrized(net)
    assert net[0].weight is original and original.requires_grad
    assert sorted(dict(net.named_parameters())) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name in names:
        assert torch.equal(_value(net, name), expected[name])


def test_a_control_point_of_another_shape_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="control point 1 of '0.weight' has shape"):
        register_curve(
            net, {"0.weight": [torch.zeros(4, 3), torch.zeros(3, 4), torch.zeros(4, 3)]}, [1, 1, 1], CurvePosition(3)
        )


# ---- Jensen-Shannon and mutual information -----------------------------------------------------------


def test_jensen_shannon_is_the_mutual_information_of_the_ensemble():
    torch.manual_seed(3)
    logits = 3 * torch.randn(6, 20, 5, dtype=torch.float64)
    js = jensen_shannon(torch.log_softmax(logits, -1))
    torch.testing.assert_close(js, CategoricalPredictive(logits).mutual_information, rtol=0, atol=1e-12)
    assert bool((js >= 0).all()) and float(js.min()) > 0
    # the dense definition: sum_c pbar log pbar - mean_j sum_c p_j log p_j
    p = torch.softmax(logits, -1)
    mean = p.mean(0)
    dense = -(mean * mean.log()).sum(-1) + (p * p.log()).sum(-1).mean(0)
    torch.testing.assert_close(js, dense, rtol=0, atol=1e-12)


def test_jensen_shannon_of_identical_members_is_zero():
    logits = torch.randn(1, 8, 4, dtype=torch.float64).expand(5, 8, 4)
    torch.testing.assert_close(
        jensen_shannon(torch.log_softmax(logits, -1)), torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_jensen_shannon_refuses_a_flat_input():
    with pytest.raises(ValueError, match=r"log_probs must be a tensor of shape \[J, B, C\]"):
        jensen_shannon(torch.zeros(4, 3))
