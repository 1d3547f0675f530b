"""Conjugate gradients with reorthogonalisation against dense float64 linear algebra."""

import pytest
import torch

from lightning_bayes.inference.conjugate_gradient import conjugate_gradient


def _spd(size: int, condition: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), size, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def _rhs(size: int, count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_full_run_solves_an_ill_conditioned_system(single_thread):
    # kappa = 1e4: plain CG loses orthogonality long before 30 steps; reorthogonalised CG finishes in M steps
    matrix, rhs = _spd(30, 1e4, 0), _rhs(30, 3, 1)
    solution = conjugate_gradient(lambda p: p @ matrix, rhs, iterations=30)
    residual = (solution @ matrix - rhs).norm(dim=-1) / rhs.norm(dim=-1)
    assert residual.max() < 1e-10


def test_ten_steps_give_the_krylov_optimal_solution(single_thread):
    # after j steps CG minimises the G-norm of the error over K_j(G, r) = span(r, G r, ..., G^{j-1} r):
    # with an orthonormal basis V of K_j the minimiser is V (V^T G V)^{-1} V^T r
    matrix, rhs = _spd(30, 1e4, 2), _rhs(30, 2, 3)
    solution = conjugate_gradient(lambda p: p @ matrix, rhs, iterations=10)
    for s in range(2):
        krylov = [rhs[s]]
        for _ in range(9):
            krylov.append(matrix @ krylov[-1])
        basis, _ = torch.linalg.qr(torch.stack(krylov, dim=1))
        optimal = basis @ torch.linalg.solve(basis.T @ matrix @ basis, basis.T @ rhs[s])
        assert torch.allclose(solution[s], optimal, rtol=0, atol=1e-8 * optimal.norm())


def test_rank_deficient_consistent_system_stays_in_the_range(single_thread):
    generator = torch.Generator().manual_seed(4)
    factor = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    matrix = factor @ factor.T  # rank 5 in R^12
    rhs = (matrix @ torch.randn(12, 2, generator=generator, dtype=torch.float64)).T  # consistent: in range(G)
    solution = conjugate_gradient(lambda p: p @ matrix, rhs, iterations=12)
    assert ((solution @ matrix - rhs).norm(dim=-1) / rhs.norm(dim=-1)).max() < 1e-10
    null = torch.linalg.svd(factor.T).Vh[5:]  # basis of ker G = range(G)^perp
    assert (solution @ null.T).abs().max() < 1e-10 * solution.norm()
    assert torch.allclose(solution, rhs @ torch.linalg.pinv(matrix), atol=1e-9)


def test_converged_rows_stay_put_and_zero_rhs_gives_zero(single_thread):
    matrix = _spd(4, 10.0, 5)
    rhs = torch.cat([_rhs(4, 1, 6), torch.zeros(1, 4, dtype=torch.float64)])
    solution = conjugate_gradient(lambda p: p @ matrix, rhs, iterations=25)  # far more steps than M
    assert torch.allclose(solution[0], torch.linalg.solve(matrix, rhs[0]), rtol=1e-12, atol=1e-12)
    assert torch.equal(solution[1], torch.zeros(4, dtype=torch.float64))
    assert torch.isfinite(solution).all()


def test_calls_matvec_exactly_iterations_times(single_thread):
    calls = []
    conjugate_gradient(lambda p: calls.append(1) or p, _rhs(3, 1, 7), iterations=7)
    assert len(calls) == 7


@pytest.mark.parametrize("bad", [{"rhs": torch.zeros(3)}, {"iterations": 0}, {"tolerance": 1.0}])
def test_bad_input_names_the_argument(bad):
    kwargs = {"rhs": torch.zeros(1, 3), "iterations": 2, "tolerance": 1e-14, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        conjugate_gradient(lambda p: p, **kwargs)


def test_a_row_freezes_at_the_first_iterate_below_tolerance(single_thread):
    # the stopping rule is ||rho_j|| < tolerance ||r|| (compared squared): with tolerance 1e-2 a row must run on
    # through every iterate whose relative residual is above 1e-2 and keep the first one below it
    matrix, rhs, tolerance = _spd(30, 1e4, 8), _rhs(30, 1, 9), 1e-2
    relative = [
        float((conjugate_gradient(lambda p: p @ matrix, rhs, iterations=k, tolerance=0.0) @ matrix - rhs).norm()
              / rhs.norm())
        for k in range(1, 31)
    ]  # fmt: skip
    first = next(k for k, value in enumerate(relative, start=1) if value < tolerance)
    assert any(tolerance < value < 0.1 for value in relative[: first - 1])  # a looser rule would stop at one of these
    frozen = conjugate_gradient(lambda p: p @ matrix, rhs, iterations=30, tolerance=tolerance)
    torch.testing.assert_close(frozen, conjugate_gradient(lambda p: p @ matrix, rhs, iterations=first, tolerance=0.0),
                               rtol=0, atol=0)
