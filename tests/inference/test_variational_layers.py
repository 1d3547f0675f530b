"""Variational Linear / Conv2d layers: local reparameterisation against weight sampling, KL terms, conversion of a
model, errors (float64)."""

import copy
import math
import re

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from lightning_bayes.inference.point_mass import PointMass
from lightning_bayes.inference.sparse_gaussian import SparseGaussian
from lightning_bayes.inference import variational_layers
from lightning_bayes.inference.variational_layers import (
    VariationalLayer, draws_ahead, to_variational, total_kl, use_noise,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def gaussian_layer(local: bool) -> VariationalLayer:
    torch.manual_seed(0)
    layer = VariationalLayer(nn.Linear(4, 3), init_scale=0.3, local_reparameterization=local).double()
    with torch.no_grad():
        layer.weight.raw_scale.add_(0.3 * torch.randn(3, 4, dtype=torch.float64))
    return layer


def test_local_reparameterisation_output_moments_match_weight_sampling():
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    local, sampled = gaussian_layer(True), gaussian_layer(False)
    draws = 20_000
    torch.manual_seed(2)
    with torch.no_grad():
        by_output = torch.stack([local(x) for _ in range(draws)])
        by_weight = torch.stack([sampled(x) for _ in range(draws)])
    mean = x @ local.weight.mean.T + local.bias.mean  # closed form of both
    variance = x.square() @ local.weight.scale.square().T + local.bias.scale.square()
    for outputs in (by_output, by_weight):
        standard_error = (variance / draws).sqrt()
        assert ((outputs.mean(0) - mean).abs() < 5 * standard_error).all()
        # the sample variance of a Gaussian has relative standard error sqrt(2 / (n - 1))
        assert ((outputs.var(0) / variance - 1).abs() < 5 * math.sqrt(2 / (draws - 1))).all()


def test_gaussian_kl_is_closed_form_and_bernstein_kl_is_the_draws_log_ratio():
    layer = gaussian_layer(True)
    prior = Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    expected = sum(
        torch.distributions.kl_divergence(Normal(family.mean, family.scale), prior).sum() for family in (layer.weight, layer.bias)
    )
    assert torch.allclose(layer.kl(), expected, rtol=1e-12)
    flow = VariationalLayer(nn.Linear(4, 3), family="bernstein", degree=5, prior_scale=0.5, local_reparameterization=False)
    flow = flow.double()
    with pytest.raises(RuntimeError, match="forward"):
        flow.kl()
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.manual_seed(3)
    z_w, z_b = torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    torch.manual_seed(3)  # the forward draws the same base noise, weight first
    flow(x)
    weight, log_q_w = flow.weight(z_w)
    bias, log_q_b = flow.bias(z_b)
    prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    log_prior = prior.log_prob(weight).sum() + prior.log_prob(bias).sum()
    assert torch.allclose(flow.kl(), log_q_w.sum() + log_q_b.sum() - log_prior, rtol=1e-12)
    copied = copy.deepcopy(flow)  # the KL estimate carries the forward's graph; the copy gets its value
    assert copied.kl().grad_fn is None and torch.equal(copied.kl(), flow.kl().detach())
    assert flow.kl().grad_fn is not None  # the original keeps its graph for the step's backward


def test_convolution_output_moments_match_weight_sampling():
    torch.manual_seed(4)
    template = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    local = VariationalLayer(template, init_scale=0.2).double()
    sampled = VariationalLayer(template, init_scale=0.2, local_reparameterization=False).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    draws = 20_000
    with torch.no_grad():
        by_output = torch.stack([local(x) for _ in range(draws)])
        by_weight = torch.stack([sampled(x) for _ in range(draws)])
    mean = template(x)  # the means start at the template's weights
    variance = torch.nn.functional.conv2d(
        x.square(), torch.full_like(template.weight, 0.04), torch.full((3,), 0.04, dtype=torch.float64), stride=2, padding=1
    )
    for outputs in (by_output, by_weight):
        assert ((outputs.mean(0) - mean).abs() < 5 * (variance / draws).sqrt()).all()
        assert ((outputs.var(0) / variance - 1).abs() < 5 * math.sqrt(2 / (draws - 1))).all()


def test_to_variational_converts_the_selected_layers_from_their_weights():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    trained = {name: p.clone() for name, p in model.named_parameters()}
    assert to_variational(model, "2.*", init_scale=0.1) == ["2"]
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[2], VariationalLayer)
    assert torch.equal(model[2].weight.mean, trained["2.weight"]) and model[2].weight.mean.dtype == torch.float64
    assert to_variational(model, "all") == ["0"]
    assert torch.equal(model[0].bias.mean, trained["0.bias"])
    assert model(torch.randn(4, 1, 4, 4, dtype=torch.float64)).shape == (4, 3)
    assert torch.allclose(total_kl(model), model[0].kl() + model[2].kl())
    with pytest.raises(ValueError, match="params"):
        to_variational(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), "0.*")


def test_layers_without_bias_and_the_noise_free_mean_model():
    torch.manual_seed(6)
    template = nn.Linear(4, 3, bias=False).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    gaussian = VariationalLayer(template, init_scale=0.2).double()
    assert gaussian.bias is None
    prior = Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    expected = torch.distributions.kl_divergence(Normal(gaussian.weight.mean, gaussian.weight.scale), prior).sum()
    torch.testing.assert_close(gaussian.kl(), expected, rtol=1e-12, atol=0)
    # a flow is centred on the template's weights: its median f(0) is h(1/2) - beta = 0 + w for a symmetric support
    flow = VariationalLayer(template, family="bernstein", degree=4, support=(-0.3, 0.3), local_reparameterization=False)
    model = nn.Sequential(gaussian, nn.Tanh(), nn.Sequential(flow.double()))
    use_noise(model, False)
    with torch.no_grad():
        torch.testing.assert_close(gaussian(x), template(x), rtol=1e-12, atol=0)
        torch.testing.assert_close(flow(x), template(x), rtol=0, atol=1e-7)  # coefficients initialised in float32
    use_noise(model, True)
    with torch.no_grad():
        assert (gaussian(x) - template(x)).abs().max() > 1e-3 and (flow(x) - template(x)).abs().max() > 1e-3


def test_a_bare_layer_cannot_be_converted_in_place():
    with pytest.raises(ValueError, match="nn.Sequential"):
        to_variational(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"family": "student"}, "family"), ({"prior_scale": 0.0}, "prior_scale"),
     ({"family": "bernstein"}, "local_reparameterization"), ({"template": nn.ReLU()}, "template")],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VariationalLayer(**{"template": nn.Linear(4, 3), **kwargs})


@pytest.mark.parametrize("template", [nn.Linear(4, 3), nn.Conv2d(2, 3, 3)])
def test_sparse_gaussian_layers_have_sparse_weights_and_deterministic_biases(template):
    # SSVI (Li et al. 2024): every weight matrix or kernel is a masked Gaussian, biases are point masses
    layer = VariationalLayer(template, family="sparse_gaussian")
    assert isinstance(layer.weight, SparseGaussian) and isinstance(layer.bias, PointMass)


@pytest.mark.parametrize("per_call", [None, 2 * (3 * 4 + 3)])  # all S at once; two draws per sample() call
def test_draws_ahead_serves_the_families_batched_draws_in_order(monkeypatch, per_call):
    if per_call is not None:
        monkeypatch.setattr(variational_layers, "DRAW_AHEAD_ELEMENTS", per_call)
    torch.manual_seed(0)
    model = nn.Sequential(
        VariationalLayer(nn.Linear(4, 3), family="bernstein", support=(-0.3, 0.3), local_reparameterization=False),
        VariationalLayer(nn.Linear(3, 2), init_scale=0.2),  # local reparameterisation: draws per forward as before
    ).double()
    flow, local = model
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad(), draws_ahead(model, 5):
        assert flow._ahead == 5 and local._ahead == 0
        outputs = torch.stack([flow(x) for _ in range(5)])
    torch.manual_seed(1)
    chunks = [5] if per_call is None else [2, 2, 1]
    expected = []
    with torch.no_grad():
        for count in chunks:  # the weight's sample(count), then the bias's
            weights, biases = flow.weight.sample(count)[0], flow.bias.sample(count)[0]
            expected += [nn.functional.linear(x, w, b) for w, b in zip(weights, biases)]
    torch.testing.assert_close(outputs, torch.stack(expected), rtol=0, atol=0)
    assert flow._ahead == 0 and local._ahead == 0
    flow(x)  # after the block: one draw per forward, with its log-ratio for the KL
    assert torch.isfinite(flow.kl())
    with pytest.raises(ValueError, match="num_samples must be a positive int; got 0"), draws_ahead(model, 0):
        pass


def test_draws_ahead_with_log_ratios_gives_each_forward_its_draws_kl_estimate():
    torch.manual_seed(0)
    flow = VariationalLayer(
        nn.Linear(4, 3), family="bernstein", support=(-0.3, 0.3), prior_scale=0.5, local_reparameterization=False
    ).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    flow(x)
    before = flow.kl()
    torch.manual_seed(1)
    ratios = []
    with draws_ahead(flow, 3, log_ratios=True):
        for _ in range(3):
            flow(x)
            ratios.append(flow.kl())
    torch.manual_seed(1)
    (weights, log_q_weights), (biases, log_q_biases) = flow.weight.sample(3), flow.bias.sample(3)
    prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    for index, ratio in enumerate(ratios):
        expected = (log_q_weights[index].sum() - prior.log_prob(weights[index]).sum()
                    + log_q_biases[index].sum() - prior.log_prob(biases[index]).sum())
        torch.testing.assert_close(ratio, expected, rtol=1e-12, atol=0)
    with draws_ahead(flow, 2):  # without log_ratios the KL estimate is left as it was
        flow(x)
    torch.testing.assert_close(flow.kl(), ratios[-1], rtol=0, atol=0)
    assert not torch.equal(before, ratios[-1])


class StandardisedConv(nn.Conv2d):
    """A conv with a forward of its own (as timm's StdConv2d: weight standardisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding)


def shared_twice(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(layer, nn.Tanh(), layer)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: nn.Sequential(StandardisedConv(1, 2, 3)), r"1 layer .*: '0' \(StandardisedConv: its class has"),
        (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
         r"1 layer .*: '0' \(Conv2d: it pads with padding_mode='reflect'"),
        (lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)),
         r"1 layer .*: '0.self_attn.out_proj' .* nn.MultiheadAttention's output projection"),
        (lambda: shared_twice(nn.Linear(3, 3)),
         r"1 layer .*: '0' \(Linear: it is one module used at \['0', '2'\]"),
    ],
    ids=["own-forward", "reflect-padding", "attention-out-proj", "shared"],
)
def test_layers_a_plain_linear_map_would_change_are_refused_by_name(model, message):
    """Replacing them computed something else silently (a reflect-padded conv 1.25 off; StdConv2d 7.9 off), crashed
    in the attention, or untied a shared layer."""
    with pytest.raises(ValueError, match=message):
        to_variational(model(), "all")


def test_every_layer_that_cannot_be_replaced_is_named_at_once():
    """EfficientNet-Lite0's five Conv2dSame were refused one per attempt (five round trips), and the layers before
    the first were converted already; now all are named, grouped by reason, with the params that leaves them out."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), StandardisedConv(2, 2, 3),
                          nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), StandardisedConv(2, 2, 3))
    expected = ("params='all' selects 3 layers that VariationalLayer cannot replace: '1', '3' (StandardisedConv: its "
                "class has a forward of its own, which VariationalLayer would replace by a plain convolution); '2' "
                "(Conv2d: it pads with padding_mode='reflect', and VariationalLayer's convolution with zeros); leave "
                "them out of params, e.g. params=['all', '!1.*', '!2.*', '!3.*']")
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        to_variational(model, "all")
    assert not any(isinstance(layer, VariationalLayer) for layer in model), "nothing is converted on a refusal"
    assert to_variational(model, ["all", "!1.*", "!2.*", "!3.*"]) == ["0"]


def test_a_refusal_of_many_layers_names_the_first_eight():
    model = nn.Sequential(*(StandardisedConv(1, 1, 1) for _ in range(10)), nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match=r"^params='\*' selects 10 layers .*: '0', '1', '2', '3', '4', '5', '6', '7' "
                                         r"\(StandardisedConv: [^;]*\); and 2 more; leave them out of params, e\.g\. "
                                         r"params=\['\*', '!0\.\*', .*, '!7\.\*'\] plus a '!<layer>\.\*' for each "
                                         r"of the 2 more$"):
        to_variational(model, "*")


def test_a_selection_of_only_layers_that_cannot_be_replaced_suggests_no_empty_params():
    """Leaving every selected layer out selected nothing ("matched no parameter" at the next attempt)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), StandardisedConv(2, 2, 3))
    with pytest.raises(ValueError, match=r"^params=\['1\.\*'\] selects 1 layer .*; and none of its layers can be: "
                                         r"select others"):
        to_variational(model, ["1.*"])


@pytest.mark.parametrize("family", ["gaussian", "sparse_gaussian", "bernstein"])
def test_a_float64_template_is_the_centre_exactly(family):
    """Its weights became the means through float32 (1.3e-8 off for the Gaussians, 7.6e-8 for the flow)."""
    template = nn.Linear(3, 2).double()
    with torch.no_grad():
        template.weight.copy_(torch.tensor([[0.1, 1 / 3, 0.7 + 1e-9], [0.2, 0.3, 0.4]], dtype=torch.float64))
    layer = VariationalLayer(template, family=family, local_reparameterization=family != "bernstein")
    centre = layer._centre(layer.weight, template.weight.shape).detach()
    assert centre.dtype == torch.float64
    torch.testing.assert_close(centre, template.weight.detach(), rtol=0, atol=1e-15)
