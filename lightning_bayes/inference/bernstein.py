"""The one-dimensional Bernstein-flow chain of BF-VI, elementwise over a tensor of parameters.

Each scalar is ``w = f3(h(sigmoid(f1(z))))`` with ``z ~ N(0, 1)``:

* ``f1``: ``z~ = softplus(a) z + b``;
* ``u = sigmoid(z~)``, clipped to ``[1e-5, 1 - 1e-5]``;
* ``h(u) = sum_{k=0}^{M} theta_k C(M, k) u^k (1 - u)^(M - k)``, a Bernstein polynomial made strictly increasing by
  ``theta_0 = theta'_0``, ``theta_k = theta_{k-1} + softplus(theta'_k)`` (so ``h(0) = theta_0``, ``h(1) = theta_M``);
* ``f3`` (optional): ``w = softplus(alpha) h - beta``.

The density is analytic (``h'(u) = M sum_{k<M} (theta_{k+1} - theta_k) C(M-1, k) u^k (1 - u)^(M-1-k) > 0``):

    log q(w) = log N(z; 0, 1) - log softplus(a) - log[u (1 - u)] - log h'(u) - log softplus(alpha).

Reference: Duerr, Hoertling, Dold, Kovylov & Sick, "Bernstein flows for flexible posteriors in variational
Bayes", AStA 2024 (arXiv 2202.05650), section 2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import is_finite, is_int
from .softplus import inverse_softplus

_U_CLIP = 1e-5
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@functools.cache
def _log_binomials(degree: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``log C(M, k)`` for ``k = 0..M``."""
    return torch.tensor([math.lgamma(degree + 1) - math.lgamma(k + 1) - math.lgamma(degree - k + 1)
                         for k in range(degree + 1)], dtype=dtype, device=device)  # fmt: skip


def _log_basis(log_u: Tensor, log_v: Tensor, degree: int) -> Tensor:
    """``log C(M, k) + k log u + (M - k) log(1 - u)`` ``[..., M + 1]`` from ``log u``, ``log(1 - u)`` ``[..., 1]``: the
    log of the basis ``b_{k,M}(u)``, in log space so that large ``M`` is stable."""
    k = torch.arange(degree + 1, dtype=log_u.dtype, device=log_u.device)
    return _log_binomials(degree, log_u.dtype, log_u.device) + k * log_u + (degree - k) * log_v


def _logs(u: Tensor) -> tuple[Tensor, Tensor]:
    """``log u`` and ``log(1 - u)`` ``[..., 1]``, bounded below by the dtype's lowest finite value so that a zero power
    of ``u = 0`` or ``u = 1`` is ``0 * finite = 0`` (as ``u^0 = 1``) and every other power underflows to 0."""
    lowest = torch.finfo(u.dtype).min
    u = u.unsqueeze(-1)
    return torch.log(u).clamp_min(lowest), torch.log1p(-u).clamp_min(lowest)


def bernstein_polynomial(u: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """``(h(u), h'(u))`` of the Bernstein polynomial with coefficients ``theta`` ``[..., M + 1]`` at ``u`` ``[...]``:
    ``h = sum_k theta_k b_{k,M}(u)`` and ``h' = M sum_{k<M} (theta_{k+1} - theta_k) b_{k,M-1}(u)``; the logs of ``u``
    and ``1 - u`` are taken once for both bases."""
    degree = theta.shape[-1] - 1
    log_u, log_v = _logs(u)
    value = (torch.exp(_log_basis(log_u, log_v, degree)) * theta).sum(-1)
    slope = degree * (torch.exp(_log_basis(log_u, log_v, degree - 1)) * theta.diff(dim=-1)).sum(-1)
    return value, slope


def monotone_coefficients(raw: Tensor) -> Tensor:
    """``theta_0 = raw_0``, ``theta_k = theta_{k-1} + softplus(raw_k)``: strictly increasing along the last axis."""
    return torch.cat([raw[..., :1], raw[..., :1] + torch.cumsum(F.softplus(raw[..., 1:]), dim=-1)], dim=-1)


def initial_raw_coefficients(degree: int, support: tuple[float, float], dtype: torch.dtype | None = None) -> Tensor:
    """Raw coefficients ``[M + 1]`` whose :func:`monotone_coefficients` are evenly spaced over ``support`` (in
    ``dtype``, torch's default if ``None``)."""
    if not is_int(degree) or degree < 1:
        raise ValueError(f"degree must be an int >= 1; got {degree!r}")
    valid = isinstance(support, Sequence) and len(support) == 2 and all(is_finite(end) for end in support)
    if not (valid and support[1] > support[0] and math.isfinite(support[1] - support[0])):
        raise ValueError(f"support must be two finite numbers (w_min, w_max) with w_max > w_min; got {support!r}")
    low, high = support
    step = torch.tensor((high - low) / degree, dtype=dtype)
    return torch.cat([torch.tensor([low], dtype=dtype), inverse_softplus(step).repeat(degree)])


def add_affine_parameters(
    flow: nn.Module, shape: tuple[int, ...], final_affine: bool, freeze_affine: bool, dtype: torch.dtype | None = None
) -> None:
    """Give ``flow`` the chain's affine maps of ``shape`` in ``dtype``: ``f1``'s raw ``a = b = 0`` (buffers when
    ``freeze_affine``) and, with ``final_affine``, ``f3``'s ``alpha = softplus^-1(1)`` and ``beta = 0``."""
    if freeze_affine:
        flow.register_buffer("a", torch.zeros(shape, dtype=dtype))
        flow.register_buffer("b", torch.zeros(shape, dtype=dtype))
    else:
        flow.a = nn.Parameter(torch.zeros(shape, dtype=dtype))
        flow.b = nn.Parameter(torch.zeros(shape, dtype=dtype))
    if final_affine:
        flow.alpha = nn.Parameter(inverse_softplus(torch.ones(shape, dtype=dtype)))
        flow.beta = nn.Parameter(torch.zeros(shape, dtype=dtype))


class BernsteinFlow(nn.Module):
    """Independent Bernstein-flow chains for a tensor of ``shape`` parameters (mean field), degree ``M``.

    Args:
        shape: shape of the parameter tensor the flow draws.
        degree: ``M`` (``M + 1`` coefficients per parameter).
        support: ``(w_min, w_max)``: the coefficients start evenly spaced over it (``h``'s range).
        final_affine: include ``f3``.
        freeze_affine: keep ``a`` and ``b`` at their initial values (buffers, not parameters), as the released
            multivariate script does.
        dtype: of the parameters (torch's default if ``None``).

    Raw ``a = b = 0`` and ``alpha = softplus^-1(1)``, ``beta = 0`` at initialisation, as in the reference.
    """

    # set by add_affine_parameters: parameters, or buffers when frozen; alpha and beta only with final_affine
    a: Tensor
    b: Tensor
    alpha: Tensor
    beta: Tensor

    def __init__(
        self, shape: tuple[int, ...] | torch.Size, degree: int = 10, support: tuple[float, float] = (-10.0, 10.0),
        final_affine: bool = True,
        freeze_affine: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        raw = initial_raw_coefficients(degree, support, dtype)
        shape = tuple(shape)
        self.degree, self.final_affine = degree, final_affine
        add_affine_parameters(self, shape, final_affine, freeze_affine, dtype)
        self.raw_coefficients = nn.Parameter(raw.expand(*shape, degree + 1).clone())

    def coefficients(self) -> Tensor:
        """The increasing coefficients ``theta`` ``[*shape, M + 1]``."""
        return monotone_coefficients(self.raw_coefficients)

    def polynomial(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(h(u), h'(u))`` for ``u`` of shape ``[..., *shape]``."""
        return bernstein_polynomial(u, self.coefficients())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(w, log q(w))`` for base draws ``z`` of shape ``[..., *shape]`` (elementwise log-densities)."""
        shape = tuple(self.a.shape)
        if z.ndim < len(shape) or tuple(z.shape[z.ndim - len(shape):]) != shape:  # would broadcast silently
            raise ValueError(f"z must have shape [..., {', '.join(map(str, shape))}]; got {tuple(z.shape)}")
        scale = F.softplus(self.a)
        pre = scale * z + self.b
        u = torch.sigmoid(pre).clamp(_U_CLIP, 1 - _U_CLIP)
        h, slope = self.polynomial(u)
        log_q = -0.5 * z.square() - _LOG_SQRT_2PI - torch.log(scale) - F.logsigmoid(pre) - F.logsigmoid(-pre)
        log_q = log_q - torch.log(slope)
        if not self.final_affine:
            return h, log_q
        outer = F.softplus(self.alpha)
        return outer * h - self.beta, log_q - torch.log(outer)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``num_samples`` draws ``[S, *shape]`` and their log-densities (reparameterised)."""
        z = torch.randn(num_samples, *self.a.shape, generator=generator, dtype=self.a.dtype, device=self.a.device)
        return self(z)
