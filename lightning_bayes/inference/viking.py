"""The VIKING variational family ``q(theta) = N(theta_hat, sigma_ker^2 P + sigma_im^2 (I - P))``.

``P`` projects onto the kernel of the training constraint Jacobian; ``sigma_ker = alpha^{-1/2}`` is tied to
the prior ``N(0, alpha^{-1} I)`` so kernel directions (which do not change the fit) keep their prior
variance, and ``sigma_im`` (small: a tight fit) scales the image directions. One noise vector drives both
parts: ``theta = theta_hat + sigma_ker k + sigma_im (e - k)`` with ``k = P e``.

With ``R = tr P`` the KL to the prior has the closed form (``Sigma`` has eigenvalue ``1/alpha`` R times and
``sigma_im^2`` ``P - R`` times)

    KL(q || p) = 1/2 [(P - R)(alpha sigma_im^2 - 1 - log(alpha sigma_im^2)) + alpha ||theta_hat||^2],

where only ``P - R`` (the image dimension) is needed: Hutchinson's ``e^T (e - k)`` estimates it with
variance ``2 (P - R)`` from the same noise (its gradient is stopped).

Reference: Fadel, Roy, Kraemer, Zainchkovskyy, Syrota, Valverde Mahou, Ek & Hauberg, "VIKING: Deep
variational inference with stochastic projections", NeurIPS 2025 (arXiv 2510.23684), sections 3-4.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def image_dimension(noise: Tensor, kernel: Tensor) -> Tensor:
    """Hutchinson estimate of ``P - tr P = e^T (I - P) e`` per sample (``[S, P]`` -> ``[S]``), no gradient."""
    return (noise * (noise - kernel)).sum(-1).detach()


def mix_noise(carried: Tensor, fresh: Tensor, gamma: float) -> Tensor:
    """``sqrt(gamma) k + sqrt(1 - gamma) eta``: the carried kernel noise mixed with a fresh draw, as in the
    reference. For ``k = P e`` of unit noise the covariance is ``gamma P + (1 - gamma) I``: unit variance on the
    kernel of the projection that made ``k``, ``1 - gamma`` on its image, so Hutchinson's image dimension and the
    image part of the sample run low where consecutive batches' kernels differ."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1]; got {gamma}")
    return math.sqrt(gamma) * carried + math.sqrt(1 - gamma) * fresh


class KernelImageGaussian(nn.Module):
    """The scales of the family, ``log alpha`` and ``log sigma_im``, as trainable parameters.

    Args:
        log_alpha: initial log prior precision (the reference's 4 gives ``sigma_ker = e^-2 = 0.135``).
        log_sigma_image: initial log image scale (reference: -2).
    """

    def __init__(self, log_alpha: float = 4.0, log_sigma_image: float = -2.0) -> None:
        super().__init__()
        for name, value in (("log_alpha", log_alpha), ("log_sigma_image", log_sigma_image)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float; got {value}")
        self.log_alpha = nn.Parameter(torch.tensor(float(log_alpha)))
        self.log_sigma_image = nn.Parameter(torch.tensor(float(log_sigma_image)))

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp()

    @property
    def sigma_kernel(self) -> Tensor:
        return (-0.5 * self.log_alpha).exp()

    @property
    def sigma_image(self) -> Tensor:
        return self.log_sigma_image.exp()

    def sample(self, theta_hat: Tensor, noise: Tensor, kernel: Tensor) -> Tensor:
        """``theta_hat + sigma_ker k + sigma_im (e - k)`` for noise ``e`` and its kernel part ``k``, ``[S, P]``."""
        return theta_hat + self.sigma_kernel * kernel + self.sigma_image * (noise - kernel)

    def kl(self, theta_hat: Tensor, image_dim: Tensor) -> Tensor:
        """Closed-form ``KL(q || N(0, alpha^-1 I))`` given the image dimension ``P - R`` (a number or estimate)."""
        log_ratio = self.log_alpha + 2 * self.log_sigma_image  # log(alpha sigma_im^2)
        image_term = image_dim * (log_ratio.exp() - 1 - log_ratio)
        return 0.5 * (image_term + self.alpha * theta_hat.pow(2).sum())
