"""Alternating projections against the SVD null-space projector of an explicit float64 Jacobian.

Problem: a tanh MLP (30 -> 6 -> 3, P = 207) at 20 random points in five micro-batches of four, so
J is 60 x 207 with full row rank and well-separated batch row spaces (plain sweeps converge to
machine precision in ~200 sweeps; the tolerances follow the method spec's test list).
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import Tensor, nn

from lightning_bayes.inference.likelihoods import CategoricalLikelihood, GaussianLikelihood
from lightning_bayes.inference.linalg import GramFactor, LossConstraint, ParameterFunction, gram
from lightning_bayes.inference.nullspace import AlternatingProjections, largest_scale, prior_precision

BATCHES = 5
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: thread hand-offs dominate


def make_problem(outputs: int = 3, seed: int = 0) -> tuple[ParameterFunction, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 6), nn.Tanh(), nn.Linear(6, outputs)).double()
    x = torch.randn(20, 30, dtype=torch.float64)
    y = torch.randint(0, outputs, (20,))
    return ParameterFunction(model), x, y


def kernel_projector(jacobian: Tensor) -> Tensor:
    _, s, vh = torch.linalg.svd(jacobian)
    rank = int((s > s[0] * 1e-10).sum())
    return torch.eye(jacobian.shape[1], dtype=jacobian.dtype) - vh[:rank].T @ vh[:rank]


def sweep(projections: AlternatingProjections, jacobians: list[Tensor], sweeps: int) -> None:
    for _ in range(sweeps):
        projections.begin_sweep()
        for key, jacobian in enumerate(jacobians):
            projections.project(jacobian, key)
        projections.end_sweep()


@pytest.fixture(scope="module")
def problem() -> tuple[ParameterFunction, Tensor, Tensor, list[Tensor], Tensor]:
    function, x, y = make_problem()
    jacobians = [function.jacobian(x[4 * b : 4 * b + 4], y[4 * b : 4 * b + 4]) for b in range(BATCHES)]
    return function, x, y, jacobians, kernel_projector(torch.cat(jacobians))


def test_one_batch_one_sweep_is_the_svd_projection(problem) -> None:
    function, x, y, _, projector = problem
    projections = AlternatingProjections(function.size, 8, dtype=torch.float64, rtol=1e-12)
    sweep(projections, [function.jacobian(x, y)], 1)
    expected = projections.noise @ projector
    assert (projections.samples - expected).norm() / expected.norm() < 1e-10


def relative_errors(problem, accelerate: bool, sweeps: int) -> list[float]:
    function, _, _, jacobians, projector = problem
    projections = AlternatingProjections(function.size, 10, dtype=torch.float64, rtol=1e-12, accelerate=accelerate)
    errors = []
    for _ in range(sweeps):
        sweep(projections, jacobians, 1)
        errors.append(float((projections.samples - projections.noise @ projector).norm() / projections.noise.norm()))
    return errors


def test_five_batches_converge_monotonically_and_acceleration_helps(problem) -> None:
    plain = relative_errors(problem, accelerate=False, sweeps=500)
    fast = relative_errors(problem, accelerate=True, sweeps=500)
    first_below = [next(i for i, e in enumerate(errors) if e < 1e-8) for errors in (plain, fast)]
    assert all(b <= a * (1 + 1e-9) + 1e-14 for a, b in pairwise(plain))
    assert plain[-1] < 1e-8 and fast[-1] < 1e-8
    assert first_below[1] < first_below[0] / 1.5


def test_acceleration_leaves_converged_samples_in_place(problem) -> None:
    """Once a sweep moves a sample by rounding errors only, ``t = <v_0, d> / ||d||^2`` is a ratio of rounding
    errors (up to ~1e16): the extrapolation is skipped and the sample stays where it is."""
    function, _, _, jacobians, projector = problem
    projections = AlternatingProjections(function.size, 4, dtype=torch.float64, rtol=1e-12, accelerate=True)
    converged = projections.noise @ projector
    projections.samples.copy_(converged)
    sweep(projections, jacobians, 1)
    assert (projections.samples - converged).norm() < 1e-12 * converged.norm()


def test_kernel_property_on_training_and_ood_points(problem) -> None:
    function, x, y, jacobians, _ = problem
    projections = AlternatingProjections(function.size, 6, dtype=torch.float64, rtol=1e-12)
    sweep(projections, jacobians, 200)
    v = projections.samples
    assert projections.residual(function.jacobian(x, y)).max() < 1e-7
    far = 3 * torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    jacobian = function.jacobian(far, y)
    assert projections.residual(jacobian).min() > 1e-2
    torch.testing.assert_close(projections.residual(jacobian), (v @ jacobian.T).norm(dim=1) / v.norm(dim=1), rtol=1e-12, atol=0)
    logits, tangents = function.jvp(x, v)
    torch.testing.assert_close(logits + tangents, logits.expand_as(tangents), rtol=0, atol=1e-7 * v.norm(dim=1).max())


def test_converged_projection_is_idempotent_and_symmetric(problem) -> None:
    function, _, _, jacobians, _ = problem
    generator = torch.Generator().manual_seed(6)
    u, w = torch.randn(2, 1, function.size, dtype=torch.float64, generator=generator)

    def project(v: Tensor) -> Tensor:
        projections = AlternatingProjections(function.size, 1, dtype=torch.float64, rtol=1e-12)
        projections.noise.copy_(v)
        projections.samples.copy_(v)
        sweep(projections, jacobians, 250)
        return projections.samples

    pu, pw = project(u), project(w)
    scale = float(u.norm() * w.norm())
    assert abs(float((pu * w).sum() - (u * pw).sum())) < 1e-8 * scale
    assert float((project(pu) - pu).norm()) < 1e-8 * float(u.norm())


def test_rank_estimate_is_within_four_standard_errors(problem) -> None:
    function, _, _, jacobians, _ = problem
    projections = AlternatingProjections(function.size, 2000, dtype=torch.float64, rtol=1e-12)
    sweep(projections, jacobians, 150)
    rank = torch.linalg.matrix_rank(torch.cat(jacobians)).item()
    assert rank == 60
    assert abs(projections.rank_estimate().item() - rank) < 4 * math.sqrt(2 * rank / 2000)


def test_loss_kernel_contains_the_output_kernel_and_equals_it_for_one_output() -> None:
    function, x, y = make_problem()
    output_rows = function.jacobian(x, y)
    function.constraint = LossConstraint(CategoricalLikelihood())
    loss_rows = function.jacobian(x, y)
    projections = AlternatingProjections(function.size, 4, dtype=torch.float64, rtol=1e-12)
    projections.project(output_rows)  # one batch of all the data: exactly in the output kernel
    in_output_kernel = projections.samples.clone()
    projections.project(loss_rows)
    torch.testing.assert_close(projections.samples, in_output_kernel, rtol=0, atol=1e-8)

    one, x1, _y1 = make_problem(outputs=1)
    target = torch.randn(20, 1, dtype=torch.float64)
    output_projector = kernel_projector(one.jacobian(x1, target))
    one.constraint = LossConstraint(GaussianLikelihood(output_dim=1))
    torch.testing.assert_close(kernel_projector(one.jacobian(x1, target)), output_projector, rtol=0, atol=1e-8)


def test_loss_changes_at_second_order_along_projected_directions() -> None:
    function, x, y = make_problem()
    function.constraint = LossConstraint(CategoricalLikelihood())
    theta = function.theta()
    projections = AlternatingProjections(function.size, 1, dtype=torch.float64, rtol=1e-12)
    sweep(projections, [function.jacobian(x, y)], 1)  # one batch holding all 20 examples: exact projection
    projected = projections.samples[0] / projections.samples[0].norm()
    isotropic = projections.noise[0] / projections.noise[0].norm()
    steps = torch.logspace(-4, -2, 5, dtype=torch.float64)

    def slope(direction: Tensor) -> float:
        base = function.constraints(theta, x, y)
        change = torch.stack([(function.constraints(theta + h * direction, x, y) - base).norm() for h in steps])
        return float(torch.linalg.lstsq(torch.stack([steps.log(), torch.ones(5, dtype=torch.float64)], 1), change.log()[:, None]).solution[0])

    assert abs(slope(projected) - 2) < 0.1
    assert abs(slope(isotropic) - 1) < 0.1


def test_evidence_rule_maximises_the_dense_laplace_evidence() -> None:
    """Linear-Gaussian model, GGN eigenvalues >= 1e6 on a rank-r image: the evidence's maximiser over alpha
    (theta_hat fixed) solves alpha ||theta||^2 = sum_i lambda_i / (lambda_i + alpha) ~= r."""
    generator = torch.Generator().manual_seed(7)
    p, r = 40, 12
    basis = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64, generator=generator)).Q
    eigenvalues = torch.cat([torch.logspace(6, 8, r, dtype=torch.float64), torch.zeros(p - r, dtype=torch.float64)])
    theta = basis[:, :r] @ torch.randn(r, dtype=torch.float64, generator=generator)

    def log_evidence(alpha: float) -> float:
        return float(-alpha / 2 * theta.square().sum() + p / 2 * math.log(alpha) - 0.5 * torch.log(eigenvalues + alpha).sum())

    grid = torch.logspace(-4, 4, 20001, dtype=torch.float64)
    best = float(grid[torch.tensor([log_evidence(float(a)) for a in grid]).argmax()])
    assert abs(prior_precision("evidence", r, theta) / best - 1) < 1e-3
    assert prior_precision("reference_code", r, theta) == pytest.approx(float(theta.square().sum()) / r)
    assert prior_precision(2.5, r, theta) == 2.5
    with pytest.raises(ValueError, match="alpha must be a positive number or one of"):
        prior_precision("marginal", r, theta)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        prior_precision(-1.0, r, theta)


def test_largest_scale_brackets_the_tolerance() -> None:
    def nll(c: float) -> float:  # rises quadratically: 1 + c^2 / 100, so 1% is reached at c = 1
        return 1.0 + c * c / 100

    c = largest_scale(nll, tolerance=0.01, start=0.01, refinements=8)
    assert c <= 1.0 and c > 0.99
    assert largest_scale(nll, tolerance=0.01, start=50.0, refinements=8) == pytest.approx(1.0, rel=0.01)
    assert largest_scale(lambda c: 1.0 + 1e9 * c, tolerance=0.01, steps=3) == 0.0
    # the tolerance is relative to nll(0): 3 (1 + c^2 / 100) also crosses 1% at c = 1
    assert largest_scale(lambda c: 3.0 * nll(c), tolerance=0.01, start=50.0, refinements=8) == pytest.approx(1.0, rel=0.01)


def test_a_changed_batch_under_a_cached_key_is_refused(problem) -> None:
    function, _, _, jacobians, _ = problem
    projections = AlternatingProjections(function.size, 2, dtype=torch.float64)
    projections.project(jacobians[0], key=0)
    with pytest.raises(RuntimeError, match="micro-batch 0 differs"):
        projections.project(jacobians[1], key=0)
    with pytest.raises(RuntimeError, match="micro-batch 0 differs"):  # a change of 1e-4, e.g. one pixel, is seen too
        projections.project(jacobians[0] * (1 + 1e-4), key=0)
    with pytest.raises(RuntimeError, match="micro-batch 0 differs"):  # the same examples in another order
        projections.project(jacobians[0].flip(0), key=0)
    with pytest.raises(RuntimeError, match="micro-batch 0 differs"):  # a shorter batch
        projections.project(jacobians[0][:-1], key=0)
    projections.project(jacobians[0].clone(), key=0)  # the same batch again is served from the cache


def test_gram_factor_cache_returns_what_was_stored_across_blocks_and_sizes(monkeypatch) -> None:
    from lightning_bayes.inference.linalg import GramFactor
    from lightning_bayes.inference.nullspace import GramFactorCache

    monkeypatch.setattr(GramFactorCache, "BLOCK_BYTES", 3 * 8 * 6 * 6)  # three 6x6 slots per block
    cache = GramFactorCache()
    generator = torch.Generator().manual_seed(8)
    stored = {}
    for key, rows in enumerate([6, 6, 6, 6, 4, 6, 8]):
        a = torch.randn(rows, rows, dtype=torch.float64, generator=generator)
        stored[key] = GramFactor.of(a @ a.T)
        cache.put(key, torch.tensor([float(key)]), stored[key])
    assert len(cache) == 7 and cache.get(99) is None
    for key, factor in stored.items():
        fingerprint, cached = cache.get(key)
        assert fingerprint.item() == key
        assert torch.equal(cached.eigenvectors, factor.eigenvectors)
        assert torch.equal(cached.inverse_eigenvalues, factor.inverse_eigenvalues)


def test_largest_scale_allows_the_same_increase_when_the_nll_is_negative() -> None:
    """A Gaussian's NLL may be negative: the bound is ``nll(0) + tolerance |nll(0)|`` (``(1 + tolerance) nll(0)``
    lay below nll(0), so no scale passed and the search returned 0). Both curves allow c^2 <= 100."""
    positive = largest_scale(lambda c: 1.0 + 1e-4 * c * c, tolerance=0.01, refinements=8)
    negative = largest_scale(lambda c: -1.0 + 1e-4 * c * c, tolerance=0.01, refinements=8)
    assert negative == positive == pytest.approx(10.0, rel=0.01)


def test_the_sweep_residual_is_the_mean_over_batches_before_their_projection() -> None:
    torch.manual_seed(0)
    jacobians = [torch.randn(3, 20, dtype=torch.float64) for _ in range(4)]
    projections = AlternatingProjections(20, 5, seed=1, accelerate=False, dtype=torch.float64)
    samples, expected = projections.samples.clone(), []
    projections.begin_sweep()
    for key, jacobian in enumerate(jacobians):
        expected.append(((samples @ jacobian.T).norm(dim=1) / samples.norm(dim=1)).mean())
        samples = samples - (jacobian.T @ torch.linalg.solve(jacobian @ jacobian.T, jacobian @ samples.T)).T
        projections.project(jacobian, key=key)
    projections.end_sweep()
    assert projections.mean_sweep_residual() == pytest.approx(float(torch.stack(expected).mean()), rel=1e-12)
    torch.testing.assert_close(projections.samples, samples, rtol=1e-12, atol=1e-12)


def test_rank_estimate_is_the_sample_mean_of_the_image_quadratic_forms() -> None:
    """With exact projections v_s = P eps_s, r is mean_s eps_s^T (I - P) eps_s (a mean over S = 3, not a sum over
    S - 1)."""
    jacobian = torch.randn(5, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    projections = AlternatingProjections(12, 3, seed=9, rtol=1e-12, accelerate=False, dtype=torch.float64)
    sweep(projections, [jacobian], 1)  # one batch: one projection is exact
    eps = projections.noise
    image = torch.eye(12, dtype=torch.float64) - kernel_projector(jacobian)
    expected = ((eps @ image) * eps).sum(-1).mean()
    torch.testing.assert_close(projections.rank_estimate(), expected, rtol=1e-12, atol=0)


def test_absolute_cutoff_reaches_the_gram_factor() -> None:
    """atol=1e-3 drops the Gram eigenvalue 1e-4 (rtol would keep it): only the first row's direction is removed."""
    jacobian = torch.zeros(2, 6, dtype=torch.float64)
    jacobian[0, 0], jacobian[1, 1] = 1.0, 1e-2  # J J^T = diag(1, 1e-4)
    projections = AlternatingProjections(6, 4, seed=10, atol=1e-3, accelerate=False, dtype=torch.float64)
    assert projections.factor(jacobian).rank == 1
    assert GramFactor.of(gram(jacobian), rtol=projections.rtol).rank == 2
    projections.project(jacobian)
    expected = projections.noise.clone()
    expected[:, 0] = 0.0
    torch.testing.assert_close(projections.samples, expected, rtol=0, atol=1e-15)
