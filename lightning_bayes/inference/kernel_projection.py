"""Differentiable projection onto the kernel of one micro-batch's constraint Jacobian.

``k = Pi(theta, e) = e - J^T lam`` with ``(J J^T) lam = J e`` (``J = J_b(theta)``) is the solution of the
symmetric KKT system ``K z = (e, 0)``, ``z = (k, lam)``, ``K = [[I, J^T], [J, 0]]``. For a cotangent
``g`` on ``k`` the adjoint system ``K xi = (g, 0)`` is the same projection applied to ``g``
(``xi_lam = (J J^T)^+ J g``, ``xi_k = g - J^T xi_lam``), and

    dL/de = xi_k,    dL/dtheta = -grad_theta [lam^T J(theta) xi_k + xi_lam^T J(theta) k],

the last term the gradient of the bilinear form ``sum_k left_k^T J(theta) right_k``: for :class:`DenseSystem`
(``J_b`` materialised from per-example Jacobians, a float64 pseudo-inverse of the Gram matrix; exact, and cheap
for the loss constraint where ``J_b`` is the per-example gradients) one backward through the graph of ``J_b``
kept from the forward (cotangent ``left^T right``; 4.2 against 9.2 ms for LeNet-5 and 32 images, at the cost
of holding that graph, activation-sized per row, until the backward); for :class:`MatrixFreeSystem` (one VJP
linearisation, a JVP per step, :func:`conjugate_gradient` with a fixed number of steps) two Hessian-vector
products of ``<u, g(theta)>`` (:meth:`ParameterFunction.bilinear_gradient`). Nothing is unrolled and nothing
``P x P`` is formed. The projection and its adjoint run with autocast off (at the parameters' precision; a
bf16 ``J_b`` left a relative residual ``||J_b k|| / ||k||`` of 1e-3 to 1e-2).

Reference: Fadel et al., "VIKING", NeurIPS 2025 (arXiv 2510.23684), section 3 and appendix; the
implicit-function adjoint of a KKT system as in Amos & Kolter, "OptNet", ICML 2017.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .conjugate_gradient import conjugate_gradient
from .linalg import GramFactor, ParameterFunction, gram, take_examples

Solver = Literal["dense", "cg"]
SOLVERS = ("dense", "cg")


class ConstraintSystem(Protocol):
    """``J_b`` at a fixed ``theta``: products with ``J_b``, ``J_b^T`` and solves with ``J_b J_b^T``."""

    def apply(self, vectors: Tensor) -> Tensor:
        """``[S, P] -> [S, M_b]``: ``J_b v``."""

    def apply_transpose(self, cotangents: Tensor) -> Tensor:
        """``[S, M_b] -> [S, P]``: ``J_b^T w``."""

    def solve(self, rhs: Tensor) -> Tensor:
        """``[S, M_b] -> [S, M_b]``: ``(J_b J_b^T)^+ r`` (float64)."""

    def bilinear_gradient(self, left: Tensor, right: Tensor) -> Tensor:
        """``[K, M_b], [K, P] -> [P]``: ``grad_theta sum_k left_k^T J_b(theta) right_k`` at the system's ``theta``."""


class DenseSystem:
    """``J_b`` as a dense ``[M_b, P]`` matrix and the pseudo-inverse of its float64 Gram matrix.

    Args:
        jacobian: ``J_b(theta)``; with its autograd graph when ``theta`` is given.
        rtol: the pseudo-inverse's relative cutoff.
        theta: the leaf ``J_b`` was computed at, for :meth:`bilinear_gradient` (``None``: no parameter gradient).
        factor: the pseudo-inverse of ``J_b J_b^T`` if already known (e.g. cached across the sweeps of the
            null-space Laplace); computed from ``jacobian`` with ``rtol`` otherwise.
    """

    def __init__(
        self, jacobian: Tensor, rtol: float = 1e-5, theta: Tensor | None = None, factor: GramFactor | None = None
    ) -> None:
        self.jacobian = jacobian.detach()
        self.factor = factor if factor is not None else GramFactor.of(gram(self.jacobian), rtol=rtol)
        self._graph = None if theta is None else (jacobian, theta)

    def apply(self, vectors: Tensor) -> Tensor:
        return vectors @ self.jacobian.T.to(vectors.dtype)

    def apply_transpose(self, cotangents: Tensor) -> Tensor:
        """``J_b^T w`` in float32 or wider (a bf16 ``J_b``'s product moved float32 samples off the kernel)."""
        dtype = torch.promote_types(self.jacobian.dtype, torch.float32)
        return cotangents.to(dtype) @ self.jacobian.to(dtype)

    def solve(self, rhs: Tensor) -> Tensor:
        return self.factor.solve(rhs)

    def bilinear_gradient(self, left: Tensor, right: Tensor) -> Tensor:
        """One backward through ``J_b``'s graph with the cotangent ``left^T right`` (kept for repeated calls,
        e.g. ``gradcheck``; freed with the system)."""
        if self._graph is None:
            raise RuntimeError("this DenseSystem was built without J_b's graph: build_system(..., differentiable=True)")
        jacobian, theta = self._graph
        cotangent = left.to(jacobian.dtype).T @ right.to(jacobian.dtype)
        return torch.autograd.grad(jacobian, theta, cotangent, retain_graph=True)[0]


class MatrixFreeSystem:
    """``J_b`` through ``torch.func`` products; solves by reorthogonalised CG with ``iterations`` steps."""

    def __init__(self, function: ParameterFunction, x: Any, y: Tensor, theta: Tensor, iterations: int = 10) -> None:
        self.function, self.x, self.y, self.theta, self.iterations = function, x, y, theta, iterations
        self._pullback = function.vjp(x, y, theta)

    def apply(self, vectors: Tensor) -> Tensor:
        return self.function.constraint_jvp(self.x, self.y, vectors.to(self.theta.dtype), self.theta)

    def apply_transpose(self, cotangents: Tensor) -> Tensor:
        return self._pullback(cotangents.to(self.theta.dtype))

    def solve(self, rhs: Tensor) -> Tensor:
        return conjugate_gradient(lambda p: self.apply(self.apply_transpose(p)), rhs, self.iterations)

    def bilinear_gradient(self, left: Tensor, right: Tensor) -> Tensor:
        return self.function.bilinear_gradient(self.x, self.y, left, right, self.theta)


def build_system(
    function: ParameterFunction,
    x: Any,
    y: Tensor,
    theta: Tensor,
    solver: Solver = "dense",
    iterations: int = 10,
    differentiable: bool = False,
) -> ConstraintSystem:
    """The constraint system of one micro-batch at ``theta`` for ``solver`` ``"dense"`` or ``"cg"``;
    ``differentiable`` keeps what :meth:`~ConstraintSystem.bilinear_gradient` needs (the dense ``J_b``'s graph)."""
    if solver == "dense":
        if not differentiable:
            return DenseSystem(function.jacobian(x, y, theta))
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            return DenseSystem(function.jacobian(x, y, leaf), theta=leaf)
    if solver == "cg":
        return MatrixFreeSystem(function, x, y, theta, iterations)
    raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")


def project(system: ConstraintSystem, vectors: Tensor, constraint: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(k, lam)`` with ``k = v - J^T lam``, ``lam = (J J^T)^+ J v``, for vectors ``[S, P]`` (``constraint``:
    ``J v`` when the caller has it already)."""
    constraint = system.apply(vectors) if constraint is None else constraint
    multipliers = system.solve(constraint.double())
    return vectors - system.apply_transpose(multipliers).to(vectors.dtype), multipliers


class _KernelProjection(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, theta: Tensor, noise: Tensor, function: ParameterFunction, x: Any, y: Tensor, solver: Solver,
        iterations: int,
    ) -> Tensor:
        differentiable = ctx.needs_input_grad[0]
        system = build_system(function, x, y, theta.detach(), solver, iterations, differentiable)
        kernel, multipliers = project(system, noise.detach())
        ctx.save_for_backward(theta.detach(), kernel, multipliers)
        ctx.system = system
        return kernel

    @staticmethod
    def backward(ctx: Any, grad_kernel: Tensor) -> tuple[Tensor | None, ...]:
        theta, kernel, multipliers = ctx.saved_tensors
        with torch.autocast(theta.device.type, enabled=False):  # a backward called inside an autocast region
            adjoint_kernel, adjoint_multipliers = project(ctx.system, grad_kernel)
            grad_theta = None
            if ctx.needs_input_grad[0]:
                left = torch.cat([multipliers, adjoint_multipliers]).to(theta.dtype)
                right = torch.cat([adjoint_kernel, kernel]).to(theta.dtype)
                grad_theta = -ctx.system.bilinear_gradient(left, right)
        grad_noise = adjoint_kernel if ctx.needs_input_grad[1] else None
        return grad_theta, grad_noise, None, None, None, None, None


def project_to_kernel(
    theta: Tensor,
    noise: Tensor,
    function: ParameterFunction,
    x: Any,
    y: Tensor,
    solver: Solver = "dense",
    iterations: int = 10,
) -> Tensor:
    """``Pi(theta, e)`` for noise ``[S, P]``, differentiable in ``theta`` and ``e`` through the KKT adjoint.

    Args:
        theta: the flat parameters ``[P]`` at which ``J_b`` is taken (e.g. the variational mean).
        noise: vectors to project, ``[S, P]``.
        function: the network as a function of ``theta`` with its constraint map (output or loss).
        x, y: the micro-batch.
        solver: ``"dense"`` (exact, ``M_b`` per-example reverse passes) or ``"cg"`` (``iterations`` JVP+VJP pairs).
        iterations: CG steps.
    """
    if noise.ndim != 2 or noise.shape[1] != function.size:
        raise ValueError(f"noise must have shape [S, {function.size}]; got {tuple(noise.shape)}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    with torch.autocast(theta.device.type, enabled=False):  # J_b at the parameters' precision, not autocast's bf16
        return _KernelProjection.apply(theta, noise, function, x, y, solver, iterations)


def missing_second_derivative(function: ParameterFunction, x: Any, y: Tensor, theta: Tensor) -> str | None:
    """Why the network has no second derivative at ``(x[0], y[0])``, else ``None``: the projection's parameter gradient
    is one. torch has none for some operations (``nn.Hardsigmoid``, the gate of MobileNetV3's squeeze-excitation
    blocks in timm: its error "derivative for aten::hardsigmoid_backward is not implemented"), and a custom
    ``autograd.Function`` whose backward is ``@once_differentiable`` has none either, yet inside ``torch.func`` it is
    differentiated as if that backward were constant in the parameters: silently wrong, so it is looked for in the
    forward's graph. Taken by plain autograd: the gradient of the constraints' sum, then of its sum."""
    leaf = theta.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            constraints = function.constraints(leaf, take_examples(x, 1), y[:1])
            once = _once_differentiable_functions(constraints)
            if once:
                return f"the backward of {', '.join(once)} is marked @once_differentiable"
            (gradient,) = torch.autograd.grad(constraints.sum(), leaf, create_graph=True)
            if gradient.requires_grad:  # not where the constraints are linear in theta
                torch.autograd.grad(gradient.sum(), leaf)
    except RuntimeError as error:
        if "derivative for" in str(error) and "not implemented" in str(error):
            return str(error)
        raise
    return None


_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__  # the code of every such wrapper


def _once_differentiable_functions(output: Tensor) -> list[str]:
    """The custom ``autograd.Function`` classes in ``output``'s graph whose backward is ``@once_differentiable``."""
    found: set[str] = set()
    seen, nodes = set(), [output.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        forward_class = getattr(node, "_forward_cls", None)  # set on the nodes of custom Functions
        if forward_class is not None and getattr(forward_class.backward, "__code__", None) is _ONCE_DIFFERENTIABLE:
            found.add(forward_class.__name__)
        nodes.extend(following for following, _ in node.next_functions)
    return sorted(found)
