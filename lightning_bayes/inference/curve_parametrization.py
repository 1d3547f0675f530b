"""A network's tensors as points on a curve, through ``torch.nn.utils.parametrize``.

Each selected tensor ``W`` becomes ``W(t) = sum_k c_k theta_k^W`` with its own control points
``theta_k^W`` held by a :class:`CurveParametrization`; trainable points are parameters, frozen ones
(fixed endpoints, anchors) are buffers, so no optimiser ever sees them. Every parametrisation of a
network reads one shared :class:`CurvePosition`, the coefficient vector ``c`` of the current ``t`` (a
curve's or the straight line's), so moving the whole network along the curve is one assignment. The
tensor the parametrisation replaces (``parametrizations.<name>.original``) is frozen while the curve is
registered and receives ``theta(t)`` when it is removed (Garipov et al., 2018).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..checks import is_int


class CurvePosition:
    """The coefficients ``c(t)`` shared by all parametrisations of one curve (Python floats, so a weighted
    sum costs no device transfer and a one-hot ``c`` returns a control point bitwise)."""

    def __init__(self, num_points: int) -> None:
        if not is_int(num_points) or num_points < 2:
            raise ValueError(f"num_points must be an integer >= 2; got {num_points!r}")
        self.coefficients: tuple[float, ...] = (1.0,) + (0.0,) * (num_points - 1)

    @property
    def num_points(self) -> int:
        return len(self.coefficients)

    def set(self, coefficients: Tensor | Sequence[float]) -> None:
        """Move to the point with coefficients ``c`` (``[K + 1]``, e.g. one row of ``bezier(t, n)``)."""
        values = tuple(float(c) for c in torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1))
        if len(values) != self.num_points:
            raise ValueError(f"coefficients must have {self.num_points} entries; got {len(values)}")
        self.coefficients = values


def combine(points: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """``sum_k c_k theta_k`` (every term kept, so each trainable point is used in every step)."""
    total = points[0] * coefficients[0]
    for point, c in zip(points[1:], coefficients[1:]):
        total = torch.add(total, point, alpha=c)
    return total


class CurveParametrization(nn.Module):
    """``forward(original) = sum_k c_k theta_k`` for the control points of one tensor (``original`` unused).

    ``points[k]`` is a parameter ``point_k`` when ``trainable[k]``, else a buffer.
    """

    def __init__(
        self,
        points: Sequence[Tensor],
        trainable: Sequence[bool],
        position: CurvePosition,
    ) -> None:
        super().__init__()
        if len(points) != position.num_points or len(trainable) != position.num_points:
            raise ValueError(
                f"points and trainable must have {position.num_points} entries (the curve's control points); "
                f"got {len(points)} and {len(trainable)}"
            )
        self.position = position
        self.trainable = tuple(bool(flag) for flag in trainable)
        self.original_requires_grad = True  # of the tensor it replaces; restored by remove_curve
        for k, (point, flag) in enumerate(zip(points, self.trainable)):
            value = point.detach().clone()
            if flag:
                self.register_parameter(f"point_{k}", nn.Parameter(value))
            else:
                self.register_buffer(f"point_{k}", value)

    def points(self) -> list[Tensor]:
        return [getattr(self, f"point_{k}") for k in range(self.position.num_points)]

    def forward(self, original: Tensor) -> Tensor:
        return combine(self.points(), self.position.coefficients)


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attribute = name.rpartition(".")
    return root.get_submodule(module_name), attribute


def _parametrizations(owner: nn.Module, attribute: str) -> parametrize.ParametrizationList:
    """``owner.parametrizations[attribute]`` (the container ``register_parametrization`` adds at runtime)."""
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, owner.parametrizations)[attribute])


def register_curve(
    root: nn.Module,
    points: Mapping[str, Sequence[Tensor]],
    trainable: Sequence[bool],
    position: CurvePosition,
) -> dict[str, CurveParametrization]:
    """Parametrise each tensor ``root.<name>`` by its control points ``points[name]``; return the
    parametrisations by name. The replaced tensors are frozen (their ``requires_grad`` is restored by
    :func:`remove_curve`)."""
    registered: dict[str, CurveParametrization] = {}
    for name, tensor_points in points.items():
        owner, attribute = _owner(root, name)
        original = getattr(owner, attribute)
        for k, point in enumerate(tensor_points):
            if point.shape != original.shape:
                raise ValueError(
                    f"control point {k} of {name!r} has shape {tuple(point.shape)}; expected {tuple(original.shape)}"
                )
        curve = CurveParametrization(
            [p.to(device=original.device, dtype=original.dtype) for p in tensor_points],
            trainable,
            position,
        )
        curve.original_requires_grad = original.requires_grad
        parametrize.register_parametrization(owner, attribute, curve, unsafe=True)
        _parametrizations(owner, attribute).original.requires_grad_(False)
        registered[name] = curve
    return registered


def remove_curve(root: nn.Module, names: Sequence[str]) -> None:
    """Bake the current point ``theta(t)`` into the plain tensors ``root.<name>`` and drop the control points."""
    for name in names:
        owner, attribute = _owner(root, name)
        curve = cast(CurveParametrization, _parametrizations(owner, attribute)[0])  # added by register_curve
        parametrize.remove_parametrizations(owner, attribute, leave_parametrized=True)
        getattr(owner, attribute).requires_grad_(curve.original_requires_grad)
