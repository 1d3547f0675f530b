"""The differentiable kernel projection against dense float64 linear algebra and autograd through a dense solve."""

import pytest
import torch
from torch import nn

from lightning_bayes.inference.kernel_projection import (
    DenseSystem, build_system, missing_second_derivative, project, project_to_kernel,
)
from lightning_bayes.inference.likelihoods import CategoricalLikelihood
from lightning_bayes.inference.linalg import LossConstraint, ParameterFunction, output_constraint
from once_differentiable_square import Square


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def _problem(constraint: str = "output", seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # P = 38
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    fn = LossConstraint(CategoricalLikelihood()) if constraint == "loss" else output_constraint
    function = ParameterFunction(model, "all", fn)
    return function, x, y


def _dense_jacobian(function, x, y, theta, create_graph=False):
    return torch.autograd.functional.jacobian(lambda t: function.constraints(t, x, y), theta, create_graph=create_graph)


def _reference_projection(function, x, y, theta, noise):
    """``e - J^T (J J^T)^{-1} J e`` with J from autograd (differentiable in theta): the dense KKT solution."""
    jacobian = _dense_jacobian(function, x, y, theta, create_graph=True)
    multipliers = torch.linalg.solve(jacobian @ jacobian.T, jacobian @ noise.T)
    return noise - (jacobian.T @ multipliers).T


@pytest.mark.parametrize("constraint", ["output", "loss"])
def test_dense_projection_is_the_svd_kernel_projector(single_thread, constraint):
    function, x, y = _problem(constraint)
    theta = function.theta()
    noise = torch.randn(5, function.size, dtype=torch.float64)
    kernel, _ = project(build_system(function, x, y, theta, "dense"), noise)
    jacobian = _dense_jacobian(function, x, y, theta)
    _, s, vh = torch.linalg.svd(jacobian)
    row_space = vh[: int((s > 1e-10 * s[0]).sum())]
    projector = torch.eye(function.size, dtype=torch.float64) - row_space.T @ row_space
    assert _relative_error(kernel, noise @ projector) <= 1e-12
    assert ((kernel @ jacobian.T).norm(dim=1) <= 1e-10 * noise.norm(dim=1)).all()


@pytest.mark.parametrize("constraint", ["output", "loss"])
def test_cg_with_as_many_steps_as_rows_matches_the_dense_solver(single_thread, constraint):
    function, x, y = _problem(constraint)
    theta = function.theta()
    rows = len(y) * (3 if constraint == "output" else 1)
    noise = torch.randn(3, function.size, dtype=torch.float64)
    dense, _ = project(build_system(function, x, y, theta, "dense"), noise)
    cg, _ = project(build_system(function, x, y, theta, "cg", iterations=rows), noise)
    assert _relative_error(cg, dense) <= 1e-8


@pytest.mark.parametrize(("constraint", "solver"), [("output", "dense"), ("output", "cg"), ("loss", "dense")])
def test_adjoint_gradients_match_autograd_through_a_dense_solve(single_thread, constraint, solver):
    function, x, y = _problem(constraint, seed=1)
    rows = len(y) * (3 if constraint == "output" else 1)
    theta = function.theta().requires_grad_(True)
    noise = torch.randn(2, function.size, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, function.size, dtype=torch.float64)  # a random linear functional of k

    kernel = project_to_kernel(theta, noise, function, x, y, solver=solver, iterations=rows)
    grad_theta, grad_noise = torch.autograd.grad((weights * kernel).sum(), (theta, noise))
    reference = _reference_projection(function, x, y, theta, noise)
    ref_theta, ref_noise = torch.autograd.grad((weights * reference).sum(), (theta, noise))

    assert _relative_error(kernel, reference) <= 1e-8
    assert _relative_error(grad_noise, ref_noise) <= 1e-8
    assert _relative_error(grad_theta, ref_theta) <= 1e-8
    assert ref_theta.norm() > 1e-3  # the theta-dependence is not trivially zero


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_gradients_flow_to_whichever_input_asks(single_thread, solver):
    """theta alone (VIKING's ELBO step: the noise comes from buffers) and the noise alone (the scale warm-up, theta
    frozen) each get autograd's gradient through a dense solve."""
    function, x, y = _problem("output", seed=4)
    theta = function.theta()
    noise = torch.randn(2, function.size, dtype=torch.float64)
    weights = torch.randn(2, function.size, dtype=torch.float64)
    for asks in (0, 1):
        inputs = [theta.detach().clone(), noise.clone()]
        inputs[asks].requires_grad_(True)
        kernel = project_to_kernel(*inputs, function, x, y, solver=solver, iterations=len(y) * 3)
        (gradient,) = torch.autograd.grad((weights * kernel).sum(), inputs[asks])
        reference = _reference_projection(function, x, y, *inputs)
        (expected,) = torch.autograd.grad((weights * reference).sum(), inputs[asks])
        assert _relative_error(gradient, expected) <= 1e-8


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_under_bf16_autocast_the_projection_and_its_gradients_are_the_float32_ones(single_thread, solver):
    """VIKING's step runs under the Trainer's autocast; J_b in bf16 left ||J_b k|| / ||k|| at 1e-3 to 1e-2. With
    autocast off inside, the same float32 operations run, so the values agree exactly."""
    function, x, y = _problem("loss", seed=5)
    function.model.float()
    x = x.float()
    theta = function.theta().detach().requires_grad_(True)
    noise = torch.randn(2, function.size, requires_grad=True)
    weights = torch.randn(2, function.size)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            kernel = project_to_kernel(theta, noise, function, x, y, solver=solver, iterations=len(y))
            gradients = torch.autograd.grad((weights * kernel).sum(), (theta, noise))
        results.append((kernel, *gradients))
    for value, expected in zip(results[1], results[0]):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_gradcheck(single_thread):
    function, x, y = _problem("output", seed=2)
    theta = function.theta().requires_grad_(True)
    noise = torch.randn(1, function.size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, e: project_to_kernel(t, e, function, x, y, "dense"), (theta, noise), eps=1e-6, atol=1e-5, rtol=1e-4
    )


def test_bad_noise_and_solver_are_named(single_thread):
    function, x, y = _problem()
    theta = function.theta()
    with pytest.raises(ValueError, match="noise"):
        project_to_kernel(theta, torch.zeros(function.size, dtype=torch.float64), function, x, y)
    with pytest.raises(ValueError, match="solver"):
        project_to_kernel(theta, torch.zeros(1, function.size, dtype=torch.float64), function, x, y, solver="lsmr")


@pytest.mark.parametrize("constraint", ["output", "loss"])
def test_dense_systems_graph_gives_the_bilinear_gradient(single_thread, constraint):
    """One backward through ``J_b``'s graph equals the Hessian-vector products of the matrix-free system."""
    function, x, y = _problem(constraint, seed=3)
    theta = function.theta()
    rows = len(y) * (3 if constraint == "output" else 1)
    left = torch.randn(2, rows, dtype=torch.float64)
    right = torch.randn(2, function.size, dtype=torch.float64)
    expected = function.bilinear_gradient(x, y, left, right, theta)
    system = build_system(function, x, y, theta, "dense", differentiable=True)
    assert _relative_error(system.bilinear_gradient(left, right), expected) <= 1e-12
    assert _relative_error(system.bilinear_gradient(left, right), expected) <= 1e-12  # the graph is kept for repeats
    assert _relative_error(build_system(function, x, y, theta, "cg").bilinear_gradient(left, right), expected) <= 1e-12
    with pytest.raises(RuntimeError, match=r"differentiable=True"):
        build_system(function, x, y, theta, "dense").bilinear_gradient(left, right)


def test_a_bf16_jacobians_transpose_product_is_taken_in_float32() -> None:
    """float32 vectors projected with a bf16 ``J_b`` land in its kernel to float32 rounding (``J^T lam`` in bf16
    left them 1e-3 off)."""
    torch.manual_seed(0)
    jacobian = torch.randn(4, 50).to(torch.bfloat16)
    vectors = torch.randn(3, 50)
    kernel, _ = project(DenseSystem(jacobian), vectors)
    assert kernel.dtype == torch.float32
    residual = (kernel @ jacobian.float().T).norm(dim=1) / vectors.norm(dim=1)
    assert residual.max() < 1e-5


def test_networks_without_a_second_derivative_are_named(single_thread):
    """The projection's parameter gradient is a second derivative of the network. A ``@once_differentiable``
    backward has none, and inside torch.func it is silently taken as constant (the gradient below is off while the
    projection itself is right), so it is named from the forward's graph; nn.Hardsigmoid by torch's own error."""

    def problem(activation: nn.Module):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), activation, nn.Linear(5, 3)).double()
        return ParameterFunction(model, "all", LossConstraint(CategoricalLikelihood()))

    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    once, written_out = problem(Square(once=True)), problem(Square(once=False))
    named = missing_second_derivative(once, x, y, once.theta())
    assert named == "the backward of OnceSquare is marked @once_differentiable"
    assert missing_second_derivative(written_out, x, y, written_out.theta()) is None
    hard = problem(nn.Hardsigmoid())
    assert "hardsigmoid_backward is not implemented" in missing_second_derivative(hard, x, y, hard.theta())

    noise, weights = torch.randn(2, 2, once.size, dtype=torch.float64)  # two vectors each
    gradients, kernels = [], []
    for function in (once, written_out):
        theta = function.theta().requires_grad_(True)
        kernel = project_to_kernel(theta, noise, function, x, y)
        gradients.append(torch.autograd.grad((weights * kernel).sum(), theta)[0])
        kernels.append(kernel.detach())
    assert _relative_error(kernels[0], kernels[1]) <= 1e-12
    assert _relative_error(gradients[0], gradients[1]) > 0.1
