"""IVON optimiser against closed forms, a dense conjugate posterior and the reference ``ivon-opt`` 0.1.3."""

from __future__ import annotations

import copy
import io
import math

import ivon
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_bayes.optim.ivon as ivon_module
from lightning_bayes.optim import IVON, hessian_update, posterior_draws


def quadratic_closure(optimizer: IVON, theta: nn.Parameter, curvature: torch.Tensor, centre: torch.Tensor):
    """Closure of ``1/2 sum a_i (theta_i - c_i)^2`` (summed over rows: independent copies of one problem)."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (curvature * (theta - centre).square()).sum()
        loss.backward()
        return loss

    return closure


def test_step_restores_the_mean_bitwise_when_the_closure_raises(single_thread) -> None:
    theta = nn.Parameter(torch.randn(5, 3))
    before = theta.detach().clone()
    optimizer = IVON([theta], 100.0, lr=0.1)

    def failing() -> torch.Tensor:
        assert not torch.equal(theta, before)  # the closure sees a sample
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        optimizer.step(failing)
    assert torch.equal(theta.detach(), before) and optimizer.steps == 0
    with pytest.raises(RuntimeError, match="boom"), optimizer.sampled_params():
        raise RuntimeError("boom")
    assert torch.equal(theta.detach(), before)


def test_training_draws_have_the_posterior_std(single_thread) -> None:
    """10^5 draws: the std estimate has relative standard error 1/sqrt(2 * 10^5) = 0.22%, so 1% is 4.5 errors."""
    theta = nn.Parameter(torch.full((10**5,), 0.5, dtype=torch.float64))
    optimizer = IVON([theta], 50.0, lr=0.1, hess_init=0.3, weight_decay=0.01, seed=3)
    offsets = []

    def closure() -> torch.Tensor:
        offsets.append(theta.detach() - 0.5)
        optimizer.zero_grad()
        return theta.sum()

    optimizer.step(closure)
    assert offsets[0].std().item() == pytest.approx(1 / math.sqrt(50.0 * (0.3 + 0.01)), rel=0.01)
    assert offsets[0].mean().abs().item() < 4 / math.sqrt(50.0 * 0.31 * 10**5)  # 4 standard errors


def test_prediction_draws_have_the_posterior_std_per_coordinate(single_thread) -> None:
    """Four blocks of 10^5 coordinates with their own h: each block's std within 1% (4.5 standard errors)."""
    theta = nn.Parameter(torch.zeros(4, 10**5, dtype=torch.float64))
    optimizer = IVON([theta], 20.0, lr=0.1, weight_decay=1e-3)
    hess = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
    optimizer.posterior_variances()  # creates the state
    optimizer.state[theta]["hess"].copy_(hess[:, None].expand(4, 10**5))
    with optimizer.sampled_params(torch.Generator().manual_seed(0)):
        draw = theta.detach().clone()
    assert torch.equal(theta.detach(), torch.zeros_like(theta))
    torch.testing.assert_close(draw.std(1), 1 / (20.0 * (hess + 1e-3)).sqrt(), rtol=0.01, atol=0)


def test_posterior_draws_are_fresh_draws_around_the_mean_and_restore_it(single_thread) -> None:
    """Each call of ``posterior_draws``' function is ``m + sigma * n`` with ``n`` one vector split over the
    parameters in order (equal to a draw by hand from the same generator state), never a step from the last draw;
    its stds are within 1% of sigma (4.5 standard errors at 10^5 draws) and the mean comes back bitwise, also when
    the body raises."""
    mean = [torch.full((2, 10**5), 1.5, dtype=torch.float64), torch.tensor([-2.0, 0.25], dtype=torch.float64)]
    params = [nn.Parameter(m.clone()) for m in mean]
    variances = [
        torch.tensor([[0.25], [4.0]], dtype=torch.float64).expand(2, 10**5), torch.tensor([0.01, 9.0], dtype=torch.float64)
    ]
    generator, by_hand = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    with pytest.raises(KeyError), posterior_draws(params, variances, generator) as draw:
        for _ in range(3):
            draw()
            n = torch.randn(2 * 10**5 + 2, generator=by_hand, dtype=torch.float64)
            expected = [mean[0] + variances[0].sqrt() * n[:-2].view(2, -1), mean[1] + variances[1].sqrt() * n[-2:]]
            for p, e in zip(params, expected):
                torch.testing.assert_close(p.detach(), e, rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(params[0].detach().std(1), torch.tensor([0.5, 2.0]).double(), rtol=0.01, atol=0)
        raise KeyError("the body fails")
    assert all(torch.equal(p.detach(), m) for p, m in zip(params, mean))


def test_price_estimate_is_unbiased_for_the_diagonal_hessian(single_thread, monkeypatch) -> None:
    """On 1/2 sum_i a_i (theta_i - c_i)^2, E[h_hat] = lambda (h + delta) a_i E[eps_i^2] = a_i. 10^4 independent
    copies of the problem (rows, beta2 = 1 so sigma stays fixed) give 10^4 draws of h_hat in one step, the same
    distribution as 10^4 steps; the mean is within 3 standard errors (estimated from the draws) of a_i."""
    estimates = []

    def recording(hess, estimate, beta2, weight_decay):
        estimates.append(estimate.clone())
        return hessian_update(hess, estimate, beta2, weight_decay)

    monkeypatch.setattr(ivon_module, "hessian_update", recording)
    curvature = torch.tensor([0.2, 1.0, 7.0], dtype=torch.float64)
    centre = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    theta = nn.Parameter(torch.zeros(10**4, 3, dtype=torch.float64))
    optimizer = IVON([theta], 30.0, lr=0.1, beta2=1.0, hess_init=2.0, seed=1)
    optimizer.step(quadratic_closure(optimizer, theta, curvature, centre))
    (estimate,) = estimates
    error = estimate.std(0) / math.sqrt(estimate.shape[0])
    assert ((estimate.mean(0) - curvature).abs() < 3 * error).all(), (estimate.mean(0), curvature, error)
    torch.testing.assert_close(optimizer.state[theta]["hess"], torch.full_like(theta, 2.0), rtol=0, atol=0)


@pytest.mark.parametrize("beta2", [0.0, 0.9, 0.99999])
@pytest.mark.parametrize("hess", [1e-6, 1.0, 1e3])
@pytest.mark.parametrize("decay", [0.0, 1e-4])
def test_hessian_update_stays_positive_for_any_estimate(beta2: float, hess: float, decay: float) -> None:
    """With u = h + delta, v = h_hat + delta, b = 1 - beta2 the update is the sum of squares
    h' + delta = ((u - b (u - v) / 2)^2 + (b (u - v) / 2)^2) / u > 0, also for h_hat = -10^6."""
    h, estimate = torch.tensor(hess, dtype=torch.float64), torch.tensor(-1e6, dtype=torch.float64)
    updated = hessian_update(h, estimate, beta2, decay)
    u, v, b = h + decay, estimate + decay, 1.0 - beta2
    torch.testing.assert_close(updated + decay, ((u - b * (u - v) / 2) ** 2 + (b * (u - v) / 2) ** 2) / u,
                               rtol=1e-12, atol=0)
    assert updated + decay > 0
    assert hessian_update(h.float(), estimate.float(), beta2, decay) + decay > 0


def test_first_step_is_sgd_with_weight_decay(single_thread) -> None:
    """beta2 = 1 keeps h = h_0, the debiased momentum of a constant gradient is that gradient, and rescale_lr turns
    lr (h_0 + delta) / (h_0 + delta) into lr: one step equals SGD(lr, weight_decay=delta) up to float64 round-off."""
    start = torch.randn(4, 3, dtype=torch.float64)
    slope = torch.randn(4, 3, dtype=torch.float64)
    theta, reference = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    optimizer = IVON([theta], 10.0, lr=0.3, hess_init=0.7, beta2=1.0, weight_decay=0.05, mc_samples=2)
    sgd = torch.optim.SGD([reference], lr=0.3, weight_decay=0.05)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (slope * theta).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    reference.grad = slope.clone()
    sgd.step()
    torch.testing.assert_close(theta.detach(), reference.detach(), rtol=1e-12, atol=1e-14)


def test_clip_radius_bounds_each_coordinate_of_the_step(single_thread) -> None:
    theta = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    optimizer = IVON([theta], 10.0, lr=0.5, hess_init=1.0, weight_decay=0.0, clip_radius=1e-3, beta2=1.0)
    slope = torch.tensor([-100.0, -1e-6, 0.0, 1e-6, 1.0, 100.0], dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (slope * theta).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    expected = -0.5 * (slope / 1.0).clamp(-1e-3, 1e-3)  # debiased momentum = slope, h = 1, lr' = lr (1 + 0)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-12, atol=0)


def test_gradsq_uses_ess_times_the_squared_gradient(single_thread) -> None:
    theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = IVON([theta], 40.0, lr=0.1, hess_init=0.5, weight_decay=1e-2, beta2=0.3, hess_approx="gradsq")
    slope = torch.tensor([0.1, -2.0, 3.0], dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (slope * theta).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    h0 = torch.full_like(slope, 0.5)
    expected = 0.3 * h0 + 0.7 * 40.0 * slope**2 + 0.5 * 0.7**2 * (h0 - 40.0 * slope**2) ** 2 / (h0 + 1e-2)
    torch.testing.assert_close(optimizer.state[theta]["hess"], expected, rtol=1e-12, atol=0)


def test_conjugate_linear_regression_reaches_the_mean_field_optimum(single_thread) -> None:
    """Loss: mean of 1/2 (y - x theta)^2 over N = 50 points, lambda = N, delta = alpha / N (prior N(0, I / alpha)).
    The fixed point is m = A^{-1} X^T y and sigma^2 = 1 / diag(A), A = X^T X + alpha I: the exact posterior mean
    and the mean-field optimum. 64 independent chains (rows) stand in for a long time average; 5000 steps are 5
    time constants 1 / (1 - beta2) of h. Both within 5% (the (h - h_hat)^2 term biases h up by about
    (1 - beta2) Var(h_hat) / (2 h), 2% here)."""
    generator = torch.Generator().manual_seed(0)
    n, alpha = 50, 1.0
    mixing = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 2.0]], dtype=torch.float64)
    x = torch.randn(n, 3, dtype=torch.float64, generator=generator) @ mixing
    noise = torch.randn(n, dtype=torch.float64, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + noise
    precision = x.T @ x + alpha * torch.eye(3, dtype=torch.float64)
    theta = nn.Parameter(torch.zeros(64, 3, dtype=torch.float64))
    optimizer = IVON([theta], float(n), lr=0.02, weight_decay=alpha / n, beta2=0.999, seed=0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (0.5 * (y[:, None] - x @ theta.T).square().mean(0)).sum()
        loss.backward()
        return loss

    for _ in range(5000):
        optimizer.step(closure)
    torch.testing.assert_close(theta.detach().mean(0), torch.linalg.solve(precision, x.T @ y), rtol=0.05, atol=0)
    variance = optimizer.posterior_variances()[theta].mean(0)
    torch.testing.assert_close(variance, 1 / precision.diagonal(), rtol=0.05, atol=0)


class NoiseStream:
    """Stands in for ``torch.randn``: hands out consecutive pieces of one fixed stream of standard normals, so two
    optimisers that draw the same number of values in the same order see the same noise."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.values, self.position = torch.randn(10**5, dtype=dtype, generator=torch.Generator().manual_seed(7)), 0

    def __call__(self, *size, generator=None, device=None, dtype=None, **kwargs) -> torch.Tensor:
        shape = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
        piece = self.values[self.position: self.position + shape.numel()]
        self.position += shape.numel()
        return piece.reshape(shape).to(dtype or self.values.dtype)


@pytest.mark.parametrize(
    ("samples", "dtype", "rtol", "atol"),
    [
        # S = 1 performs the reference's arithmetic in the same order: identical
        (1, torch.float32, 0.0, 0.0),
        (1, torch.float64, 0.0, 0.0),
        # S > 1: a sum divided by S here, a running (Welford) mean there: last-bit differences, 50 steps
        (3, torch.float32, 1e-5, 1e-6),
        (3, torch.float64, 1e-12, 1e-14),
    ],
)
@pytest.mark.parametrize("debias", [True, False])
def test_matches_ivon_opt_reference(samples: int, dtype: torch.dtype, rtol: float, atol: float, debias: bool,
                                    monkeypatch, single_thread) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    reference_net = copy.deepcopy(net)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randint(0, 3, (16,))
    settings = {"lr": 0.1, "hess_init": 0.5, "beta2": 0.99, "weight_decay": 1e-3, "mc_samples": samples,
                "debias": debias}
    ours = IVON(net.parameters(), 100.0, **settings)
    reference = ivon.IVON(reference_net.parameters(), ess=100.0, **settings)

    def closure() -> torch.Tensor:
        ours.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    ours_noise, reference_noise = NoiseStream(dtype), NoiseStream(dtype)
    monkeypatch.setattr(torch, "randn", ours_noise)
    for _ in range(50):
        ours.step(closure)
    monkeypatch.setattr(torch, "randn", reference_noise)
    for _ in range(50):  # the reference's documented manual loop
        for _ in range(samples):
            with reference.sampled_params(train=True):
                reference.zero_grad()
                F.cross_entropy(reference_net(x), y).backward()
        reference.step()
    monkeypatch.undo()
    flat = lambda tensors: torch.cat([t.detach().reshape(-1) for t in tensors])
    params = list(net.parameters())
    torch.testing.assert_close(flat(params), flat(reference_net.parameters()), rtol=rtol, atol=atol)
    group = reference.param_groups[0]
    torch.testing.assert_close(flat(ours.state[p]["hess"] for p in params), group["hess"], rtol=rtol, atol=atol)
    torch.testing.assert_close(flat(ours.state[p]["momentum"] for p in params), group["momentum"], rtol=rtol,
                               atol=atol)


def _regression_closure(optimizer: IVON, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.mse_loss(net(x).float(), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resumes_bitwise(dtype: torch.dtype, single_thread) -> None:
    """Three steps, save, three more, against a fresh optimiser loaded from the saved bytes: the same parameters
    and state (the noise of step t depends on (seed, t)); a bf16 parameter keeps its fp32 master copy."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2).to(dtype)
    x, y = torch.randn(8, 3).to(dtype), torch.randn(8, 2)
    optimizer = IVON(net.parameters(), 8.0, lr=0.05, mc_samples=2, beta2=0.9)
    for _ in range(3):
        optimizer.step(_regression_closure(optimizer, net, x, y))
    saved, net_saved = io.BytesIO(), copy.deepcopy(net)
    torch.save(optimizer.state_dict(), saved)
    for _ in range(3):
        optimizer.step(_regression_closure(optimizer, net, x, y))
    resumed = IVON(net_saved.parameters(), 8.0, lr=0.05, mc_samples=2, beta2=0.9)
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
    for _ in range(3):
        resumed.step(_regression_closure(resumed, net_saved, x, y))
    for p, q in zip(net.parameters(), net_saved.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert resumed.state[q][key].dtype == value.dtype == torch.float32
            assert torch.equal(resumed.state[q][key], value)
    assert ("mean" in optimizer.state[net.weight]) == (dtype == torch.bfloat16)


@pytest.mark.parametrize(("saved", "loaded"), [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                               (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_a_state_loaded_at_another_precision_is_held_as_a_fresh_run_would(saved, loaded, single_thread) -> None:
    """h, g_bar and a master m follow the parameter (float32 or wider): a float32 run resumed in float64 kept float32
    state and, through a float32 master, float32-exact weights; a bf16 run resumed in float32 takes the master's value
    as the weight."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2).to(saved)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    optimizer = IVON(net.parameters(), 8.0, lr=0.05, mc_samples=2, beta2=0.9)
    for _ in range(3):
        optimizer.step(_regression_closure(optimizer, net, x.to(saved), y))
    masters = {name: optimizer.state[p].get("mean") for name, p in net.named_parameters()}
    state = torch.load(io.BytesIO(_saved_bytes(optimizer.state_dict())))
    resumed_net = copy.deepcopy(net).to(loaded)
    resumed = IVON(resumed_net.parameters(), 8.0, lr=0.05, mc_samples=2, beta2=0.9)
    resumed.load_state_dict(state)
    wide = torch.promote_types(loaded, torch.float32)
    for name, p in resumed_net.named_parameters():
        held = resumed.state[p]
        assert {value.dtype for value in held.values()} == {wide}
        assert ("mean" in held) == (loaded == saved == torch.bfloat16)  # else made at first use, as in a fresh run
        if masters[name] is not None and loaded == torch.float32:
            assert torch.equal(p, masters[name])
    for _ in range(3):
        resumed.step(_regression_closure(resumed, resumed_net, x.to(loaded), y))
    assert all(("mean" in resumed.state[p]) == (loaded == torch.bfloat16) for p in resumed_net.parameters())
    if loaded == torch.float64:  # the updates ran in float64, not through a float32 master
        assert any((p.float().double() != p).any() for p in resumed_net.parameters())


def _saved_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_noise_seed_and_step_travel_in_the_parameter_groups_and_the_earlier_layout_loads(single_thread) -> None:
    """Sharded checkpointing keeps only ``state`` and ``param_groups``: the noise's seed and step live in the groups
    (and leave them again on load); a state dict of the earlier layout (a top-level ``noise``) still loads."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    optimizer = IVON(net.parameters(), 8.0, lr=0.05, seed=11)
    for _ in range(2):
        optimizer.step(_regression_closure(optimizer, net, x, y))
    saved = optimizer.state_dict()
    assert set(saved) == {"state", "param_groups"} and saved["param_groups"][0]["noise_seed"] == 11
    assert saved["param_groups"][0]["noise_steps"] == 2 and "noise_seed" not in optimizer.param_groups[0]
    groups = [{k: v for k, v in g.items() if not k.startswith("noise_")} for g in saved["param_groups"]]
    earlier = {"state": saved["state"], "param_groups": groups, "noise": {"seed": 11, "steps": 2}}
    for state_dict in (saved, earlier):
        resumed = IVON(copy.deepcopy(net).parameters(), 8.0, lr=0.05, seed=0)
        resumed.load_state_dict(copy.deepcopy(state_dict))
        assert (resumed.seed, resumed.steps) == (11, 2) and "noise_steps" not in resumed.param_groups[0]


def test_bf16_master_copy_keeps_updates_below_bf16_resolution(single_thread) -> None:
    """Steps of 1e-4 at 1.0 are below bf16's spacing 2^-7 there; the fp32 mean accumulates them."""
    theta = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = IVON([theta], 1e12, lr=1e-4, weight_decay=0.0, beta1=0.0, beta2=1.0)  # sigma ~ 1e-6: no visible noise

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -theta.float().sum()
        loss.backward()
        return loss

    for _ in range(100):
        optimizer.step(closure)
    mean = optimizer.state[theta]["mean"]
    torch.testing.assert_close(mean, torch.full((4,), 1.01), rtol=0, atol=1e-5)
    assert torch.equal(theta.detach(), mean.to(torch.bfloat16)) and theta[0].item() > 1.0


def test_below_resolution_is_the_share_below_half_the_bf16_spacing() -> None:
    """At m = 1 bf16's spacing is eps = 2^-7, half of it 0.0039: sigma = 0.005 (h = 1 / 0.005^2, ess 1, no decay)
    is above it, sigma = 0.003 below, so the share is exactly 1/2; float32 parameters are not counted."""
    above, below = (nn.Parameter(torch.ones(3, dtype=torch.bfloat16)) for _ in range(2))
    wide = nn.Parameter(torch.ones(5))
    optimizer = IVON(
        [{"params": [above], "hess_init": 0.005**-2}, {"params": [below], "hess_init": 0.003**-2},
         {"params": [wide], "hess_init": 1e12}],
        1.0, lr=0.1, weight_decay=0.0,
    )
    assert optimizer.below_resolution() == 0.5
    assert IVON([wide], 1.0, lr=0.1, hess_init=1e12).below_resolution() == 0.0


def test_closure_returning_none_leaves_the_posterior_unchanged(single_thread) -> None:
    theta = nn.Parameter(torch.randn(3))
    before = theta.detach().clone()
    optimizer = IVON([theta], 10.0, lr=0.1)
    assert optimizer.step(lambda: None) is None
    assert torch.equal(theta.detach(), before) and optimizer.steps == 0
    assert torch.equal(optimizer.state[theta]["hess"], torch.ones(3))


def test_step_returns_the_mean_loss_of_its_samples(single_thread) -> None:
    theta = nn.Parameter(torch.zeros(2))
    optimizer = IVON([theta], 10.0, lr=0.1, mc_samples=3)
    losses = iter([1.0, 2.0, 6.0])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.0 * theta.sum() + next(losses)  # the sampled parameters do not move the value
        loss.backward()
        return loss.detach()

    assert float(optimizer.step(closure)) == pytest.approx(3.0, abs=1e-6)


def test_parameter_without_gradient_has_zero_gradient(single_thread) -> None:
    used, unused = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = IVON([used, unused], 10.0, lr=0.1, weight_decay=0.0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = used.sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.requires_grad is False
    assert torch.equal(unused.detach(), torch.ones(2))
    assert torch.equal(optimizer.state[unused]["momentum"], torch.zeros(2))
    assert not torch.equal(used.detach(), torch.ones(2))


def test_errors() -> None:
    theta = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="IVON.step needs a closure"):
        IVON([theta], 10.0, lr=0.1).step()
    for name, value in [("lr", -1.0), ("ess", 0.0), ("hess_init", 0.0), ("beta1", 1.0), ("beta2", 1.5),
                        ("weight_decay", -1e-4), ("clip_radius", 0.0), ("ess", float("nan"))]:
        settings = {"ess": 10.0, "lr": 0.1, name: value}
        with pytest.raises(ValueError, match=rf"IVON: {name} must be .*; got {value!r}"):
            IVON([theta], **settings)
    with pytest.raises(ValueError, match=r"IVON: lr must be .*; got -2"):
        IVON([{"params": [theta], "lr": -2}], 10.0, lr=0.1)
    with pytest.raises(ValueError, match=r"mc_samples must be an int >= 1; got 0"):
        IVON([theta], 10.0, lr=0.1, mc_samples=0)
    with pytest.raises(ValueError, match=r"hess_approx must be one of \('price', 'gradsq'\); got 'exact'"):
        IVON([theta], 10.0, lr=0.1, hess_approx="exact")
    with pytest.raises(ValueError, match=r"seed must be None or an int"):
        IVON([theta], 10.0, lr=0.1, seed=-1)
    with pytest.raises(TypeError):  # ivon-opt's positional (params, lr, ess) must not silently swap the two
        IVON([theta], 0.1, 1000.0)
    with pytest.raises(ValueError, match="expected a state dict saved by IVON"):
        IVON([theta], 10.0, lr=0.1).load_state_dict(torch.optim.SGD([theta], lr=0.1).state_dict())


def test_each_samples_gradient_is_its_own_when_the_closure_does_not_zero_them(single_thread) -> None:
    """A closure without zero_grad summed the samples' gradients (the second sample's was 2 slope): one step must
    still be the SGD step of ``test_first_step_is_sgd_with_weight_decay``."""
    start, slope = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    theta, reference = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    optimizer = IVON([theta], 10.0, lr=0.3, hess_init=0.7, beta2=1.0, weight_decay=0.05, mc_samples=3)

    def closure() -> torch.Tensor:
        loss = (slope * theta).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    optimizer.step(closure)  # the gradient step left is not "from outside"
    sgd = torch.optim.SGD([reference], lr=0.3, weight_decay=0.05)
    for _ in range(2):
        reference.grad = slope.clone()
        sgd.step()
    torch.testing.assert_close(theta.detach(), reference.detach(), rtol=1e-12, atol=1e-14)


def test_gradients_accumulated_outside_the_closure_are_refused(single_thread) -> None:
    """Lightning's gradient accumulation runs the first micro-batches' backward at the mean, outside step: IVON's
    update would mix them into its sampled gradients (a constant gradient 1 became 1.25)."""
    import lightning

    class Plain(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Parameter(torch.zeros(3))

        def training_step(self, batch, batch_idx):
            return self.theta.sum() * batch[0].sum()

        def configure_optimizers(self):
            return IVON(self.parameters(), 10.0, lr=0.1, mc_samples=2)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 1)), batch_size=2)
    trainer = lightning.Trainer(
        max_epochs=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(RuntimeError, match="IVON.step found gradients computed outside its closure on 1 parameters"):
        trainer.fit(Plain(), data)
    lightning.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False).fit(Plain(), data)  # without accumulation it trains


def test_a_backward_outside_the_closure_is_refused_after_the_first_step_too():
    """``zero_grad(set_to_none=True)`` then a backward outside the closure (Lightning's accumulation from the second
    optimiser step on) is refused at every step, not only the first."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    optimizer = IVON(model.parameters(), lr=0.1, ess=100)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    optimizer.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="outside its closure"):
        optimizer.step(closure)
