"""Matrix-free Jacobian algebra against explicit dense Jacobians (float64, so tolerances are ~1e-12)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian as dense_jacobian

from lightning_bayes.inference.kernel_projection import DenseSystem, project
from lightning_bayes.inference.likelihoods import CategoricalLikelihood
from lightning_bayes.inference.linalg import (
    FlatParameters,
    GRAM_BLOCK,
    HOST_EIGH_ROWS,
    GramFactor,
    LossConstraint,
    ParameterFunction,
    gram,
)

from unbatchable import CheckedInputs

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: thread hand-offs dominate
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_mlp(din: int = 5, hidden: int = 12, out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, hidden), nn.Tanh(), nn.Linear(hidden, out)).double()


@pytest.fixture()
def problem() -> tuple[ParameterFunction, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = tiny_mlp()
    function = ParameterFunction(model)
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1, 2])
    dense = dense_jacobian(lambda t: function.outputs(t, x).reshape(-1), function.theta())
    return function, x, y, dense


def test_flat_parameters_round_trip_and_shape_error() -> None:
    model = tiny_mlp()
    flat = FlatParameters(model, "2.*")
    theta = flat.flatten(model)
    assert flat.size == 12 * 3 + 3 == theta.numel()
    views = flat.unflatten(theta)
    assert torch.equal(views["2.weight"], model[2].weight.detach()) and torch.equal(views["2.bias"], model[2].bias.detach())
    with pytest.raises(ValueError, match=r"theta must have shape \(39,\)"):
        flat.unflatten(torch.zeros(40, dtype=torch.float64))


def test_jacobian_jvp_vjp_match_dense(problem) -> None:
    function, x, y, dense = problem
    v = torch.randn(3, function.size, dtype=torch.float64)
    w = torch.randn(3, dense.shape[0], dtype=torch.float64)
    torch.testing.assert_close(function.jacobian(x, y), dense, rtol=0, atol=1e-12)
    outputs, tangents = function.jvp(x, v)
    torch.testing.assert_close(outputs, function.outputs(function.theta(), x), rtol=0, atol=1e-12)
    torch.testing.assert_close(tangents.reshape(3, -1), v @ dense.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(function.vjp(x, y)(w), w @ dense, rtol=0, atol=1e-12)
    jjt_w = function.jvp(x, function.vjp(x, y)(w))[1].reshape(3, -1)
    torch.testing.assert_close(jjt_w, w @ dense @ dense.T, rtol=0, atol=1e-11)


def test_loss_constraint_rows_are_per_example_gradients(problem) -> None:
    function, x, y, _ = problem
    function.constraint = LossConstraint(CategoricalLikelihood())
    theta = function.theta()
    expected = torch.stack(
        [
            dense_jacobian(lambda t, n=n: nn.functional.cross_entropy(function.outputs(t, x[n : n + 1]), y[n : n + 1]), theta)
            for n in range(4)
        ]
    )
    torch.testing.assert_close(function.jacobian(x, y), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 2])
def test_one_row_constraints_take_per_example_gradients(problem, rows) -> None:
    """One row per example is a gradient (``vmap(grad)``, the fast path); two rows need the Jacobian's path."""
    function, x, y, dense = problem
    function.constraint = lambda outputs, _y: outputs[..., :rows]
    per_example = dense.reshape(4, 3, -1)[:, :rows].reshape(4 * rows, -1)
    torch.testing.assert_close(function.jacobian(x, y), per_example, rtol=0, atol=1e-12)
    assert function._one_row == (rows == 1)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_chunking_and_loop_give_identical_results(problem, chunk_size) -> None:
    function, x, y, dense = problem
    v = torch.randn(5, function.size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    reference = function.jvp(x, v)[1]
    function.chunk_size = chunk_size
    torch.testing.assert_close(function.jvp(x, v)[1], reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(function.jacobian(x, y), dense, rtol=0, atol=1e-12)
    function.vectorize = False
    torch.testing.assert_close(function.jacobian(x, y), dense, rtol=0, atol=1e-12)


def test_jacobian_falls_back_to_a_loop_where_vmap_fails(problem) -> None:
    plain, x, y, dense = problem
    function = ParameterFunction(CheckedInputs(*plain.model))
    with pytest.warns(UserWarning, match="CheckedInputs .*fall back to a Python loop"):
        torch.testing.assert_close(function.jacobian(x, y), dense, rtol=0, atol=1e-12)
    assert not function.vectorize and plain.vectorize


@pytest.mark.filterwarnings("error:.*fall back to a Python loop")
def test_an_error_of_the_model_itself_is_raised_not_taken_for_a_vmap_failure(problem) -> None:
    """float32 inputs to a float64 network fail under vmap and in the loop alike: the error was hidden behind a
    warning that vmap failed and a fall-back to the (slower) loop, which then failed with it."""
    function, x, y, _ = problem
    with pytest.raises(RuntimeError, match="dtype"):
        function.jacobian(x.float(), y)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])])
@pytest.mark.parametrize("constraint", ["output", "loss"])
def test_compiled_per_example_jacobians_and_their_backward_equal_eager(problem, constraint: str, device: str) -> None:
    """``compile_jacobian=True`` (Inductor: C++ on a CPU, Triton on a GPU): the eager ``J_b`` (``jacrev`` for the
    outputs, ``grad`` for the one-row loss) and, through its graph, the eager second-order gradient
    ``grad_theta <C, J_b(theta)>`` (a projection's parameter gradient), twice on one graph (no donated buffers),
    float64 to rounding."""
    plain, x, y, _ = problem
    model, x, y = plain.model.to(device), x.to(device), y.to(device)
    maps = {"output": plain.constraint, "loss": LossConstraint(CategoricalLikelihood())}
    eager = ParameterFunction(model, constraint=maps[constraint])
    compiled = ParameterFunction(model, constraint=maps[constraint], compile_jacobian=True)
    leaf = eager.theta().requires_grad_(True)
    want = eager.jacobian(x, y, leaf)
    got = compiled.jacobian(x, y, leaf)
    assert got.shape == want.shape == (len(y) * (3 if constraint == "output" else 1), eager.size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    node, names = got.grad_fn, []
    while node is not None and len(names) < 3:
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert "CompiledFunctionBackward" in names, names  # Inductor's graph, not an eager fallback
    cotangent = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    (second_order,) = torch.autograd.grad(want, leaf, cotangent)
    assert second_order.abs().max() > 1e-3  # the Hessian-weighted term is there to compare
    for _ in range(2):
        torch.testing.assert_close(
            torch.autograd.grad(got, leaf, cotangent, retain_graph=True)[0], second_order, rtol=0, atol=1e-12
        )
    with torch.no_grad():
        torch.testing.assert_close(compiled.jacobian(x, y), want.detach(), rtol=0, atol=1e-12)


def test_compile_jacobian_is_validated() -> None:
    with pytest.raises(ValueError, match="compile_jacobian must be True or False; got 'yes'"):
        ParameterFunction(tiny_mlp(), compile_jacobian="yes")


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("rows", [32, HOST_EIGH_ROWS, HOST_EIGH_ROWS + 1])
def test_a_cuda_gram_factor_is_the_cpu_one_on_the_gram_matrixs_device(rows: int) -> None:
    """Up to ``HOST_EIGH_ROWS`` rows LAPACK decomposes a CUDA Gram matrix (its CPU twin: the test above); above it,
    cuSOLVER: either way the pseudo-inverse stays on the device and equals the CPU's (rank-deficient: half rank)."""
    a = torch.randn(rows, rows // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gram_cpu = a @ a.T
    on_cpu, on_cuda = GramFactor.of(gram_cpu), GramFactor.of(gram_cpu.cuda())
    assert on_cuda.eigenvectors.is_cuda and on_cuda.inverse_eigenvalues.is_cuda and on_cuda.rank == on_cpu.rank
    rhs = torch.randn(3, rows, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(on_cuda.solve(rhs.cuda()).cpu(), on_cpu.solve(rhs), rtol=1e-8, atol=1e-10)


def test_gram_factor_is_the_pseudo_inverse_with_a_relative_cutoff() -> None:
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    g = a @ a.T  # rank 3
    factor = GramFactor.of(g, rtol=1e-10)
    assert factor.rank == 3
    rhs = torch.randn(2, 6, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(factor.solve(rhs), rhs @ torch.linalg.pinv(g, hermitian=True), rtol=0, atol=1e-10)
    spectrum = torch.tensor([1.0, 1e-3, 1e-7], dtype=torch.float64)
    for scale in (1e-9, 1.0, 1e9):  # the cutoff is relative to the largest eigenvalue: rank and G^+ scale-free
        scaled = GramFactor.of(torch.diag(scale * spectrum), rtol=1e-5)
        assert scaled.rank == 2
        torch.testing.assert_close(scaled.inverse_eigenvalues.sort().values, torch.tensor([0.0, 1.0, 1e3], dtype=torch.float64) / scale)
    assert GramFactor.of(torch.diag(torch.tensor([1.0, 1e-3, 1e-7], dtype=torch.float64)), atol=1e-2).rank == 1
    with pytest.raises(ValueError, match="square"):
        GramFactor.of(torch.zeros(2, 3))


def test_zero_gram_matrix_has_rank_zero_and_a_zero_pseudo_inverse() -> None:
    """G = 0 has G^+ = 0 (eigenvalues 0 sit at the cutoff rtol * 0 and count as zero), so a zero J projects nothing."""
    factor = GramFactor.of(torch.zeros(3, 3, dtype=torch.float64))
    assert factor.rank == 0
    solved = factor.solve(torch.ones(2, 3, dtype=torch.float64))
    assert torch.isfinite(solved).all() and torch.equal(solved, torch.zeros(2, 3, dtype=torch.float64))
    v = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    projected, multipliers = project(DenseSystem(torch.zeros(3, 7, dtype=torch.float64)), v)
    assert torch.equal(projected, v) and torch.equal(multipliers, torch.zeros(4, 3, dtype=torch.float64))


def test_gram_sums_float32_blocks_in_float64() -> None:
    generator = torch.Generator().manual_seed(4)
    jacobian = torch.randn(8, 12 * GRAM_BLOCK + 5, dtype=torch.float64, generator=generator)
    exact = jacobian @ jacobian.T
    assert torch.equal(gram(jacobian), exact)  # float64 stays float64
    single = gram(jacobian.float())
    assert single.dtype == torch.float64
    norms = exact.diagonal().sqrt()
    # measured 1.3e-7 of |J_i| |J_j|; one float32 product over all 49,157 columns is off by 2.2e-6
    assert ((single - exact).abs() / torch.outer(norms, norms)).max() < 5e-7
    low = jacobian.bfloat16()  # lower precisions are multiplied in float32
    torch.testing.assert_close(gram(low), gram(low.float()), rtol=0, atol=0)
    for factor in (2.0**-75, 1e-23, 1e-30, 1e21):  # tiny rows (the loss Jacobian of a batch fitted to ~1e-20), huge
        rows = (jacobian * factor).float()
        wide = rows.double() @ rows.double().T  # float32 products alone: 88% off at 1e-23 (subnormals), inf at 1e21
        assert ((gram(rows) - wide).abs() / torch.outer(wide.diagonal(), wide.diagonal()).sqrt()).max() < 5e-7
    assert torch.equal(gram(torch.zeros(3, 5)), torch.zeros(3, 3, dtype=torch.float64))
    precision = torch.get_float32_matmul_precision()
    try:  # a lowered float32 matmul precision (TF32 or bfloat16 products) falls back to float64
        torch.set_float32_matmul_precision("high")
        assert torch.equal(gram(jacobian.float()), jacobian.float().double() @ jacobian.float().double().T)
    finally:
        torch.set_float32_matmul_precision(precision)


def test_projection_removes_the_row_space(problem) -> None:
    function, x, y, dense = problem
    v = torch.randn(4, function.size, dtype=torch.float64)
    # the null-space Laplace's path: a cached factor handed to the dense system
    projected, _ = project(DenseSystem(function.jacobian(x, y), factor=GramFactor.of(gram(dense), rtol=1e-12)), v)
    expected = v - v @ torch.linalg.pinv(dense) @ dense  # (I - J^+ J) v
    torch.testing.assert_close(projected, expected, rtol=0, atol=1e-10)
    assert (projected @ dense.T).abs().max() < 1e-10
    # the factor handed in is the one applied: a cutoff above every eigenvalue leaves v as it is
    untouched, _ = project(DenseSystem(function.jacobian(x, y), factor=GramFactor.of(gram(dense), atol=1e30)), v)
    torch.testing.assert_close(untouched, v, rtol=0, atol=0)


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x * 2

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * 2


class _Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoForwardAD.apply(x)


def test_forward_mode_probe_names_the_model() -> None:
    model = nn.Sequential(nn.Linear(3, 2), _Doubler())
    function = ParameterFunction(model)
    with pytest.raises(RuntimeError, match="forward-mode AD .* failed through Sequential"):
        function.check_forward_mode(torch.randn(2, 3))
    ParameterFunction(tiny_mlp(din=3)).check_forward_mode(torch.randn(2, 3, dtype=torch.float64))


def test_chunk_size_is_validated() -> None:
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1; got 0"):
        ParameterFunction(tiny_mlp(), chunk_size=0)


def test_ggn_and_hessian_vector_products_match_dense(problem) -> None:
    from torch.autograd.functional import hessian

    from lightning_bayes.inference.likelihoods import GaussianLikelihood

    function, x, y, dense = problem
    theta = function.theta()
    v = torch.randn(3, function.size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    likelihood = CategoricalLikelihood()
    probs = torch.softmax(function.outputs(theta, x), -1)
    blocks = torch.block_diag(*[torch.diag(p) - torch.outer(p, p) for p in probs])  # softmax output Hessian
    torch.testing.assert_close(function.ggn_vp(x, y, v, likelihood), v @ (dense.T @ blocks @ dense), rtol=0, atol=1e-10)
    summed = lambda t: torch.nn.functional.cross_entropy(function.outputs(t, x), y, reduction="sum")
    full = hessian(summed, theta)  # of the summed negative log-likelihood, written out independently
    torch.testing.assert_close(function.loss(theta, x, y, likelihood), summed(theta), rtol=1e-12, atol=0)
    torch.testing.assert_close(function.hvp(x, y, v, likelihood), v @ full, rtol=0, atol=1e-10)
    gaussian = GaussianLikelihood(output_dim=3, init_noise=0.5).double()
    targets = torch.randn(4, 3, dtype=torch.float64)
    variance = float(torch.nn.functional.softplus(gaussian.raw_noise)[0]) ** 2 + 1e-6  # sigma^2 + the variance floor
    expected = v @ (dense.T @ dense) / variance  # Gaussian: H = I / sigma^2
    torch.testing.assert_close(function.ggn_vp(x, targets, v, gaussian), expected, rtol=1e-10, atol=1e-10)


def test_ggn_product_matches_curvlinops() -> None:
    """Against curvlinops' GGN operator (a test dependency), float32, summed loss."""
    import curvlinops
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(6, 5)
    y = torch.randint(0, 3, (6,))
    function = ParameterFunction(model)
    v = torch.randn(1, function.size)
    operator = curvlinops.GGNLinearOperator(
        model, nn.CrossEntropyLoss(reduction="sum"), list(model.parameters()), [(x, y)], check_deterministic=False
    )
    expected = operator @ v[0]
    torch.testing.assert_close(function.ggn_vp(x, y, v, CategoricalLikelihood())[0], expected.float(), rtol=1e-5, atol=1e-5)
