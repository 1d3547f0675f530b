"""The balanced SVD form of LoRA factors: same product, one representative per GL(r) orbit, balanced."""

import math

import pytest
import torch

from lightning_bayes.inference.lora_gauge import balanced_lora, balanced_lora_tensors


def factors(seed: int = 0, out: int = 9, rank: int = 3, inputs: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rank, inputs, dtype=torch.float64, generator=generator),
        torch.randn(out, rank, dtype=torch.float64, generator=generator),
    )


def test_the_product_is_unchanged_and_the_factors_are_balanced():
    a, b = factors()
    a2, b2 = balanced_lora(a, b)
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=0, atol=1e-12)
    singular = torch.linalg.svdvals(b @ a)[:3]
    torch.testing.assert_close(b2.T @ b2, torch.diag(singular), rtol=0, atol=1e-12)  # B'^T B' = A' A'^T = diag(s)
    torch.testing.assert_close(a2 @ a2.T, torch.diag(singular), rtol=0, atol=1e-12)
    assert bool((b2.gather(0, b2.abs().argmax(0, keepdim=True)) > 0).all())  # each column's largest entry > 0


def test_every_member_of_a_gauge_orbit_maps_to_the_same_factors():
    a, b = factors(1)
    generator = torch.Generator().manual_seed(2)
    gauge = torch.randn(3, 3, dtype=torch.float64, generator=generator) + 3 * torch.eye(3, dtype=torch.float64)
    a2, b2 = balanced_lora(a, b)
    a3, b3 = balanced_lora(torch.linalg.solve(gauge, a), b @ gauge)
    torch.testing.assert_close(a3, a2, rtol=0, atol=1e-10)
    torch.testing.assert_close(b3, b2, rtol=0, atol=1e-10)


def test_rank_one_closed_form_and_the_sign_of_the_largest_magnitude_entry():
    """B = (-3, 1, 0)^T, A = (2, 0): s = |B| |A| = 2 sqrt(10); u = -B / |B| has its largest-magnitude entry positive
    (the largest signed entry of -u is positive too: the sign rule must read magnitudes), and (-A, -B) is the same
    orbit (S = -1)."""
    a = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[-3.0], [1.0], [0.0]], dtype=torch.float64)
    root = (b.norm() * a.norm()).sqrt()
    expected_b = root * torch.tensor([[3.0], [-1.0], [0.0]], dtype=torch.float64) / math.sqrt(10)
    expected_a = root * torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    for sign in (1.0, -1.0):
        a2, b2 = balanced_lora(sign * a, sign * b)
        torch.testing.assert_close(b2, expected_b, rtol=0, atol=1e-12)
        torch.testing.assert_close(a2, expected_a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_each_column_of_b_has_its_largest_magnitude_entry_positive(seed: int):
    a, b = factors(seed)
    for sign in (1.0, -1.0):
        b2 = balanced_lora(sign * a, sign * b)[1]
        assert bool((b2.gather(0, b2.abs().argmax(0, keepdim=True)) > 0).all())


def test_dtype_is_kept():
    a, b = factors()
    a2, b2 = balanced_lora(a.float(), b.float())
    assert a2.dtype == b2.dtype == torch.float32


def test_mismatched_ranks_are_refused():
    with pytest.raises(ValueError, match=r"a must be r x in and b out x r with the same r; got a \(3, 7\) and b"):
        balanced_lora(torch.zeros(3, 7), torch.zeros(9, 2))


def test_named_tensors_keep_every_product_and_leave_the_rest_alone():
    generator = torch.Generator().manual_seed(7)
    a = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    other = torch.randn(3, generator=generator, dtype=torch.float64)
    named = {"layer.lora_A.default.weight": a, "layer.lora_B.default.weight": b, "head.bias": other}
    balanced = balanced_lora_tensors(named)
    product = balanced["layer.lora_B.default.weight"] @ balanced["layer.lora_A.default.weight"]
    torch.testing.assert_close(product, b @ a, rtol=0, atol=1e-12)
    assert balanced["head.bias"] is other
    with pytest.raises(ValueError, match="lora_B"):
        balanced_lora_tensors({"layer.lora_A.default.weight": a})
