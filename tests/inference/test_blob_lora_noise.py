"""BLoB as ``to_variational(peft_model, "*lora_A*")``: Gaussian A only, inside a real peft LoRA (a tiny random Llama).

peft's LoRA forward computes ``base(x) + scaling * lora_B(lora_A(dropout(x)))``; replacing ``lora_A`` by a
mean-field :class:`VariationalLayer` puts the noise in the LoRA branch only, with per-example (local
reparameterisation) variance ``sum_j x_j^2 Omega_ij^2`` on ``(A x)_i``, the per-example marginal of BLoB's flipout.
"""

import copy

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tiny_lora_llama import VOCAB, perturb_lora_b, tiny_lora_llama

from lightning_bayes.inference.variational_layers import (
    VariationalLayer,
    to_variational,
    total_kl,
)

PRIOR_SCALE = 0.2  # BLoB's beta


def _tiny_lora_llama(seed: int = 0) -> torch.nn.Module:
    model = tiny_lora_llama(seed)
    perturb_lora_b(model)
    return model.eval()


def _variational_a(model: torch.nn.Module, init_scale: float) -> list[VariationalLayer]:
    to_variational(model, "*lora_A*", family="gaussian", prior_scale=PRIOR_SCALE, init_scale=init_scale)
    return [m for m in model.modules() if isinstance(m, VariationalLayer)]


def test_vanishing_variance_gives_the_deterministic_lora(single_thread):
    model = _tiny_lora_llama()
    reference = copy.deepcopy(model)
    layers = _variational_a(model, init_scale=1e-12)
    assert len(layers) == 4 and all(layer.noise for layer in layers)  # q and v of two blocks, sampling
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, sampled = reference(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(sampled, expected, atol=1e-6, rtol=0)


def test_kl_is_the_closed_form_over_the_a_matrices_only(single_thread):
    model = _tiny_lora_llama()
    layers = _variational_a(model, init_scale=0.05)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers:
            raw = torch.randn(layer.weight.raw_scale.shape, generator=generator, dtype=torch.float64)
            layer.weight.raw_scale.copy_(raw - 3)
    prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(PRIOR_SCALE, dtype=torch.float64))
    expected = sum(kl_divergence(Normal(layer.weight.mean, layer.weight.scale), prior).sum() for layer in layers)
    torch.testing.assert_close(total_kl(model), expected, atol=1e-10, rtol=0)
    assert all(layer.bias is None for layer in layers)  # peft's A has no bias: nothing else is variational


def test_lora_branch_noise_has_the_closed_form_mean_and_variance(single_thread):
    """Output of one adapted q_proj for 1e5 independent draws at a fixed input: mean base + s B M x, variance
    s^2 sum_i B_ki^2 sum_j x_j^2 Omega_ij^2, both within 4 standard errors."""
    model = _tiny_lora_llama()
    (layer, *_) = _variational_a(model, init_scale=0.05)
    projection = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert projection.lora_A["default"] is layer
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        raw = torch.rand(layer.weight.raw_scale.shape, generator=generator, dtype=torch.float64)
        layer.weight.raw_scale.copy_(raw - 3)
        x = torch.randn(16, generator=generator, dtype=torch.float64)
        draws = 100_000
        torch.manual_seed(4)
        outputs = projection(x.expand(draws, 16))
    scaling = projection.scaling["default"]
    b, m, omega = projection.lora_B["default"].weight, layer.weight.mean, layer.weight.scale
    mean = projection.base_layer(x) + scaling * b @ (m @ x)
    variance = scaling**2 * (b.square() @ (omega.square() @ x.square()))
    assert ((outputs.mean(0) - mean).abs() <= 4 * (variance / draws).sqrt()).all()
    # the sample variance of n Gaussian draws has standard error variance * sqrt(2 / (n - 1))
    assert ((outputs.var(0) - variance).abs() <= 4 * variance * (2 / (draws - 1)) ** 0.5).all()


def test_a_pattern_matching_no_lora_factor_is_refused():
    with pytest.raises(ValueError, match=r"params='\*lora_C\*' matched no parameter of PeftModel"):
        to_variational(_tiny_lora_llama(), "*lora_C*")
