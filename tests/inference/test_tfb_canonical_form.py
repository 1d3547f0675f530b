"""TFB core: the SVD canonical form, the isotropic weight noise it induces, and the bisection."""

import pytest
import torch

from lightning_bayes.inference.training_free_bayes import (
    Bisection,
    CanonicalLoraNoise,
    canonical_lora,
    noise_scales,
    relative_nll_change,
)


def _factors(out: int = 6, rank: int = 3, inp: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=generator), torch.randn(out, rank, generator=generator)


def test_canonical_form_preserves_the_product_and_orthogonalises_b():
    a, b = _factors()
    canonical_a, canonical_b, d = canonical_lora(a, b)
    # fp32 products of O(1) entries summed over r = 3 terms: rounding ~1e-6
    torch.testing.assert_close(canonical_b @ canonical_a, b @ a, atol=1e-5, rtol=0)
    u = canonical_b / d
    torch.testing.assert_close(u.T @ u, torch.eye(3), atol=1e-6, rtol=0)
    assert bool((d[:-1] >= d[1:]).all())


def test_weight_noise_covariance_is_isotropic_on_the_column_space_of_u():
    """Cov(vec(B' E)) = sigma^2 (U U^T kron I_in) for the row-major vec, from 200k draws."""
    out, rank, inp, sigma, draws = 4, 2, 3, 0.3, 200_000
    a, b = _factors(out, rank, inp, seed=1)
    noise = CanonicalLoraNoise({("A", "B"): (a.double(), b.double())})
    generator = torch.Generator().manual_seed(2)
    scale = noise.scale_0
    z = torch.randn(draws, rank, inp, generator=generator, dtype=torch.float64)
    weights = noise.b_0 @ (sigma * scale * z)  # B' E for each draw, [draws, out, inp]
    # the same draws through draw(): one check that draw() adds exactly sigma (1/d) Z to A'
    first = noise.draw(sigma, torch.Generator().manual_seed(3))
    z_first = torch.randn(rank, inp, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(first["A"], noise.a_0 + sigma * scale * z_first, atol=1e-15, rtol=0)
    torch.testing.assert_close(first["B"], noise.b_0, atol=0, rtol=0)
    state = torch.get_rng_state()
    assert noise.draw(0.0)["A"] is noise.a_0 and torch.equal(torch.get_rng_state(), state)  # the mean: no draw
    flat = weights.reshape(draws, -1)
    empirical = flat.T @ flat / draws  # zero mean by construction
    u = noise.b_0 / noise.b_0.norm(dim=0)
    expected = sigma**2 * torch.kron(u @ u.T, torch.eye(inp, dtype=torch.float64))
    # each entry is a mean of 2e5 products of Gaussians with variances <= sigma^2: standard error
    # <= sqrt(2) sigma^2 / sqrt(2e5) = 2.0e-4; 5 standard errors
    assert (empirical - expected).abs().max() < 5 * 2**0.5 * sigma**2 / draws**0.5


def test_an_antithetic_pair_mirrors_one_noise_draw():
    a, b = _factors()
    noise = CanonicalLoraNoise({("A", "B"): (a, b), ("A2", "B2"): _factors(seed=5)})
    plus, minus = noise.antithetic_pair(0.1, torch.Generator().manual_seed(0))
    single = noise.draw(0.1, torch.Generator().manual_seed(0))
    for name, mean in (("A", noise.a_0), ("A2", noise.a_1)):
        torch.testing.assert_close(plus[name], single[name], atol=0, rtol=0)
        torch.testing.assert_close(plus[name] - mean, mean - minus[name], atol=1e-7, rtol=0)
    assert minus["B"] is plus["B"] is noise.b_0


def test_a_missing_direction_carries_no_noise():
    d = torch.tensor([2.0, 0.5, 0.0])
    torch.testing.assert_close(noise_scales(d), torch.tensor([0.5, 2.0, 0.0]))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_the_missing_direction_cutoff_is_relative_to_the_largest_singular_value(scale):
    # d_3 / d_1 = 5e-10 is below r eps = 3.6e-7 at every scale: absent, however large d_3 is in absolute terms
    d = scale * torch.tensor([2.0, 0.5, 1e-9])
    torch.testing.assert_close(noise_scales(d), torch.tensor([0.5, 2.0, 0.0]) / scale)


@pytest.mark.parametrize("threshold", [0.0123, 0.5, 0.999, 1.0, 2.0])
def test_bisection_returns_the_largest_feasible_value(threshold):
    low, high, iterations = 0.001, 1.0, 12
    calls: list[float] = []

    def feasible(sigma: float) -> bool:
        calls.append(sigma)
        return sigma <= threshold

    search = Bisection(low, high)
    for _ in range(iterations):
        if search.done:
            break
        search.update(feasible(search.candidate()))
    found = search.low
    assert found <= min(threshold, high)
    # after the test of high and k - 1 halvings the bracket is (high - low) / 2^(k-1) wide
    assert min(threshold, high) - found <= (high - low) / 2 ** (iterations - 1)
    assert len(calls) == (1 if threshold >= high else iterations)


def test_bisection_resumes_from_its_state():
    search = Bisection(0.0, 1.0)
    for verdict in (False, True, False):
        search.update(verdict)
    resumed = Bisection(*search.state())
    assert resumed.candidate() == search.candidate() == 0.625


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="low < high"):
        Bisection(0.1, 0.1)
    with pytest.raises(ValueError, match="r x in"):
        canonical_lora(torch.zeros(2, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="at least one"):
        CanonicalLoraNoise({})


def test_one_untrained_adapter_among_trained_ones_is_not_degenerate_and_tiny_directions_get_no_noise():
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    assert not CanonicalLoraNoise({("a0", "b0"): (a, b), ("a1", "b1"): (a, torch.zeros(3, 2))}).is_degenerate()
    eps = torch.finfo(torch.float64).eps  # the cutoff is r * eps * d_max: 2 eps of r = 3 is below it
    torch.testing.assert_close(
        noise_scales(torch.tensor([1.0, 2 * eps, 0.5], dtype=torch.float64)),
        torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64),
    )


def test_the_nll_change_is_relative_and_absolute_both_ways():
    """A candidate that lowers the anchor NLL by more than the tolerance is as infeasible as one that raises it."""
    assert relative_nll_change(2.0, 2.5) == pytest.approx(0.25, rel=1e-15)
    assert relative_nll_change(2.0, 1.5) == pytest.approx(0.25, rel=1e-15)
    assert relative_nll_change(0.0, 0.0) == 0.0
