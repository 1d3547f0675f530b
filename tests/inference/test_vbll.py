"""VBLL heads against closed forms, dense float64 computations and the reference package ``vbll==0.4.9``."""

import math

import pytest
import torch
import vbll
from torch import nn
from torch.func import functional_call
from vbll.utils.distributions import DenseNormal, LowRankNormal, Normal

from lightning_bayes.inference.vbll import (
    PARAMETERIZATIONS,
    DiscriminativeVBLL,
    GaussianRows,
    GenerativeVBLL,
    VBLLRegression,
    wishart_log_prior,
)
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def _randomise(head: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter of ``head`` a generic (non-initial) value, so no term is trivially zero."""
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn_like(p))
    return head


def _unpack(lower: torch.Tensor, dim: int) -> torch.Tensor:
    """Packed strict lower triangles ``[D(D-1)/2, K]`` as ``[K, D, D]`` matrices."""
    rows, cols = torch.tril_indices(dim, dim, -1)
    square = lower.new_zeros(lower.shape[1], dim, dim)
    square[:, rows, cols] = lower.T
    return square


def _explicit_cholesky(rows: GaussianRows) -> torch.Tensor:
    """``L_k`` (dense) written out from the parameters, ``[K, D, D]``."""
    return _unpack(rows.lower, rows.dim) + torch.diag_embed(rows.log_scale.exp())


def _explicit_covariance(rows: GaussianRows) -> torch.Tensor:
    """``S_k`` written out from the parameters, ``[K, D, D]``."""
    variance = rows.log_scale.exp().square()
    if rows.parameterization == "diagonal":
        return torch.diag_embed(variance)
    if rows.parameterization == "dense":
        cholesky = _explicit_cholesky(rows)
        return cholesky @ cholesky.mT
    factor = rows.factor.mT  # U_k, [K, D, r]
    return factor @ factor.mT + torch.diag_embed(variance)


def _package_distribution(rows: GaussianRows):
    """The same Gaussians as ``vbll``'s distribution objects (its low rank diagonal is a variance)."""
    scale = rows.log_scale.exp()
    if rows.parameterization == "diagonal":
        return Normal(rows.mean, scale)
    if rows.parameterization == "dense":
        return DenseNormal(rows.mean, _explicit_cholesky(rows))
    return LowRankNormal(rows.mean, rows.factor.mT, scale.square())


def _rows(parameterization: str, num_rows: int = 4, dim: int = 6, rank: int = 2) -> GaussianRows:
    off = {
        "diagonal": None,
        "dense": torch.randn(dim * (dim - 1) // 2, num_rows, dtype=F64),
        "lowrank": torch.randn(num_rows, rank, dim, dtype=F64),
    }
    return GaussianRows(
        torch.randn(num_rows, dim, dtype=F64),
        0.5 * torch.randn(num_rows, dim, dtype=F64),
        parameterization,
        off[parameterization],
    )


def _copy_to_package(ours: torch.nn.Module, package: torch.nn.Module) -> None:
    """Copy parameters by name into a ``vbll`` layer (it stores square triangles ``[K, D, D]`` and
    low-rank factors ``[K, D, r]``; its low rank ``W_logdiag`` is a log variance)."""
    rows = ours.means if isinstance(ours, GenerativeVBLL) else ours.weight
    prefix = "mu" if isinstance(ours, GenerativeVBLL) else "W"
    values = {f"{prefix}_mean": rows.mean, f"{prefix}_logdiag": rows.log_scale, "noise_logdiag": ours.noise_log_scale}
    if rows.parameterization == "lowrank":
        values["W_logdiag"] = 2 * rows.log_scale
        values["W_offdiag"] = rows.factor.mT
    if rows.parameterization == "dense":
        values["W_offdiag"] = _unpack(rows.lower, rows.dim)
    params = dict(package.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            assert params[name].shape == value.shape, name
            params[name].copy_(value)


class _ScaledObjective(nn.Module):
    """``N * loss`` of a head on fixed data, as a module so that ``torch.func`` can differentiate it twice."""

    def __init__(self, head: nn.Module, phi: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.head, self.phi, self.y = head, phi, y

    def forward(self) -> torch.Tensor:
        return len(self.phi) * self.head.loss(self.phi, self.y).total


def _minimise(head: nn.Module, phi: torch.Tensor, y: torch.Tensor, newton_steps: int = 4) -> None:
    """Full-batch L-BFGS (float64), then Newton steps: the loss value's round-off stalls line searches at
    gradients ~1e-6, Newton's quadratic convergence needs only gradients and reaches ~1e-14."""
    objective = _ScaledObjective(head, phi, y)
    named = {name: p for name, p in objective.named_parameters() if p.requires_grad}
    optimizer = torch.optim.LBFGS(
        list(named.values()), lr=1, max_iter=300, tolerance_grad=1e-9, tolerance_change=0, history_size=50,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    sizes = [p.numel() for p in named.values()]

    def flat_objective(flat: torch.Tensor) -> torch.Tensor:
        values = {name: v.view(p.shape) for (name, p), v in zip(named.items(), flat.split(sizes), strict=True)}
        return functional_call(objective, values, ())

    for _ in range(newton_steps):
        flat = torch.cat([p.detach().reshape(-1) for p in named.values()])
        hessian = torch.func.hessian(flat_objective)(flat)
        flat = flat - torch.linalg.solve(hessian, torch.func.grad(flat_objective)(flat))
        with torch.no_grad():
            for p, v in zip(named.values(), flat.split(sizes), strict=True):
                p.copy_(v.view(p.shape))


# --- 1. closed-form Bayesian linear regression ---------------------------------------------------


def test_regression_head_recovers_closed_form_bayesian_linear_regression():
    torch.manual_seed(0)
    n, d, sigma, prior_scale = 200, 8, 0.5, 1.0
    phi = torch.randn(n, d, dtype=F64)
    y = phi @ torch.randn(d, dtype=F64) + sigma * torch.randn(n, dtype=F64)
    head = VBLLRegression(d, 1, regularization_weight=1 / n, parameterization="dense", prior_scale=prior_scale).double()
    with torch.no_grad():
        head.noise_log_scale.fill_(math.log(sigma))
    head.noise_log_scale.requires_grad_(False)
    _minimise(head, phi, y)

    covariance = torch.linalg.inv(phi.T @ phi / sigma**2 + (d / prior_scale) * torch.eye(d, dtype=F64))
    mean = covariance @ phi.T @ y / sigma**2
    # S entries are O(sigma^2 / N) ~ 1e-3; Newton reaches the optimum to ~1e-14 relative in float64
    torch.testing.assert_close(head.weight.covariance()[0], covariance, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(head.weight.mean[0], mean, rtol=1e-6, atol=1e-12)

    # at the optimum the ELBO is the log evidence: -N loss + D/2 - log p(Sigma) = log N(y; 0, s Phi Phi^T + sigma^2 I)
    with torch.no_grad():
        elbo = (
            -n * head.loss(phi, y).total + d / 2 - wishart_log_prior(head.noise_log_scale, head.dof, head.wishart_scale)
        )
        marginal = torch.distributions.MultivariateNormal(
            torch.zeros(n, dtype=F64), (prior_scale / d) * phi @ phi.T + sigma**2 * torch.eye(n, dtype=F64)
        )
        torch.testing.assert_close(elbo, marginal.log_prob(y), rtol=1e-6, atol=0)

        # predictive: N(wbar^T phi, phi^T S phi + sigma^2) at new inputs
        new = torch.randn(5, d, dtype=F64)
        pred = head.predictive(new)
        assert isinstance(pred, GaussianPredictive) and pred.mean_samples.shape == (1, 5, 1)
        torch.testing.assert_close(pred.mean[:, 0], new @ mean, rtol=1e-6, atol=1e-9)
        weight_var = torch.einsum("bi,ij,bj->b", new, covariance, new)
        torch.testing.assert_close(pred.variance[:, 0], weight_var + sigma**2, rtol=1e-6, atol=0)
        torch.testing.assert_close(pred.epistemic_variance[:, 0], weight_var, rtol=1e-6, atol=0)  # the weights'
        torch.testing.assert_close(pred.aleatoric_variance[:, 0], torch.full_like(weight_var, sigma**2), rtol=1e-6,
                                   atol=0)  # the noise's


# --- 2. bound ordering ---------------------------------------------------------------------------


def test_jensen_bound_below_expected_log_softmax_below_log_bma():
    torch.manual_seed(1)
    d, k, b, samples = 6, 5, 4, 100_000
    head = DiscriminativeVBLL(d, k, 0.1, "dense").double()
    with torch.no_grad():  # a posterior wide enough for the three quantities to differ visibly
        head.weight.log_scale.fill_(-0.5)
        head.weight.lower.copy_(0.3 * torch.randn_like(head.weight.lower))  # packed strict lower triangles
        head.noise_log_scale.fill_(-0.5)
    phi, y = torch.randn(b, d, dtype=F64), torch.randint(0, k, (b,))

    with torch.no_grad():
        jensen = head.bound(phi, y)
        # explicit samples of the whole last layer, w_k = wbar_k + L_k eps, shared across the batch
        eps = torch.randn(samples, k, d, dtype=F64)
        weights = head.weight.mean + torch.einsum("kij,skj->ski", _explicit_cholesky(head.weight), eps)
        noise = head.noise_log_scale.exp() * torch.randn(samples, 1, k, dtype=F64)
        logits = torch.einsum("bi,ski->sbk", phi, weights) + noise
        log_softmax_y = torch.log_softmax(logits, -1).gather(-1, y.expand(samples, -1).unsqueeze(-1)).squeeze(-1)
        expected, stderr = log_softmax_y.mean(0), log_softmax_y.std(0) / math.sqrt(samples)
        log_bma = torch.logsumexp(log_softmax_y, 0) - math.log(samples)

        assert (jensen <= expected + 3 * stderr).all()
        assert (expected <= log_bma).all()  # Jensen's inequality on the sample average: exact
        assert (expected - jensen > 10 * stderr).all(), "the Jensen bound should be visibly loose here"

        # our Monte Carlo bound and predictive draw the logits' marginal N(mu, diag v): same expectations
        head.bound_type, head.mc_samples = "mc", samples
        mc = head.bound(phi, y)
        assert ((mc - expected).abs() <= 4 * math.sqrt(2) * stderr).all()
        ours_bma = head.predictive(phi, samples).log_prob(y)
        assert ((ours_bma - log_bma).abs() < 0.01).all()


# --- 3. parameterisations ------------------------------------------------------------------------


@pytest.mark.parametrize("head_class", [VBLLRegression, DiscriminativeVBLL])
def test_vanishing_off_diagonals_equal_the_diagonal_parameterization(head_class):
    torch.manual_seed(2)
    d, k = 5, 3
    heads = {p: head_class(d, k, 0.05, p).double() for p in PARAMETERIZATIONS}
    _randomise(heads["diagonal"])
    for name in ("dense", "lowrank"):
        with torch.no_grad():
            heads[name].weight.mean.copy_(heads["diagonal"].weight.mean)
            heads[name].weight.log_scale.copy_(heads["diagonal"].weight.log_scale)
            heads[name].noise_log_scale.copy_(heads["diagonal"].noise_log_scale)
            (heads[name].weight.lower if name == "dense" else heads[name].weight.factor).zero_()
    phi = 3 * torch.randn(7, d, dtype=F64)
    y = torch.randn(7, k, dtype=F64) if head_class is VBLLRegression else torch.randint(0, k, (7,))
    reference = heads["diagonal"].loss(phi, y)
    for name in ("dense", "lowrank"):
        terms = heads[name].loss(phi, y)
        torch.testing.assert_close(terms.nll, reference.nll, rtol=1e-12, atol=0)
        torch.testing.assert_close(terms.regularizer, reference.regularizer, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            heads[name].weight.inner_product(phi), heads["diagonal"].weight.inner_product(phi), rtol=1e-12, atol=0
        )


# --- 4. the fast covariance-weighted inner product -----------------------------------------------


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_fast_inner_product_equals_explicit_and_package_values_and_gradients(parameterization):
    torch.manual_seed(3)
    rows = _rows(parameterization)
    phi = torch.randn(9, rows.dim, dtype=F64, requires_grad=True)
    weights = torch.randn(9, rows.num_rows, dtype=F64)  # a generic linear functional, to compare gradients

    def grads(value):
        return torch.autograd.grad((value * weights).sum(), [phi, *rows.parameters()], allow_unused=True)

    fast = rows.inner_product(phi)
    explicit = torch.einsum("bi,kij,bj->bk", phi, _explicit_covariance(rows), phi)
    package = _package_distribution(rows).covariance_weighted_inner_prod(phi[:, None, :, None])
    torch.testing.assert_close(fast, explicit, rtol=1e-12, atol=0)
    torch.testing.assert_close(fast, package, rtol=1e-12, atol=0)
    for ours, theirs in zip(grads(fast), grads(explicit), strict=True):
        if theirs is None:  # the mean does not enter the inner product
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rows.covariance(), _explicit_covariance(rows), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_trace_logdet_and_kl_match_dense_computations(parameterization):
    torch.manual_seed(4)
    rows, prior_variance = _rows(parameterization), 0.7
    covariance = _explicit_covariance(rows)
    torch.testing.assert_close(rows.trace(), covariance.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(rows.logdet(), torch.logdet(covariance), rtol=1e-12, atol=1e-12)
    q = torch.distributions.MultivariateNormal(rows.mean, covariance)
    p = torch.distributions.MultivariateNormal(
        torch.zeros_like(rows.mean), prior_variance * torch.eye(rows.dim, dtype=F64)
    )
    # vbll's KL drops the constant -D/2 of each row
    expected = torch.distributions.kl_divergence(q, p).sum() + rows.num_rows * rows.dim / 2
    torch.testing.assert_close(rows.kl_to_isotropic(prior_variance), expected, rtol=1e-12, atol=0)


# --- every bound against a dense float64 computation ---------------------------------------------


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_regression_and_discriminative_bounds_match_dense_formulas(parameterization):
    torch.manual_seed(5)
    d, k, b = 5, 3, 6
    phi = torch.randn(b, d, dtype=F64)
    reg = _randomise(VBLLRegression(d, k, 0.1, parameterization).double())
    y = torch.randn(b, k, dtype=F64)
    var_w = torch.einsum("bi,kij,bj->bk", phi, _explicit_covariance(reg.weight), phi)
    sigma2 = reg.noise_log_scale.exp() ** 2
    normal = torch.distributions.Normal(phi @ reg.weight.mean.T, sigma2.sqrt())
    expected = (normal.log_prob(y) - 0.5 * var_w / sigma2).sum(-1)  # E_q log N(y; W phi, Sigma), exactly
    torch.testing.assert_close(reg.bound(phi, y), expected, rtol=1e-12, atol=0)

    disc = _randomise(DiscriminativeVBLL(d, k, 0.1, parameterization).double())
    labels = torch.randint(0, k, (b,))
    mu = phi @ disc.weight.mean.T
    v = torch.einsum("bi,kij,bj->bk", phi, _explicit_covariance(disc.weight), phi) + disc.noise_log_scale.exp() ** 2
    expected = mu[torch.arange(b), labels] - torch.log(torch.exp(mu + v / 2).sum(-1))
    torch.testing.assert_close(disc.bound(phi, labels), expected, rtol=1e-12, atol=0)


def test_generative_bound_matches_dense_formula():
    torch.manual_seed(6)
    d, k, b = 4, 3, 5
    prior = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    head = _randomise(GenerativeVBLL(d, k, 0.1, class_prior=prior).double())
    phi, y = torch.randn(b, d, dtype=F64), torch.randint(0, k, (b,))
    sigma2 = torch.diag(head.noise_log_scale.exp() ** 2)
    s = torch.diag_embed(head.means.log_scale.exp() ** 2)
    mu = head.means.mean
    fit = torch.distributions.MultivariateNormal(mu[y], sigma2).log_prob(phi)
    trace = torch.stack([torch.trace(torch.linalg.solve(sigma2, s[c])) for c in y])
    marginals = torch.distributions.MultivariateNormal(mu, sigma2 + s).log_prob(phi.unsqueeze(1))  # [B, K]
    log_prior = head.log_class_prior  # held in the module's dtype: float32-rounded at construction
    torch.testing.assert_close(log_prior, prior.log(), rtol=1e-7, atol=0)
    expected = fit - 0.5 * trace + log_prior[y] - torch.logsumexp(log_prior + marginals, -1)
    torch.testing.assert_close(head.bound(phi, y), expected, rtol=1e-12, atol=0)


# --- 5. G-VBLL -----------------------------------------------------------------------------------


def test_generative_predictive_sums_to_one_and_tends_to_lda():
    torch.manual_seed(7)
    d, k, b = 5, 4, 8
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    head = _randomise(GenerativeVBLL(d, k, 0.1, class_prior=prior).double())
    phi = torch.randn(b, d, dtype=F64)
    pred = head.predictive(phi)
    assert isinstance(pred, CategoricalPredictive) and pred.logits.shape == (1, b, k)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(b, dtype=F64), rtol=0, atol=1e-14)

    with torch.no_grad():
        head.means.log_scale.fill_(-40.0)  # S_k = e^-80 I: the class means are known
    sigma = torch.diag(head.noise_log_scale.exp() ** 2)
    lda_logits = head.log_class_prior + torch.distributions.MultivariateNormal(head.means.mean, sigma).log_prob(
        phi.unsqueeze(1)
    )
    torch.testing.assert_close(head.predictive(phi).probs, torch.softmax(lda_logits, -1), rtol=0, atol=1e-10)


# --- 6. lambda scaling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        *(lambda lam, p=p: VBLLRegression(4, 2, lam, p) for p in PARAMETERIZATIONS),
        *(lambda lam, p=p: DiscriminativeVBLL(4, 3, lam, p) for p in PARAMETERIZATIONS),
        lambda lam: GenerativeVBLL(4, 3, lam),
    ],
    ids=[
        *(f"regression-{p}" for p in PARAMETERIZATIONS),
        *(f"discriminative-{p}" for p in PARAMETERIZATIONS),
        "generative",
    ],
)
def test_regularizer_gradient_scales_linearly_in_lambda_for_every_parameter(make):
    torch.manual_seed(8)
    base = _randomise(make(0.0).double())
    phi = torch.randn(6, 4, dtype=F64)
    y = torch.randn(6, 2, dtype=F64) if isinstance(base, VBLLRegression) else torch.randint(0, 3, (6,))

    def gradients(lam: float) -> list[torch.Tensor]:
        head = make(lam).double()
        head.load_state_dict(base.state_dict())
        return list(torch.autograd.grad(head.loss(phi, y).total, list(head.parameters())))

    g0, g1, g3 = gradients(0.0), gradients(0.01), gradients(0.03)
    for (name, _), a, b, c in zip(base.named_parameters(), g0, g1, g3, strict=True):
        regularizer_part = b - a
        assert regularizer_part.abs().max() > 1e-6, f"{name} gets no gradient from the regulariser"
        torch.testing.assert_close(c - a, 3 * regularizer_part, rtol=1e-9, atol=1e-13, msg=name)


def test_wishart_log_prior_matches_the_dense_formula():
    log_scale = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    precision = torch.diag(torch.exp(-2 * log_scale))
    dof, scale = 1.0, 0.5
    expected = (dof + 3 + 1) / 2 * torch.logdet(precision) - 0.5 * scale * torch.trace(precision)
    torch.testing.assert_close(wishart_log_prior(log_scale, dof, scale), expected, rtol=1e-14, atol=0)


# --- 7. predictive variance on unseen directions -------------------------------------------------


def test_predictive_variance_grows_along_directions_unseen_in_training():
    torch.manual_seed(9)
    n, d, sigma, prior_scale = 100, 3, 0.2, 1.0
    phi = torch.cat([torch.randn(n, 2, dtype=F64), torch.zeros(n, 1, dtype=F64)], 1)  # feature 3 never seen
    y = phi[:, 0] - phi[:, 1] + sigma * torch.randn(n, dtype=F64)
    head = VBLLRegression(d, 1, 1 / n, "dense", prior_scale=prior_scale).double()
    with torch.no_grad():
        head.noise_log_scale.fill_(math.log(sigma))
    head.noise_log_scale.requires_grad_(False)
    _minimise(head, phi, y)

    t = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0], dtype=F64)
    unseen = torch.stack([torch.zeros_like(t), torch.zeros_like(t), t], 1)
    seen = torch.stack([t, torch.zeros_like(t), torch.zeros_like(t)], 1)
    with torch.no_grad():
        var_unseen = head.predictive(unseen).variance[:, 0]
        var_seen = head.predictive(seen).variance[:, 0]
    assert (var_unseen.diff() > 0).all()
    # the posterior keeps the prior variance s_p / D along the unseen direction
    torch.testing.assert_close(var_unseen, sigma**2 + t**2 * prior_scale / d, rtol=1e-6, atol=0)
    assert (var_seen[1:] - sigma**2 < 0.02 * (var_unseen[1:] - sigma**2)).all()


# --- parity with the published package -----------------------------------------------------------


def _package_twin(ours: torch.nn.Module, parameterization: str, prior_scale: float = 1.0) -> torch.nn.Module:
    if isinstance(ours, VBLLRegression):
        twin = vbll.Regression(
            ours.in_features, ours.out_features, ours.regularization_weight, parameterization, prior_scale, cov_rank=3
        )
    elif isinstance(ours, DiscriminativeVBLL):
        twin = vbll.DiscClassification(
            ours.in_features, ours.num_classes, ours.regularization_weight, parameterization, cov_rank=3,
            prior_scale=prior_scale,
        )
    else:
        twin = vbll.GenClassification(
            ours.in_features, ours.num_classes, ours.regularization_weight, parameterization, prior_scale=prior_scale
        )
    twin = twin.to(ours.noise_log_scale.dtype)
    _copy_to_package(ours, twin)
    return twin


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "kind,parameterization",
    [
        *(("regression", p) for p in PARAMETERIZATIONS),
        *(("discriminative", p) for p in PARAMETERIZATIONS),
        ("generative", "diagonal"),
    ],
)
def test_loss_and_predictive_equal_the_vbll_package(kind, parameterization, dtype, rtol):
    torch.manual_seed(10)
    d, k, b, prior = 12, 5, 16, 0.3  # a prior scale != 1, so its place in each prior variance counts
    if kind == "regression":  # one output: where our summed bound and vbll's output average coincide
        ours, y = VBLLRegression(d, 1, 0.01, parameterization, prior_scale=prior), torch.randn(b, 1, dtype=dtype)
    elif kind == "discriminative":
        ours, y = DiscriminativeVBLL(d, k, 0.01, parameterization, prior_scale=prior), torch.randint(0, k, (b,))
    else:
        ours, y = GenerativeVBLL(d, k, 0.01, prior_scale=prior), torch.randint(0, k, (b,))
    ours = _randomise(ours.to(dtype), 0.1)
    twin = _package_twin(ours, parameterization, prior)
    phi = torch.randn(b, d, dtype=dtype)

    torch.testing.assert_close(ours.loss(phi, y).total, twin(phi).train_loss_fn(y), rtol=rtol, atol=0)
    with torch.no_grad():
        if kind == "regression":
            theirs = twin.predictive(phi)
            pred = ours.predictive(phi)
            torch.testing.assert_close(pred.mean, theirs.mean, rtol=rtol, atol=rtol)
            torch.testing.assert_close(pred.variance, theirs.scale**2, rtol=rtol, atol=0)
        elif kind == "discriminative":
            theirs = twin.logit_predictive(phi)
            mean, variance = ours.logit_moments(phi)
            torch.testing.assert_close(mean, theirs.mean, rtol=rtol, atol=rtol)
            torch.testing.assert_close(variance, theirs.covariance_diagonal, rtol=rtol, atol=0)
        else:
            torch.testing.assert_close(ours.predictive(phi).probs, twin.predictive(phi), rtol=rtol, atol=rtol)


# --- dtype and input checks ----------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_heads_compute_in_float32_under_bf16_autocast(parameterization):
    torch.manual_seed(11)
    head = DiscriminativeVBLL(16, 4, 0.01, parameterization)
    phi, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    reference = head.loss(phi, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = head.loss(phi, y)
        moments = head.logit_moments(phi)
        from_bf16 = head.loss(phi.bfloat16(), y)
    assert terms.total.dtype == torch.float32 and all(m.dtype == torch.float32 for m in moments)
    torch.testing.assert_close(terms.total, reference.total, rtol=0, atol=0)
    torch.testing.assert_close(from_bf16.total, head.loss(phi.bfloat16().float(), y).total, rtol=0, atol=0)
    terms.total.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in head.parameters())


def test_bad_inputs_are_clear_errors():
    head = DiscriminativeVBLL(4, 3, 0.1)
    with pytest.raises(ValueError, match=r"features \[B, 4\]"):
        head.loss(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class labels"):
        head.loss(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="parameterization"):
        DiscriminativeVBLL(4, 3, 0.1, "full")
    with pytest.raises(ValueError, match="diagonal"):
        GenerativeVBLL(4, 3, 0.1, "dense")
    with pytest.raises(ValueError, match="class_prior"):
        GenerativeVBLL(4, 3, 0.1, class_prior=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="regularization_weight"):
        VBLLRegression(4, 1, -1.0)
    with pytest.raises(ValueError, match=r"targets \[B, 2\]"):
        VBLLRegression(4, 2, 0.1).loss(torch.randn(3, 4), torch.randn(3))
    with pytest.raises(ValueError, match="bound"):
        DiscriminativeVBLL(4, 3, 0.1, bound="semimontecarlo")
    with pytest.raises(ValueError, match=r"features \[B, 4\], B >= 1; got \(0, 4\)"):
        head.loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="class_prior"):
        GenerativeVBLL(4, 3, 0.1, class_prior=torch.tensor([0.5, math.nan, 0.5]))


@pytest.mark.parametrize("make", [lambda: DiscriminativeVBLL(4, 3, 0.1), lambda: GenerativeVBLL(4, 3, 0.1)])
@pytest.mark.parametrize("label", [-1, 3])
def test_labels_outside_the_classes_are_refused(make, label):
    """A label -1 (a common "ignore") indexed the generative head's last class and trained on it."""
    with pytest.raises(RuntimeError, match=r"expects labels in \[0, 3\)"):
        make().loss(torch.randn(3, 4), torch.tensor([0, 1, label]))


def test_generative_head_is_accurate_in_float32_far_from_the_origin():
    """Features at offset 100 from the origin with classes 0.02 apart: expanding ||phi - mubar_k||^2 lost the
    class differences to cancellation (probabilities 0.17 off the float64 head); centred, float32 rounding."""
    torch.manual_seed(0)
    head = GenerativeVBLL(64, 5, 0.01).double()
    with torch.no_grad():
        head.means.mean.copy_(100.0 + 0.02 * torch.randn(5, 64, dtype=F64))
        head.noise_log_scale.fill_(-1.0)
    phi = head.means.mean.detach()[torch.arange(16) % 5] + 0.3 * torch.randn(16, 64, dtype=F64)
    y = torch.arange(16) % 5
    exact_probs, exact_loss = head.predictive(phi).probs, head.loss(phi, y).total
    single = head.float()
    torch.testing.assert_close(single.predictive(phi.float()).probs.double(), exact_probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(single.loss(phi.float(), y).total.double(), exact_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_initial_covariance_diagonals_are_the_packages(parameterization):
    """``vbll`` 0.4.9 starts a low-rank head's ``W_logdiag`` as a log variance (``cov_diag = exp(W_logdiag)``),
    a dense or diagonal one's as a log standard deviation: the initial variances are 1/D and 1/D^2 (classifier,
    up to its 1e-3 noise) and the regression head's median exp(-log D) or exp(-log D / 2)."""
    torch.manual_seed(0)
    dim = 128
    classifier = DiscriminativeVBLL(dim, 10, 0.01, parameterization).weight.log_scale.detach().mul(2).exp()
    expected = 1 / dim if parameterization == "lowrank" else 1 / dim**2
    torch.testing.assert_close(classifier.mean().item(), expected, rtol=1e-2, atol=0)
    twin = vbll.Regression(dim, 1, 0.01, parameterization=parameterization, cov_rank=3)
    package = twin.W_logdiag.detach().exp()  # a variance (low rank) or a standard deviation
    package_variance = package if parameterization == "lowrank" else package.square()
    ours = VBLLRegression(dim, 1, 0.01, parameterization).weight.log_scale.detach().mul(2).exp()
    assert ours.log().median().item() == pytest.approx(package_variance.log().median().item(), abs=0.35)


@pytest.mark.parametrize("parameterization", ["dense", "lowrank"])
def test_regression_off_diagonals_start_with_std_one_over_d(parameterization):
    """``vbll`` 0.4.9 (spec section 4) starts the regression head's off-diagonals as N(0, 1)/D: with n >= 4096
    entries the sample std's relative standard error is 1/sqrt(2n) <= 1.1%, so 5% is over 4 standard errors."""
    torch.manual_seed(0)
    dim = 64
    weight = VBLLRegression(dim, 8, 0.01, parameterization, rank=8).weight
    entries = (weight.lower if parameterization == "dense" else weight.factor).detach()
    assert entries.numel() >= 4096
    assert entries.std().item() == pytest.approx(1 / dim, rel=0.05)


def test_discriminative_noise_log_scale_starts_standard_normal_minus_one():
    """``vbll`` 0.4.9 starts D-VBLL's log noise std as N(0, 1) - 1: over 10,000 classes the mean's standard error is
    0.01 and the std's 0.007, so 0.05 is 5 and 7 standard errors."""
    torch.manual_seed(0)
    log_scale = DiscriminativeVBLL(2, 10_000, 0.01, "diagonal").noise_log_scale.detach()
    assert log_scale.mean().item() == pytest.approx(-1.0, abs=0.05)
    assert log_scale.std().item() == pytest.approx(1.0, abs=0.05)
