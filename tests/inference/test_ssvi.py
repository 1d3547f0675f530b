"""SSVI core: the masked Gaussian family, removal scores, support initialisation and updates, optimiser-state
masking and FLOP counts, against closed forms, Monte Carlo moments and explicit computations (float64)."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from lightning_bayes.inference.point_mass import PointMass
from lightning_bayes.inference.sparse_gaussian import SparseGaussian
from lightning_bayes.inference.ssvi_flops import (
    LayerCost,
    forward_flops,
    training_flops_ratio,
    update_iterations,
)
from lightning_bayes.inference.ssvi_scores import (
    SCORES,
    exp_abs_moment,
    folded_normal_moments,
    removal_score,
)
from lightning_bayes.inference.ssvi_topology import (
    EPS_RHO,
    drop_fraction,
    initialise_support,
    is_update_iteration,
    mask_optimizer_state,
    update_support,
)
from lightning_bayes.inference.variational_layers import VariationalLayer

pytestmark = pytest.mark.usefixtures("single_thread")


def sparse_family(shape=(6, 5), density=0.4, seed=0) -> SparseGaussian:
    family = SparseGaussian(shape).double()
    initialise_support(family, density, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # spread the values so that scores and means are distinct
        g = torch.Generator().manual_seed(seed + 1)
        family.loc.copy_(torch.randn(shape, generator=g, dtype=torch.float64) * family.mask)
        family.raw_scale.copy_((torch.randn(shape, generator=g, dtype=torch.float64) - 1) * family.mask)
    return family


def sparse_layer(template: nn.Module, density: float = 0.3, seed: int = 0) -> VariationalLayer:
    layer = VariationalLayer(template, family="sparse_gaussian").double()
    assert isinstance(layer.weight, SparseGaussian) and isinstance(layer.bias, PointMass)
    initialise_support(layer.weight, density, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # scales around 0.3, so that the output noise is far above the 1e-16 variance clamp
        noise = 0.3 * torch.randn(layer.weight.mask.shape, generator=torch.Generator().manual_seed(seed + 1))
        layer.weight.raw_scale.copy_((math.log(math.expm1(0.3)) + noise) * layer.weight.mask)
    return layer


# 1. exact sparsity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density, size", [(0.1, 2400), (0.05, 150), (0.33, 7)])
def test_initial_support_has_exactly_round_density_n_entries_and_zeros_off_it(density, size):
    family = SparseGaussian((size,))
    initialise_support(family, density, torch.Generator().manual_seed(0))
    assert family.num_active == round(density * size)
    assert (family.loc[~family.mask] == 0).all() and (family.raw_scale[~family.mask] == 0).all()
    assert (family.scale[~family.mask] == 0).all() and (family.scale[family.mask] > 0).all()


def test_initial_values_follow_the_spec_distributions():
    family = SparseGaussian((200_000,))
    initialise_support(family, 0.5, torch.Generator().manual_seed(0))
    mean, scale = family.loc[family.mask].double(), family.scale[family.mask].double()
    n = mean.numel()
    # mu ~ N(0, 0.01^2): mean within 4 standard errors, std within 4 relative standard errors sqrt(1 / (2n))
    assert abs(mean.mean()) < 4 * 0.01 / math.sqrt(n)
    assert abs(mean.std() / 0.01 - 1) < 4 / math.sqrt(2 * n)
    # sigma ~ |N(1e-3, (5e-4)^2)|: the fold at 0 is 2 standard deviations away, its folded mean is the closed form
    folded_mean, folded_variance = folded_normal_moments(torch.tensor(1e-3, dtype=torch.float64), torch.tensor(5e-4, dtype=torch.float64))
    assert abs(scale.mean() - folded_mean) < 4 * folded_variance.sqrt() / math.sqrt(n)


def test_backbone_mean_init_keeps_the_initial_weights_on_the_support_scaled_by_one_over_sqrt_density():
    initial = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    family = SparseGaussian((40, 30), init_mean=initial)
    initialise_support(family, 0.25, torch.Generator().manual_seed(1), mean_init="backbone")
    reference = SparseGaussian((40, 30))
    initialise_support(reference, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(family.mask, reference.mask)  # the same support whatever the means
    assert torch.equal(family.loc.detach(), initial * 2.0 * family.mask)
    assert torch.equal(family.raw_scale.detach(), reference.raw_scale.detach())


def test_gradients_are_exactly_zero_off_the_mask():
    layer = sparse_layer(nn.Linear(5, 4))
    x = torch.randn(3, 5, dtype=torch.float64)
    (layer(x).square().sum() + layer.kl()).backward()
    off = ~layer.weight.mask
    assert (layer.weight.loc.grad[off] == 0).all() and (layer.weight.raw_scale.grad[off] == 0).all()
    assert (layer.weight.loc.grad[~off] != 0).any()


def test_recorded_dense_gradient_is_the_gradient_of_the_masked_mean_weight_also_off_the_mask():
    layer = sparse_layer(nn.Linear(5, 4).double())
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layer.weight.record_dense_gradient = True
    torch.manual_seed(3)
    layer(x).square().sum().backward()
    # the same forward written out with the mean weight as a leaf: its full gradient, off the mask included
    weight = layer.weight.mean.detach().requires_grad_()
    torch.manual_seed(3)
    mean = torch.nn.functional.linear(x, weight, layer.bias.mean.detach())
    variance = torch.nn.functional.linear(x.square(), layer.weight.scale.detach().square())
    (mean + variance.clamp_min(1e-16).sqrt() * torch.randn_like(mean)).square().sum().backward()
    assert torch.allclose(layer.weight.dense_gradient, weight.grad, rtol=1e-12, atol=0)
    assert (layer.weight.dense_gradient[~layer.weight.mask] != 0).all()
    first = layer.weight.dense_gradient.clone()
    torch.manual_seed(3)
    layer(x).square().sum().backward()  # a second backward adds to the score
    torch.testing.assert_close(layer.weight.dense_gradient, 2 * first, rtol=1e-12, atol=0)


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, lr=0.1)
])
def test_optimizer_state_is_masked_for_every_state_tensor_of_the_parameter_shape(optimizer):
    parameter = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = optimizer([parameter])
    parameter.grad = torch.randn(4, 3, dtype=torch.float64)
    opt.step()
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    before = {k: v.clone() for k, v in opt.state[parameter].items()}
    mask_optimizer_state(opt, parameter, mask)
    for key, value in opt.state[parameter].items():
        if value.shape == parameter.shape:
            assert torch.equal(value, before[key] * mask)
        else:  # Adam's step counter is not per weight
            assert torch.equal(value, before[key])
    assert sum(v.shape == parameter.shape for v in opt.state[parameter].values()) == (1 if "momentum_buffer" in before else 2)


# 2. off-mask independence -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [nn.Linear(6, 4), nn.Conv2d(2, 3, 3, padding=1)])
def test_off_mask_mean_and_rho_have_no_effect_on_outputs_or_kl(template):
    layer = sparse_layer(template.double())
    x = torch.randn(2, *((6,) if isinstance(template, nn.Linear) else (2, 5, 5)), dtype=torch.float64)
    torch.manual_seed(1)
    reference, reference_kl = layer(x), layer.kl()
    with torch.no_grad():
        off = ~layer.weight.mask
        layer.weight.loc[off] = 7.0
        layer.weight.raw_scale[off] = 3.0
    torch.manual_seed(1)
    assert torch.equal(layer(x), reference) and torch.equal(layer.kl(), reference_kl)
    torch.manual_seed(2)
    weights, log_q = layer.weight.sample(3)
    assert (weights[:, off] == 0).all() and (log_q[:, off] == 0).all()
    on = Normal(layer.weight.loc, torch.nn.functional.softplus(layer.weight.raw_scale))
    torch.testing.assert_close(log_q[:, ~off], on.log_prob(weights)[:, ~off], rtol=1e-12, atol=1e-12)


# 3. schedule ------------------------------------------------------------------------------------------------------
def test_drop_fraction_is_the_cosine_decay_and_zero_from_the_end():
    alpha, end = 0.3, 750
    assert drop_fraction(0, end, alpha) == pytest.approx(0.3, abs=1e-15)
    assert drop_fraction(end // 2, end, alpha) == pytest.approx(0.15 * (1 + math.cos(math.pi * 375 / 750)), abs=1e-15)
    assert drop_fraction(600, end, alpha) == pytest.approx(0.15 * (1 + math.cos(0.8 * math.pi)), abs=1e-15)
    assert drop_fraction(end, end, alpha) == 0.0 and drop_fraction(end + 5, end, alpha) == 0.0


def test_updates_happen_only_at_multiples_of_delta_t_before_the_end():
    updates = [t for t in range(1001) if is_update_iteration(t, 100, 750)]
    assert updates == [100, 200, 300, 400, 500, 600, 700]
    assert update_iterations(1000, 100, 750) == 7 and update_iterations(250, 100, 750) == 2
    assert [t for t in range(6) if is_update_iteration(t, 1, 5)] == [1, 2, 3, 4]  # counted from 1: never t = 0


@pytest.mark.parametrize("score", SCORES)
def test_update_drops_the_lowest_scores_and_grows_the_largest_inactive_gradients(score):
    family = sparse_family((10, 10), density=0.3)
    before_mask = family.mask.clone().view(-1)
    scores = removal_score(family.mean, family.scale, score).view(-1)
    gradient = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fraction = 0.27
    change = update_support(family, gradient, fraction, score)
    count = round(fraction * 30)
    assert len(change.dropped) == len(change.grown) == count == 8
    assert not set(change.dropped.tolist()) & set(change.grown.tolist())
    active = before_mask.nonzero().view(-1)
    expected_drop = active[torch.argsort(scores[active])[:count]]
    inactive = (~before_mask).nonzero().view(-1)
    expected_grow = inactive[torch.argsort(gradient.view(-1)[inactive].abs(), descending=True)[:count]]
    assert set(change.dropped.tolist()) == set(expected_drop.tolist())
    assert set(change.grown.tolist()) == set(expected_grow.tolist())
    after = family.mask.view(-1)
    assert family.num_active == 30 and (after != before_mask).sum() == 2 * count
    assert (family.loc.view(-1)[~after] == 0).all() and (family.raw_scale.view(-1)[~after] == 0).all()


def test_update_at_high_density_grows_at_most_the_inactive_entries():
    family = sparse_family((10, 10), density=0.8)
    before_mask = family.mask.clone().view(-1)
    gradient = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    change = update_support(family, gradient, 0.5)  # round(0.5 * 80) = 40 > the 20 inactive entries
    assert len(change.dropped) == len(change.grown) == 20
    assert set(change.grown.tolist()) == set((~before_mask).nonzero().view(-1).tolist())
    assert family.num_active == 80


# 4. grown weights -------------------------------------------------------------------------------------------------
def test_grown_weights_start_at_mean_zero_and_the_mean_rho_of_the_kept_weights():
    family = sparse_family((8, 8), density=0.5)
    before = family.raw_scale.detach().clone().view(-1)
    gradient = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    change = update_support(family, gradient, 0.25, grow_rho="mean")
    kept = family.mask.view(-1).clone()
    kept[change.grown] = False
    expected = before[kept].mean()
    assert (family.loc.view(-1)[change.grown] == 0).all()
    assert torch.allclose(family.raw_scale.view(-1)[change.grown], expected.expand(len(change.grown)), rtol=0, atol=1e-7)
    eps = sparse_family((8, 8), density=0.5)
    change = update_support(eps, gradient, 0.25, grow_rho="eps")
    assert torch.allclose(eps.scale.view(-1)[change.grown], torch.full((len(change.grown),), 1e-6, dtype=torch.float64))
    assert EPS_RHO == pytest.approx(math.log(math.expm1(1e-6)))


def test_a_drop_that_keeps_no_weight_grows_with_the_mean_rho_of_those_dropped():
    """round(0.9 * 3) = 3 of 3 active weights dropped: no kept weight to average (a NaN scale before), so the grown
    weights take the mean raw scale of the 3 before the drop."""
    family = sparse_family((4, 4), density=3 / 16)
    assert family.num_active == 3
    before = family.raw_scale.detach().view(-1)[family.mask.view(-1)].clone()
    gradient = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    change = update_support(family, gradient, 0.9, grow_rho="mean")
    assert len(change.dropped) == 3 and family.num_active == 3
    grown = family.raw_scale.view(-1)[change.grown]
    torch.testing.assert_close(grown, before.mean().expand(3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("score", ["mean", "snr"])
def test_large_negative_means_are_kept_over_small_positive_ones(score):
    """The scores take ``|mu|``: the weights of mean -3 outrank those of mean 0.01 (a signed score dropped them)."""
    family = sparse_family((4, 5), density=1.0)
    with torch.no_grad():
        family.loc.copy_(torch.tensor([-3.0, 0.01] * 10, dtype=torch.float64).view(4, 5))
        family.raw_scale.fill_(0.0)  # equal scales: both scores order by |mu|
    gradient = torch.zeros(4, 5, dtype=torch.float64)
    family.mask.view(-1)[::4] = False  # 5 inactive entries to grow into
    change = update_support(family, gradient, 0.3, score)
    assert len(change.dropped) == 4 and (family.loc.detach().view(-1)[change.dropped] == 0).all()
    kept_negative = [i for i in range(20) if i % 2 == 0 and i % 4 != 0]
    assert not set(change.dropped.tolist()) & set(kept_negative)


# 5. scores --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-1.5, 0.0, 0.5, 3.0])
def test_folded_normal_and_exp_scores_match_monte_carlo_moments(ratio):
    sigma, n = 0.7, 1_000_000
    mu = ratio * sigma
    theta = (mu + sigma * torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).abs()
    mean, scale = torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
    first, variance = folded_normal_moments(mean, scale)
    # E|theta| within 4 standard errors; the sample variance within 4 of its standard errors sqrt((m4 - v^2) / n)
    assert abs(theta.mean() - first) < 4 * theta.std() / math.sqrt(n)
    centred = theta - theta.mean()
    assert abs(centred.square().mean() - variance) < 4 * ((centred**4).mean() - centred.square().mean() ** 2).sqrt() / math.sqrt(n)
    assert torch.allclose(removal_score(mean, scale, "e_mean_abs"), first)
    assert torch.allclose(removal_score(mean, scale, "snr_mean_abs"), first / variance.sqrt())
    # E exp(|theta|) and E exp(2|theta|) likewise (lambda = 1)
    for lam in (1.0, 2.0):
        draws = torch.exp(lam * theta)
        assert abs(draws.mean() - exp_abs_moment(mean, scale, lam)) < 4 * draws.std() / math.sqrt(n)
    m1, m2 = exp_abs_moment(mean, scale, 1.0), exp_abs_moment(mean, scale, 2.0)
    assert torch.allclose(removal_score(mean, scale, "e_exp_mean_abs"), m1)
    assert torch.allclose(removal_score(mean, scale, "snr_exp_mean_abs"), m1 / (m2 - m1.square()).sqrt())
    half = exp_abs_moment(mean, scale, 0.5)  # lambda = 1/2: E exp(|theta|/2) over the sd of exp(|theta|/2)
    assert torch.allclose(removal_score(mean, scale, "snr_exp_mean_abs", lam=0.5), half / (m1 - half.square()).sqrt())
    assert torch.equal(removal_score(mean, scale, "mean"), mean.abs())
    assert torch.allclose(removal_score(mean, scale, "snr"), mean.abs() / scale)


def test_folded_snr_has_no_cancellation_when_sigma_is_tiny():
    mean, scale = torch.tensor([0.3], dtype=torch.float64), torch.tensor([1e-9], dtype=torch.float64)
    # |theta| = theta almost surely: E = 0.3, sd = sigma, SNR = 0.3 / 1e-9 to relative 1e-12
    assert removal_score(mean, scale, "snr_mean_abs").item() == pytest.approx(3e8, rel=1e-12)


@pytest.mark.parametrize("score", SCORES)
def test_nan_scores_become_zero(score):
    mean, scale = torch.tensor([float("nan"), 0.0]), torch.tensor([1.0, 0.0])
    values = removal_score(mean, scale, score)
    assert values[0] == 0 and not values.isnan().any()


# 6. KL ------------------------------------------------------------------------------------------------------------
def test_kl_is_the_closed_form_over_active_entries_only():
    family = sparse_family((7, 9), density=0.3)
    prior_scale = 0.5
    active = family.mask
    mu, sigma = family.loc[active], torch.nn.functional.softplus(family.raw_scale[active])
    closed = (torch.log(prior_scale / sigma) + (sigma**2 + mu**2) / (2 * prior_scale**2) - 0.5).sum()
    prior = Normal(torch.zeros((), dtype=torch.float64), torch.full((), prior_scale, dtype=torch.float64))
    reference = kl_divergence(Normal(mu, sigma), prior).sum()
    kl = family.kl_to_prior(prior_scale)
    assert torch.allclose(kl, closed, rtol=0, atol=1e-10) and torch.allclose(kl, reference, rtol=0, atol=1e-10)
    assert PointMass(torch.ones(3)).kl_to_prior(prior_scale) == 0


# 7. local reparameterisation --------------------------------------------------------------------------------------
def test_sparse_local_reparameterisation_matches_weight_sampling():
    layer = sparse_layer(nn.Linear(6, 4).double(), density=0.4)
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    draws = 100_000
    torch.manual_seed(2)
    with torch.no_grad():
        by_output = layer(x.repeat(draws, 1)).view(draws, 2, 4)  # one output noise per row
        weights, _ = layer.weight.sample(draws)  # explicit weight draws [S, 4, 6], zero off the mask
        by_weight = torch.einsum("bi,soi->sbo", x, weights) + layer.bias.mean
    mean = x @ layer.weight.mean.T + layer.bias.mean
    variance = x.square() @ layer.weight.scale.square().T  # deterministic bias: no variance of its own
    for outputs in (by_output, by_weight):
        assert ((outputs.mean(0) - mean).abs() < 4 * (variance / draws).sqrt()).all()
        # the sample variance of a Gaussian has relative standard error sqrt(2 / (n - 1))
        assert ((outputs.var(0) / variance - 1).abs() < 4 * math.sqrt(2 / (draws - 1))).all()


# FLOP counts ------------------------------------------------------------------------------------------------------
def test_flop_count_of_lenet_layers_and_the_training_ratio():
    # LeNet-5 on 28x28: conv(1->6, 5) at 24x24, conv(6->16, 5) at 8x8, then 256->120->84->10
    layers = [LayerCost(150, 150, 576), LayerCost(240, 2400, 64), LayerCost(3072, 30720, 1), LayerCost(1008, 10080, 1),
              LayerCost(84, 840, 1)]
    dense_macs = 150 * 576 + 2400 * 64 + 30720 + 10080 + 840
    sparse_macs = 150 * 576 + 240 * 64 + 3072 + 1008 + 84
    assert forward_flops(layers, dense=True) == 4 * dense_macs  # 2 FLOPs per MAC, mean and variance paths
    assert forward_flops(layers, local_reparameterization=False) == 2 * sparse_macs
    total, every, end = 1000, 100, 750  # 7 updates
    expected = (993 * 3 * sparse_macs + 7 * (2 * sparse_macs + dense_macs)) / (1000 * 3 * dense_macs)
    assert training_flops_ratio(layers, total, every, end) == pytest.approx(expected, rel=1e-15)
    uniform = [LayerCost(k // 10, k, p) for k, p in ((150, 576), (2400, 64), (30720, 1), (10080, 1), (840, 1))]
    assert training_flops_ratio(uniform, total, every, end) == pytest.approx(0.1 + 7 * 0.9 / 3000, rel=1e-12)


@pytest.mark.parametrize("total", [1, 9, 10, 11, 30])
@pytest.mark.parametrize(("every", "end"), [(1, 100), (3, 100), (5, 10), (5, 11), (10, 1)])
def test_update_count_is_the_number_of_update_iterations(total, every, end):
    # the FLOP model counts the iterations the training loop updates at: t in 1..total with is_update_iteration
    expected = sum(is_update_iteration(t, every, end) for t in range(1, total + 1))
    assert update_iterations(total, every, end) == expected


# errors -----------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    family = sparse_family()
    with pytest.raises(ValueError, match="density"):
        initialise_support(family, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="mean_init"):
        initialise_support(family, 0.5, torch.Generator(), mean_init="kaiming")
    with pytest.raises(ValueError, match="dense_gradient"):
        update_support(family, torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="fraction"):
        update_support(family, torch.zeros(6, 5), 1.5)
    with pytest.raises(ValueError, match="grow_rho"):
        update_support(family, torch.zeros(6, 5), 0.1, grow_rho="max")
    with pytest.raises(ValueError, match="score"):
        removal_score(family.mean, family.scale, "magnitude")
    with pytest.raises(ValueError, match="total"):
        training_flops_ratio([LayerCost(1, 1, 1)], 0, 1, 1)
