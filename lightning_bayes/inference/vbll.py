"""Variational Bayesian last layers (VBLL; Harrison, Willes & Snoek, ICLR 2024, arXiv 2404.11599).

A VBLL head sits on point-estimated features ``phi = g(x)`` in ``R^D`` and keeps a Gaussian
variational posterior over its last-layer weights. Its training objective is deterministic
(closed form or a tight bound) and each head owns it, as in the reference package ``vbll``:

    loss = -1/B sum_b l(phi_b, y_b) + lambda [KL(q || p) - log p(Sigma)],   lambda = 1/N (tempered)

* :class:`VBLLRegression`: ``y = W phi + eps``, ``eps ~ N(0, diag sigma^2)``; exact expected
  log-likelihood ``l = sum_i log N(y_i; wbar_i^T phi, sigma_i^2) - phi^T S_i phi / (2 sigma_i^2)``.
* :class:`DiscriminativeVBLL`: logits ``z = W phi + eps``; Jensen bound
  ``l = mu_y - log sum_k exp(mu_k + v_k / 2)`` with ``mu_k = wbar_k^T phi``,
  ``v_k = phi^T S_k phi + sigma_k^2``, or a Monte Carlo estimate of ``E_q log softmax_y(z)``.
* :class:`GenerativeVBLL`: ``phi | y=k ~ N(mu_k, Sigma)``, ``q(mu_k) = N(mubar_k, S_k)``;
  ``l = log N(phi; mubar_y, Sigma) - tr(Sigma^-1 S_y)/2 + log pi_y - log sum_k pi_k N(phi; mubar_k, Sigma + S_k)``.

The KL drops the constant ``-D/2`` per row and ``log p(Sigma) = nu' log det Sigma^-1 - s_W tr Sigma^-1 / 2``
with ``nu' = (nu + n + 1) / 2`` is the (unnormalised) Wishart log prior on the diagonal noise
precision of dimension ``n``; both exactly as in ``vbll`` 0.4.9, so losses agree with the package.

The covariance-weighted inner product ``phi^T S_k phi`` for all examples and classes, the cost
that dominates training, is computed without a ``B x K x D x D`` tensor: dense ``S_k = L_k L_k^T``
arranges ``L`` as ``D x (K D)`` so ``||L_k^T phi_b||^2`` is one ``(B x D)(D x KD)`` matmul; diagonal is
``Phi^2 exp(2 log s)^T``; low rank ``S_k = U_k U_k^T + diag(d_k^2)`` is ``||U_k^T phi||^2`` (one
``(B x D)(D x K r)`` matmul) plus the diagonal term. Every head computes in float32 or wider, outside autocast.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from ..checks import check_features, class_labels, is_int
from ..predictive import CategoricalPredictive, GaussianPredictive

Parameterization = Literal["dense", "diagonal", "lowrank"]
PARAMETERIZATIONS: tuple[str, ...] = ("dense", "diagonal", "lowrank")
_LOG_2PI = math.log(2.0 * math.pi)

_Method = TypeVar("_Method", bound=Callable[..., object])


def _outside_autocast(method: _Method) -> _Method:
    """Run a head method ``(self, features, ...)`` with autocast disabled on the features' device."""

    @functools.wraps(method)
    def wrapper(self: nn.Module, features: Tensor, *args: object, **kwargs: object) -> object:
        with torch.autocast(features.device.type, enabled=False):
            return method(self, features, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: the dtype the variance terms are computed in."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class VBLLLoss:
    """The objective's terms: ``total = nll + regularization_weight * regularizer``.

    ``nll`` is the batch mean of the negative bound, ``regularizer`` is ``KL(q || p) - log p(Sigma)``
    before the weight ``lambda``.
    """

    nll: Tensor
    regularizer: Tensor
    total: Tensor


class GaussianRows(nn.Module):
    """K independent Gaussians ``q(w_k) = N(wbar_k, S_k)`` over ``R^D``: the rows of a last layer.

    Parameters: ``mean`` ``[K, D]``; ``log_scale`` ``[K, D]``, the log of the Cholesky diagonal
    (the standard deviations when diagonal); dense: ``lower`` ``[D(D-1)/2, K]``, the strict lower
    triangles packed in ``torch.tril_indices(D, D, -1)`` order, ``lower[p, k] = L_k[i_p, j_p]`` (half
    the parameters and optimiser state of a square store, no masking); lowrank: ``factor``
    ``[K, r, D]``, ``factor[k] = U_k^T`` (``[K*r, D]`` is a view, like a linear layer's weight).
    """

    # buffers (register_buffer), typed for readers and checkers
    tril_rows: Tensor
    tril_cols: Tensor

    def __init__(
        self,
        mean: Tensor,
        log_scale: Tensor,
        parameterization: Parameterization,
        off_diagonal: Tensor | None = None,
    ) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
        if mean.ndim != 2 or log_scale.shape != mean.shape:
            raise ValueError(
                f"mean and log_scale must both be [K, D]; got {tuple(mean.shape)} and {tuple(log_scale.shape)}"
            )
        num_rows, dim = mean.shape
        self.parameterization = parameterization
        self.mean = nn.Parameter(mean)
        self.log_scale = nn.Parameter(log_scale)
        if parameterization == "diagonal":
            if off_diagonal is not None:
                raise ValueError("off_diagonal must be None for the diagonal parameterization")
            return
        shape = None if off_diagonal is None else tuple(off_diagonal.shape)
        if parameterization == "dense":
            if shape != (dim * (dim - 1) // 2, num_rows):
                raise ValueError(
                    f"dense off_diagonal must be [D(D-1)/2, K]=[{dim * (dim - 1) // 2}, {num_rows}]; got {shape}"
                )
            assert off_diagonal is not None  # shape is None otherwise, rejected above
            self.lower = nn.Parameter(off_diagonal)
            rows, cols = torch.tril_indices(dim, dim, -1)
            self.register_buffer("tril_rows", rows, persistent=False)
            self.register_buffer("tril_cols", cols, persistent=False)
        else:
            if (
                off_diagonal is None
                or off_diagonal.ndim != 3
                or (off_diagonal.shape[0], off_diagonal.shape[2]) != (num_rows, dim)
            ):
                raise ValueError(f"lowrank off_diagonal must be [K, rank, D] with K={num_rows}, D={dim}; got {shape}")
            self.factor = nn.Parameter(off_diagonal)

    @property
    def num_rows(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    def _arranged_strict_lower(self, dtype: torch.dtype) -> Tensor:
        """Strict lower triangles of the Cholesky factors arranged ``[D, K, D]``, ``[i, k, j] = L_k[i, j]``,
        so that ``[D, K*D]`` is a view."""
        lower = self.lower.to(dtype)
        arranged = lower.new_zeros(self.dim, self.num_rows, self.dim)
        arranged[self.tril_rows, :, self.tril_cols] = lower
        return arranged

    def inner_product(self, phi: Tensor) -> Tensor:
        """``phi_b^T S_k phi_b`` for every example and row, ``[B, K]``, in ``phi``'s dtype."""
        dtype, (batch, dim), rows = phi.dtype, phi.shape, self.num_rows
        if self.parameterization == "dense":
            # (L_k^T phi)_j = sum_{i>j} L_k[i, j] phi_i + d_kj phi_j, for all k in one matmul
            projected = (phi @ self._arranged_strict_lower(dtype).view(dim, rows * dim)).view(batch, rows, dim)
            projected = projected + phi.unsqueeze(1) * self.log_scale.to(dtype).exp()
            return projected.square().sum(-1)
        diagonal = phi.square() @ self.log_scale.to(dtype).mul(2).exp().T
        if self.parameterization == "diagonal":
            return diagonal
        rank = self.factor.shape[1]
        projected = (phi @ self.factor.to(dtype).view(rows * rank, dim).T).view(batch, rows, rank)
        return diagonal + projected.square().sum(-1)

    def trace(self) -> Tensor:
        """``tr S_k``, ``[K]``."""
        dtype = _wide(self.mean.dtype)
        trace = self.log_scale.to(dtype).mul(2).exp().sum(-1)
        if self.parameterization == "dense":
            trace = trace + self.lower.to(dtype).square().sum(0)
        elif self.parameterization == "lowrank":
            trace = trace + self.factor.to(dtype).square().sum((1, 2))
        return trace

    def logdet(self) -> Tensor:
        """``log det S_k``, ``[K]``; low rank by the matrix determinant lemma,
        ``log det(U U^T + D^2) = log det D^2 + log det(I + U^T D^-2 U)``."""
        dtype = _wide(self.mean.dtype)
        log_scale = self.log_scale.to(dtype)
        logdet = 2.0 * log_scale.sum(-1)
        if self.parameterization != "lowrank":
            return logdet
        scaled = self.factor.to(dtype) * (-log_scale).exp().unsqueeze(1)  # (D^-1 U)^T, [K, r, D]
        with torch.autocast(scaled.device.type, enabled=False):
            capacitance = scaled @ scaled.mT
        capacitance = capacitance + torch.eye(capacitance.shape[-1], dtype=dtype, device=capacitance.device)
        return logdet + 2.0 * torch.linalg.cholesky(capacitance).diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def kl_to_isotropic(self, prior_variance: float) -> Tensor:
        """``sum_k KL(N(wbar_k, S_k) || N(0, s I)) + K D / 2``, i.e.
        ``1/2 sum_k [||wbar_k||^2 / s + tr S_k / s + D log s - log det S_k]`` (``vbll``'s convention)."""
        mean = self.mean.to(_wide(self.mean.dtype))
        squared = mean.square().sum()
        return 0.5 * (
            (squared + self.trace().sum()) / prior_variance
            + self.num_rows * self.dim * math.log(prior_variance)
            - self.logdet().sum()
        )

    def covariance(self) -> Tensor:
        """The explicit covariances ``S_k``, ``[K, D, D]`` (for inspection; training never forms them)."""
        dtype = _wide(self.mean.dtype)
        variance = self.log_scale.to(dtype).mul(2).exp()
        if self.parameterization == "diagonal":
            return torch.diag_embed(variance)
        if self.parameterization == "dense":
            cholesky = self._arranged_strict_lower(dtype).permute(1, 0, 2) + torch.diag_embed(variance.sqrt())
            return cholesky @ cholesky.transpose(-1, -2)
        factor = self.factor.to(dtype)
        return factor.mT @ factor + torch.diag_embed(variance)


def wishart_log_prior(log_scale: Tensor, dof: float, scale: float) -> Tensor:
    """``nu' log det Sigma^-1 - s_W/2 tr Sigma^-1`` for ``Sigma = diag(exp(2 log_scale))`` of size n,
    ``nu' = (nu + n + 1) / 2`` (unnormalised, as in ``vbll``)."""
    log_scale = log_scale.to(_wide(log_scale.dtype))
    effective_dof = (dof + log_scale.numel() + 1.0) / 2.0
    return -2.0 * effective_dof * log_scale.sum() - 0.5 * scale * log_scale.mul(-2).exp().sum()


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def _check_count(name: str, value: int) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _log_scale(package_log_diagonal: Tensor, parameterization: Parameterization) -> Tensor:
    """Our log standard deviations from ``vbll``'s initial ``W_logdiag``: a log std for dense (Cholesky) and
    diagonal rows, a log variance for low-rank ones (``cov_diag = exp(W_logdiag)``)."""
    return 0.5 * package_log_diagonal if parameterization == "lowrank" else package_log_diagonal


def _off_diagonal(parameterization: Parameterization, num_rows: int, dim: int, rank: int, std: float) -> Tensor | None:
    """Initial packed strict lower triangles (dense) or low-rank factors, entries ``N(0, std^2)``."""
    if parameterization == "diagonal":
        return None
    if parameterization == "dense":
        return std * torch.randn(dim * (dim - 1) // 2, num_rows)
    return std * torch.randn(num_rows, rank, dim)


class VBLLHead(nn.Module, ABC):
    """What the three heads share: the per-example bound, the regulariser and their weighted sum."""

    in_features: int

    def __init__(self, in_features: int, regularization_weight: float) -> None:
        super().__init__()
        _check_count("in_features", in_features)
        if not (
            isinstance(regularization_weight, (int, float))
            and math.isfinite(regularization_weight)
            and regularization_weight >= 0
        ):
            raise ValueError(f"regularization_weight must be a finite number >= 0; got {regularization_weight!r}")
        self.in_features = in_features
        self.regularization_weight = float(regularization_weight)

    def _features(self, features: Tensor, reference: Tensor) -> Tensor:
        """``features`` checked to be ``[B, in_features]`` and cast to float32 or wider."""
        check_features(features, self.in_features, type(self).__name__)
        return features.to(_wide(torch.promote_types(features.dtype, reference.dtype)))

    def _labels(self, y: Tensor, batch: int, num_classes: int) -> Tensor:
        """``y`` checked to be integer labels ``[B]`` in ``[0, K)`` (a label -1 indexed the last class; on a GPU
        the range check is asynchronous: no host sync per step)."""
        return class_labels(y, batch, num_classes, type(self).__name__)

    @abstractmethod
    def bound(self, features: Tensor, y: Tensor) -> Tensor:
        """Per-example lower bound ``l(phi_b, y_b)`` on the expected log-likelihood, ``[B]``."""

    @abstractmethod
    def regularizer(self) -> Tensor:
        """``KL(q || p) - log p(Sigma)`` (before the weight)."""

    @_outside_autocast
    def loss(self, features: Tensor, y: Tensor) -> VBLLLoss:
        """The training objective ``-mean_b l + lambda (KL - log p(Sigma))`` and its terms."""
        nll = -self.bound(features, y).mean()
        regularizer = self.regularizer()
        return VBLLLoss(nll=nll, regularizer=regularizer, total=nll + self.regularization_weight * regularizer)


class VBLLRegression(VBLLHead):
    """Bayesian linear regression head, ``y = W phi + eps``, ``eps ~ N(0, diag sigma^2)``.

    Prior ``w_i ~ N(0, (prior_scale / D) I)``. The bound sums the exact expected log-likelihood over
    the outputs (``vbll`` averages over outputs and weights each by ``tr Sigma^-1``; the two agree
    for one output). Initialisation as ``vbll`` 0.4.9: ``wbar ~ N(0, 1)``, log Cholesky diagonal
    ``N(0, 1) - log(D)/2`` (low rank: half that, the package's number being a log variance there),
    off-diagonals ``N(0, 1)/D``; unlike the package (log noise std ``N(0, 1) log(wishart_scale)``) the noise
    starts at ``sigma = 1``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        regularization_weight: float,
        parameterization: Parameterization = "dense",
        prior_scale: float = 1.0,
        wishart_scale: float = 1e-2,
        dof: float = 1.0,
        rank: int = 3,
    ) -> None:
        super().__init__(in_features, regularization_weight)
        _check_count("out_features", out_features)
        _check_count("rank", rank)
        _check_positive("prior_scale", prior_scale)
        _check_positive("wishart_scale", wishart_scale)
        _check_positive("dof", dof)
        self.out_features = out_features
        self.prior_variance = prior_scale / in_features
        self.wishart_scale = wishart_scale
        self.dof = dof
        self.weight = GaussianRows(
            torch.randn(out_features, in_features),
            _log_scale(torch.randn(out_features, in_features) - 0.5 * math.log(in_features), parameterization),
            parameterization,
            _off_diagonal(parameterization, out_features, in_features, rank, 1.0 / in_features),
        )
        self.noise_log_scale = nn.Parameter(torch.zeros(out_features))

    def _targets(self, y: Tensor, batch: int) -> Tensor:
        if y.ndim == 1 and self.out_features == 1:
            y = y.unsqueeze(-1)
        if y.shape != (batch, self.out_features):
            raise ValueError(f"VBLLRegression expects targets [B, {self.out_features}]; got {tuple(y.shape)}")
        return y

    @_outside_autocast
    def bound(self, features: Tensor, y: Tensor) -> Tensor:
        phi = self._features(features, self.weight.mean)
        y = self._targets(y, phi.shape[0]).to(phi.dtype)
        log_scale = self.noise_log_scale.to(phi.dtype)
        precision = log_scale.mul(-2).exp()
        mean = phi @ self.weight.mean.to(phi.dtype).T
        log_density = -0.5 * (_LOG_2PI + (y - mean).square() * precision) - log_scale
        return (log_density - 0.5 * self.weight.inner_product(phi) * precision).sum(-1)

    def regularizer(self) -> Tensor:
        return self.weight.kl_to_isotropic(self.prior_variance) - wishart_log_prior(
            self.noise_log_scale, self.dof, self.wishart_scale
        )

    @_outside_autocast
    def predictive(self, features: Tensor) -> GaussianPredictive:
        """Closed form ``N(wbar_i^T phi, phi^T S_i phi + sigma_i^2)``, one component (S = 1), its weight variance
        ``phi^T S_i phi`` the epistemic part."""
        phi = self._features(features, self.weight.mean)
        mean = phi @ self.weight.mean.to(phi.dtype).T
        weight_variance = self.weight.inner_product(phi)
        variance = weight_variance + self.noise_log_scale.to(phi.dtype).mul(2).exp()
        return GaussianPredictive(mean.unsqueeze(0), variance.unsqueeze(0), weight_variance.unsqueeze(0))


class DiscriminativeVBLL(VBLLHead):
    """Classification head with Gaussian logits ``z = W phi + eps``, ``eps ~ N(0, diag sigma^2)`` (D-VBLL).

    Prior ``w_k ~ N(0, (2 prior_scale / D) I)``. ``bound="jensen"`` is the deterministic bound
    ``mu_y - logsumexp(mu + v/2)``; ``"mc"`` averages ``log softmax_y`` over ``mc_samples`` draws of
    ``z ~ N(mu, diag v)`` (the exact marginal of the logits under q, rows being independent).
    Initialisation as ``vbll`` 0.4.9: ``wbar ~ N(0, 2/D)``, log Cholesky diagonal
    ``-log D + 1e-3 N(0, 1)`` (low rank: half that, the package's log variance), off-diagonals
    ``1e-3 N(0, 1)/D``, noise log std ``N(0, 1) - 1``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        regularization_weight: float,
        parameterization: Parameterization = "dense",
        prior_scale: float = 1.0,
        wishart_scale: float = 1.0,
        dof: float = 1.0,
        bound: Literal["jensen", "mc"] = "jensen",
        rank: int = 3,
        mc_samples: int = 10,
    ) -> None:
        super().__init__(in_features, regularization_weight)
        _check_count("num_classes", num_classes)
        _check_count("rank", rank)
        _check_count("mc_samples", mc_samples)
        _check_positive("prior_scale", prior_scale)
        _check_positive("wishart_scale", wishart_scale)
        _check_positive("dof", dof)
        if bound not in ("jensen", "mc"):
            raise ValueError(f"bound must be 'jensen' or 'mc'; got {bound!r}")
        self.num_classes = num_classes
        self.prior_variance = 2.0 * prior_scale / in_features
        self.wishart_scale = wishart_scale
        self.dof = dof
        self.bound_type = bound
        self.mc_samples = mc_samples
        self.weight = GaussianRows(
            torch.randn(num_classes, in_features) * math.sqrt(2.0 / in_features),
            _log_scale(1e-3 * torch.randn(num_classes, in_features) - math.log(in_features), parameterization),
            parameterization,
            _off_diagonal(parameterization, num_classes, in_features, rank, 1e-3 / in_features),
        )
        self.noise_log_scale = nn.Parameter(torch.randn(num_classes) - 1.0)

    @_outside_autocast
    def logit_moments(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``wbar_k^T phi`` and variance ``phi^T S_k phi + sigma_k^2`` of the logits, ``[B, K]`` each."""
        phi = self._features(features, self.weight.mean)
        mean = phi @ self.weight.mean.to(phi.dtype).T
        variance = self.weight.inner_product(phi) + self.noise_log_scale.to(phi.dtype).mul(2).exp()
        return mean, variance

    def _logit_samples(self, phi: Tensor, num_samples: int) -> Tensor:
        mean, variance = self.logit_moments(phi)
        return mean + variance.sqrt() * torch.randn((num_samples, *mean.shape), dtype=mean.dtype, device=mean.device)

    @_outside_autocast
    def bound(self, features: Tensor, y: Tensor) -> Tensor:
        phi = self._features(features, self.weight.mean)
        y = self._labels(y, phi.shape[0], self.num_classes).unsqueeze(-1)
        if self.bound_type == "mc":
            log_probs = torch.log_softmax(self._logit_samples(phi, self.mc_samples), dim=-1)
            return log_probs.gather(-1, y.expand(self.mc_samples, -1, -1)).squeeze(-1).mean(0)
        mean, variance = self.logit_moments(phi)
        return mean.gather(-1, y).squeeze(-1) - torch.logsumexp(mean + 0.5 * variance, dim=-1)

    def regularizer(self) -> Tensor:
        return self.weight.kl_to_isotropic(self.prior_variance) - wishart_log_prior(
            self.noise_log_scale, self.dof, self.wishart_scale
        )

    @_outside_autocast
    def predictive(self, features: Tensor, num_samples: int) -> CategoricalPredictive:
        """``num_samples`` logit samples ``z ~ N(mu, diag v)`` per input, ``[S, B, K]``."""
        _check_count("num_samples", num_samples)
        return CategoricalPredictive(self._logit_samples(self._features(features, self.weight.mean), num_samples))


class GenerativeVBLL(VBLLHead):
    """Generative classification head (G-VBLL): ``phi | y=k ~ N(mu_k, Sigma)``, ``Sigma`` diagonal.

    ``q(mu_k) = N(mubar_k, S_k)`` diagonal, prior ``N(0, prior_scale I)``; the noise ``Sigma`` has
    the Wishart prior over the D feature dimensions. ``class_prior`` ``pi`` (uniform by default,
    as in ``vbll``) enters the bound and the predictive ``p(y=k | phi) propto pi_k N(phi; mubar_k, Sigma + S_k)``.
    Initialisation as ``vbll`` 0.4.9: ``mubar ~ 0.1 N(0, 1)``, log std of ``S`` and of the noise ``N(0, 1)``.
    """

    # buffers (register_buffer), typed for readers and checkers
    log_class_prior: Tensor

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        regularization_weight: float,
        parameterization: str = "diagonal",
        prior_scale: float = 1.0,
        wishart_scale: float = 1.0,
        dof: float = 1.0,
        class_prior: Tensor | None = None,
    ) -> None:
        super().__init__(in_features, regularization_weight)
        _check_count("num_classes", num_classes)
        _check_positive("prior_scale", prior_scale)
        _check_positive("wishart_scale", wishart_scale)
        _check_positive("dof", dof)
        if parameterization != "diagonal":
            raise ValueError(
                f"GenerativeVBLL supports parameterization='diagonal' only (its bound needs "
                f"N(phi; mubar_k, Sigma + S_k) for every class); got {parameterization!r}"
            )
        if class_prior is None:
            class_prior = torch.full((num_classes,), 1.0 / num_classes)
        class_prior = torch.as_tensor(class_prior, dtype=torch.float64)
        if (
            class_prior.shape != (num_classes,) or not torch.isfinite(class_prior).all() or (class_prior <= 0).any()
            or abs(class_prior.sum().item() - 1) > 1e-6
        ):
            raise ValueError(
                f"class_prior must be {num_classes} positive probabilities summing to 1; got {class_prior.tolist()}"
            )
        self.num_classes = num_classes
        self.prior_variance = prior_scale
        self.wishart_scale = wishart_scale
        self.dof = dof
        self.register_buffer("log_class_prior", class_prior.log())  # float64: a float64 head keeps it exact
        self.means = GaussianRows(
            0.1 * torch.randn(num_classes, in_features), torch.randn(num_classes, in_features), "diagonal"
        )
        self.noise_log_scale = nn.Parameter(torch.randn(in_features))

    def _class_log_likelihoods(self, phi: Tensor) -> Tensor:
        """``log pi_k + log N(phi; mubar_k, Sigma + S_k)``, ``[B, K]``, by matmuls over D (no ``B x K x D``).
        Both sides are first centred on the class means' average (the quadratic form does not change): expanding
        ``||phi - mubar_k||^2`` cancels catastrophically in float32 when features lie far from the origin and
        the classes close together (offset 100: probabilities 0.17 off)."""
        dtype = phi.dtype
        centre = self.means.mean.detach().to(dtype).mean(0)
        phi = phi - centre
        mean = self.means.mean.to(dtype) - centre
        variance = self.noise_log_scale.to(dtype).mul(2).exp() + self.means.log_scale.to(dtype).mul(2).exp()  # [K, D]
        precision = variance.reciprocal()
        squared = phi.square() @ precision.T - 2.0 * phi @ (mean * precision).T + (mean.square() * precision).sum(-1)
        log_density = -0.5 * (squared + variance.log().sum(-1) + self.in_features * _LOG_2PI)
        return self.log_class_prior.to(dtype) + log_density

    @_outside_autocast
    def bound(self, features: Tensor, y: Tensor) -> Tensor:
        phi = self._features(features, self.means.mean)
        y = self._labels(y, phi.shape[0], self.num_classes)
        log_scale = self.noise_log_scale.to(phi.dtype)
        precision = log_scale.mul(-2).exp()
        residual = phi - self.means.mean.to(phi.dtype)[y]
        log_density = (-0.5 * (_LOG_2PI + residual.square() * precision) - log_scale).sum(-1)
        trace = (self.means.log_scale.to(phi.dtype).mul(2).exp()[y] * precision).sum(-1)
        log_prior = self.log_class_prior.to(phi.dtype)[y]
        return log_density - 0.5 * trace + log_prior - torch.logsumexp(self._class_log_likelihoods(phi), dim=-1)

    def regularizer(self) -> Tensor:
        return self.means.kl_to_isotropic(self.prior_variance) - wishart_log_prior(
            self.noise_log_scale, self.dof, self.wishart_scale
        )

    @_outside_autocast
    def predictive(self, features: Tensor) -> CategoricalPredictive:
        """Closed-form class posterior, one sample of log-probabilities ``[1, B, K]``."""
        phi = self._features(features, self.means.mean)
        return CategoricalPredictive(torch.log_softmax(self._class_log_likelihoods(phi), dim=-1).unsqueeze(0))
