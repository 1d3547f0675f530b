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


def _rank_deficient_problem(constraint: str):
    """A ReLU network whose hidden unit 0 is dead on every input (its first-layer weights and bias get exactly zero
    Jacobian columns) on a batch whose examples 3 and 5 repeat examples 1 and 0: ``J_b`` has 18 (output) or 6
    (loss) rows and rank 12 or 4. Also the indices of the distinct examples, whose ``J`` has full row rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3)).double()  # P = 38
    with torch.no_grad():
        model[0].bias[0] = -50.0
        model[0].weight[0].mul_(0.1)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[3], x[5] = x[1], x[0]
    y = torch.tensor([0, 2, 1, 2, 0, 1])
    y[3], y[5] = y[1], y[0]
    fn = LossConstraint(CategoricalLikelihood()) if constraint == "loss" else output_constraint
    return ParameterFunction(model, "all", fn), x, y, [0, 1, 2, 4]


@pytest.mark.parametrize("constraint", ["output", "loss"])
def test_a_rank_deficient_batch_projects_onto_the_svd_kernel(single_thread, constraint):
    """Duplicated examples and a dead unit: the dense pseudo-inverse and CG with as many steps as rows or as the rank
    give ``I - V_r V_r^T`` of J's SVD (measured 1e-13 relative error, ``||J k|| / ||e||`` 1e-14); CG with fewer
    steps than the rank does not (0.17 and 0.21 off at rank - 2), so the comparison resolves a truncated solve."""
    function, x, y, _ = _rank_deficient_problem(constraint)
    theta = function.theta()
    jacobian = _dense_jacobian(function, x, y, theta)
    _, s, vh = torch.linalg.svd(jacobian)
    rank = int((s > 1e-10 * s[0]).sum())
    rows = len(y) * (3 if constraint == "output" else 1)
    assert (rows, rank) == ((18, 12) if constraint == "output" else (6, 4))
    assert torch.equal(jacobian[:, :3], torch.zeros_like(jacobian[:, :3]))  # the dead unit's incoming weights
    projector = torch.eye(function.size, dtype=torch.float64) - vh[:rank].T @ vh[:rank]
    noise = torch.randn(4, function.size, dtype=torch.float64)
    systems = {
        "dense": build_system(function, x, y, theta, "dense"),
        "cg rows": build_system(function, x, y, theta, "cg", iterations=rows),
        "cg rank": build_system(function, x, y, theta, "cg", iterations=rank),
    }
    for name, system in systems.items():
        kernel, _ = project(system, noise)
        assert _relative_error(kernel, noise @ projector) <= 1e-10, name
        assert ((kernel @ jacobian.T).norm(dim=1) <= 1e-10 * noise.norm(dim=1)).all(), name
    truncated, _ = project(build_system(function, x, y, theta, "cg", iterations=rank - 2), noise)
    assert _relative_error(truncated, noise @ projector) > 1e-2


@pytest.mark.parametrize(("constraint", "solver"), [(c, s) for c in ("output", "loss") for s in ("dense", "cg")])
def test_rank_deficient_adjoint_matches_autograd_through_the_distinct_examples(single_thread, constraint, solver):
    """The repeated rows add nothing to J's row space, so the projection is ``e - J_u^T (J_u J_u^T)^{-1} J_u e`` with
    ``J_u`` the distinct examples' full-row-rank Jacobian (Gram condition number 4e4 output, 1e2 loss): autograd
    through that dense solve is the truth for the KKT adjoint on the rank-deficient batch (measured 2e-13)."""
    function, x, y, distinct = _rank_deficient_problem(constraint)
    rows = len(y) * (3 if constraint == "output" else 1)
    theta = function.theta().requires_grad_(True)
    noise = torch.randn(2, function.size, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, function.size, dtype=torch.float64)

    kernel = project_to_kernel(theta, noise, function, x, y, solver=solver, iterations=rows)
    grad_theta, grad_noise = torch.autograd.grad((weights * kernel).sum(), (theta, noise))
    reference = _reference_projection(function, x[distinct], y[distinct], theta, noise)
    ref_theta, ref_noise = torch.autograd.grad((weights * reference).sum(), (theta, noise))

    assert _relative_error(kernel, reference) <= 1e-8
    assert _relative_error(grad_noise, ref_noise) <= 1e-8
    assert _relative_error(grad_theta, ref_theta) <= 1e-8
    assert ref_theta.norm() > 1.0  # measured 13 (output) and 12 (loss)


@pytest.mark.parametrize(("constraint", "solver"), [(c, s) for c in ("output", "loss") for s in ("dense", "cg")])
def test_gradcheck_on_a_rank_deficient_batch(single_thread, constraint, solver):
    """Central differences in float64 (eps 1e-6, the dead unit stays dead) against the adjoint, in theta and noise.
    CG's forward is 20x the dense one's, so its check is gradcheck's fast mode: one random direction's derivative."""
    function, x, y, _ = _rank_deficient_problem(constraint)
    rows = len(y) * (3 if constraint == "output" else 1)
    theta = function.theta().requires_grad_(True)
    noise = torch.randn(1, function.size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, e: project_to_kernel(t, e, function, x, y, solver, iterations=rows),
        (theta, noise), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=solver == "cg",
    )
