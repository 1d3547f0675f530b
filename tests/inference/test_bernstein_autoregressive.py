"""The autoregressive (multivariate) Bernstein flow against dense autograd, quadrature and a known posterior
(float64)."""

import math
from itertools import pairwise

import pytest
import torch
from torch import Tensor
from torch.func import jacrev, vmap

from lightning_bayes.inference.bernstein import BernsteinFlow
from lightning_bayes.inference.bernstein_autoregressive import AutoregressiveBernsteinFlow, made
from lightning_bayes.inference.mean_field_gaussian import MeanFieldGaussian
from lightning_bayes.inference.reparameterised_vi import fit_reparameterised, kl_to_posterior

pytestmark = pytest.mark.usefixtures("single_thread")


def trained_looking_flow(shape: tuple[int, ...], degree: int = 8, final_affine: bool = True, seed: int = 0):
    """A flow whose every parameter (MADE weights included, so coefficients depend on z) is moved off its init."""
    torch.manual_seed(seed)
    flow = AutoregressiveBernsteinFlow(shape, degree=degree, support=(-2.0, 3.0), final_affine=final_affine).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def standard_normal_log_density(z: Tensor, event_ndim: int) -> Tensor:
    return (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).flatten(-event_ndim).sum(-1)


@pytest.mark.parametrize("final_affine", [True, False])
@pytest.mark.parametrize("shape", [(4,), (2, 2)])
def test_jacobian_is_lower_triangular_and_its_log_determinant_is_analytic(shape: tuple[int, ...], final_affine: bool):
    flow = trained_looking_flow(shape, final_affine=final_affine)
    z = torch.randn(6, *shape, dtype=torch.float64)
    jacobian = vmap(jacrev(lambda x: flow(x)[0]))(z).reshape(6, 4, 4)  # [draw, w_d, z_j], flattened order
    upper = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert torch.equal(jacobian[:, upper], torch.zeros_like(jacobian[:, upper]))  # exactly: masked weights
    assert (jacobian[:, upper.T] != 0).all()  # the coefficients do depend on earlier draws
    sign, log_det = torch.linalg.slogdet(jacobian)
    _, log_q = flow(z)
    assert (sign == 1).all()
    analytic_log_det = standard_normal_log_density(z, len(shape)) - log_q
    assert torch.allclose(log_det, analytic_log_det, rtol=0, atol=1e-10)


def test_made_connects_every_earlier_input_and_wastes_no_hidden_unit():
    # MADE (Germain et al. 2015, section 4): block d reaches exactly the inputs < d, and with hidden degrees in
    # 1..D-1 every hidden unit lies on some input-to-output path (a unit of degree D would feed no block)
    num_inputs, block_size = 4, 2
    network = made(num_inputs, hidden=(7, 7), block_size=block_size)
    masks = [layer.parametrizations.weight[0].mask for layer in network if isinstance(layer, torch.nn.Linear)]
    reach = masks[0]
    for mask in masks[1:]:
        reach = ((mask @ reach) > 0).float()
    expected = torch.ones(num_inputs, num_inputs).tril(-1).repeat_interleave(block_size, dim=0)
    assert torch.equal(reach, expected)
    for feeding, fed in pairwise(masks):
        assert (feeding.sum(1) > 0).all() and (fed.sum(0) > 0).all()


def test_a_made_narrower_than_its_inputs_spreads_its_hidden_degrees():
    """26 inputs (the spec's Diamonds posterior) through layers of 10 units: the degrees spread over 1..25, so the
    last block reaches inputs 1..23; each block a prefix of the inputs before
    it (as in tfp's AutoregressiveNetwork). Degrees cycling through 1..10 left inputs 11..25 conditioning nothing."""
    num_inputs = 26
    network = made(num_inputs, hidden=(10, 10), block_size=1)
    masks = [layer.parametrizations.weight[0].mask for layer in network if isinstance(layer, torch.nn.Linear)]
    reach = masks[0]
    for mask in masks[1:]:
        reach = ((mask @ reach) > 0).float()
    reached = reach.sum(1).long()
    assert torch.equal(reach, (torch.arange(num_inputs)[None, :] < reached[:, None]).float())  # prefixes
    # hidden degrees ceil(k * 25 / 11) = 3, 5, 7, 10, 12, 14, 16, 19, 21, 23: block d reaches the largest below d
    assert reached.tolist() == [0] * 3 + [3] * 2 + [5] * 2 + [7] * 3 + [10] * 2 + [12] * 2 + [14] * 2 + [16] * 3 + [
        19
    ] * 2 + [21] * 2 + [23] * 3


def test_each_entry_is_increasing_in_its_own_base_draw():
    flow = trained_looking_flow((3,), degree=10, seed=1)
    grid = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    for d in range(3):
        z = torch.randn(3, dtype=torch.float64).repeat(len(grid), 1)
        z[:, d] = grid
        with torch.no_grad():
            w, _ = flow(z)
        assert (w[:, d].diff() > 0).all()


def test_two_dimensional_density_integrates_to_one_over_w():
    # Iterated quadrature in w-space with the analytic density: for each z1 on a grid (fixing w1), trapezoid over
    # w2 along the monotone image w2(z1, z2-grid), then trapezoid over w1(z1-grid); both grids span z in [-9, 9]
    # (mass outside ~1e-18). The trapezoid error is O(h^2), so Richardson's extrapolation from 201 and 401 points
    # per axis, (4 I_401 - I_201) / 3, cancels it: the residual O(h^4) was measured at 4e-8 (1e-4 without it).
    flow = trained_looking_flow((2,), degree=8)

    def integral(points: int) -> float:
        grid = torch.linspace(-9, 9, points, dtype=torch.float64)
        z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1)  # [z1, z2, 2]
        with torch.no_grad():
            w, log_q = flow(z)
        inner = torch.trapezoid(log_q.exp(), w[..., 1], dim=1)
        return float(torch.trapezoid(inner, w[:, 0, 0]))

    assert abs((4 * integral(401) - integral(201)) / 3 - 1) < 1e-6


def test_one_dimension_is_the_mean_field_chain():
    torch.manual_seed(3)
    chain = BernsteinFlow((1,), degree=7, support=(-2.0, 3.0)).double()
    with torch.no_grad():
        for p in chain.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow = trained_looking_flow((1,), degree=7, seed=4)  # hidden MADE weights random: they must not matter
    with torch.no_grad():
        for name in ("a", "b", "alpha", "beta"):
            getattr(flow, name).copy_(getattr(chain, name))
        flow.conditioner[-1].bias.copy_(chain.raw_coefficients[0])
    z = torch.randn(50, 1, dtype=torch.float64)
    with torch.no_grad():
        w, log_q = flow(z)
        w_chain, log_q_chain = chain(z)
    assert torch.allclose(w, w_chain, rtol=0, atol=1e-12)
    assert torch.allclose(log_q, log_q_chain[:, 0], rtol=0, atol=1e-12)


def test_initial_coefficients_span_the_support_whatever_z():
    flow = AutoregressiveBernsteinFlow((2, 3), degree=4, support=(-5.0, 5.0)).double()
    theta = flow.coefficients(torch.randn(7, 2, 3, dtype=torch.float64))
    expected = torch.linspace(-5, 5, 5, dtype=torch.float64).expand(7, 6, 5)
    assert torch.allclose(theta, expected, rtol=0, atol=1e-6)  # built in the default float32, then cast


def test_sample_shapes_and_joint_log_density():
    flow = trained_looking_flow((2, 2))
    w, log_q = flow.sample(5, torch.Generator().manual_seed(0))
    assert w.shape == (5, 2, 2) and log_q.shape == (5,)


def test_freeze_affine_keeps_a_and_b():
    flow = AutoregressiveBernsteinFlow((3,), degree=5, freeze_affine=True).double()
    names = {name for name, _ in flow.named_parameters()}
    assert "a" not in names and "b" not in names
    w, log_q = flow.sample(8)
    (w.sum() + log_q.sum()).backward()
    zeros = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(flow.a, zeros) and torch.equal(flow.b, zeros)
    assert flow.a.grad is None and flow.b.grad is None
    assert flow.conditioner[-1].bias.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"degree": 0}, "degree"),
        ({"support": (1.0, 1.0)}, "support"),
        ({"hidden": (10, 0)}, "hidden"),
        ({"shape": (2, 0)}, "shape"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, name: str):
    with pytest.raises(ValueError, match=name):
        AutoregressiveBernsteinFlow(**{"shape": (2,), **kwargs})


def test_base_draws_of_the_wrong_shape_are_named():
    with pytest.raises(ValueError, match=r"z must have shape \[\.\.\., 2, 3\]"):
        AutoregressiveBernsteinFlow((2, 3))(torch.randn(4, 3, 2))


# Bayesian linear regression y = X w + eps, eps ~ N(0, 1), prior w ~ N(0, I), two strongly correlated columns:
# the posterior is N(mu, Lambda^-1), Lambda = X^T X + I, with correlation -0.94.
DESIGN = torch.tensor([[1.0, 1.2], [2.0, 1.8], [-1.0, -1.1], [0.5, 0.7], [-1.5, -1.4], [3.0, 3.1]], dtype=torch.float64)
TARGETS = torch.tensor([1.1, 2.3, -0.4, 0.9, -1.8, 2.9], dtype=torch.float64)
PRECISION = DESIGN.T @ DESIGN + torch.eye(2, dtype=torch.float64)
POSTERIOR_MEAN = torch.linalg.solve(PRECISION, DESIGN.T @ TARGETS)
POSTERIOR = torch.distributions.MultivariateNormal(POSTERIOR_MEAN, precision_matrix=PRECISION)


def regression_log_joint(w: Tensor) -> Tensor:
    """``log N(w; 0, I) + sum_i log N(y_i; x_i . w, 1)`` for ``w`` ``[S, 2]``: ``[S]``."""
    residual = TARGETS - w @ DESIGN.T
    return -0.5 * (w.square().sum(-1) + residual.square().sum(-1)) - 0.5 * (2 + len(TARGETS)) * math.log(2 * math.pi)


def test_recovers_a_correlated_gaussian_posterior_that_mean_field_cannot():
    # The best factorised q of a Gaussian target is the Gaussian with precisions diag(Lambda) (Bishop 2006,
    # section 10.1.2), so every mean-field family has KL >= 0.5 (sum_i log Lambda_ii - log det Lambda) = 1.097.
    # Tolerances: the 10,000-draw KL estimate has a standard error of 0.0095 for the mean-field families, so
    # +-0.04 is 4 standard errors; the autoregressive flow measured 0.007-0.042 over five seeds (M = 6, RMSprop
    # lr 3e-3, 1,500 steps of 200 draws), so < 0.1 is a tenth of the mean-field floor with margin.
    best_mean_field = float(0.5 * (PRECISION.diagonal().log().sum() - torch.logdet(PRECISION)))
    torch.manual_seed(0)
    families = {
        "gauss": MeanFieldGaussian((2,)).double(),
        "mean_field_bernstein": BernsteinFlow((2,), degree=6, support=(-4.0, 4.0)).double(),
        "autoregressive": AutoregressiveBernsteinFlow((2,), degree=6, support=(-4.0, 4.0)).double(),
    }
    kl = {}
    for name, family in families.items():
        generator = torch.Generator().manual_seed(0)
        fit_reparameterised(family, regression_log_joint, steps=1500, num_samples=200, lr=3e-3, generator=generator)
        kl[name] = kl_to_posterior(family, POSTERIOR.log_prob, generator=generator)
    assert abs(kl["gauss"] - best_mean_field) < 0.04
    assert kl["mean_field_bernstein"] > best_mean_field - 0.04
    assert kl["autoregressive"] < 0.1


def test_autocast_leaves_the_flow_in_its_parameters_precision():
    """bf16-mixed autocasts the conditioner's linear layers: its coefficients, draws and log-densities must not move."""
    flow = AutoregressiveBernsteinFlow((3, 4), hidden=(16, 16))
    with torch.no_grad():  # a trained-looking conditioner: the bias alone would round too
        for parameter in flow.conditioner.parameters():
            parameter.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(parameter.numel()))
    z = torch.randn(50, 3, 4, generator=torch.Generator().manual_seed(0))
    w, log_q = flow(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coefficients = flow.coefficients(z)
        w_autocast, log_q_autocast = flow(z)
    assert coefficients.dtype == torch.float32
    assert torch.equal(w_autocast, w) and torch.equal(log_q_autocast, log_q)
