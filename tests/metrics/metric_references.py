"""Explicit numpy / scipy / sklearn computations the metrics are tested against (float64 throughout)."""

from __future__ import annotations

import numpy as np
from scipy import integrate, optimize
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.metrics import roc_auc_score


def bma_probs(logits: np.ndarray) -> np.ndarray:
    """``1/S sum_s softmax(z_s)`` for logits ``[S, B, C]``."""
    return np.exp(logits - logsumexp(logits, axis=-1, keepdims=True)).mean(0)


def bma_log_probs(logits: np.ndarray) -> np.ndarray:
    """``log 1/S sum_s softmax(z_s)`` in log space (finite even where a probability underflows to 0)."""
    return logsumexp(logits - logsumexp(logits, axis=-1, keepdims=True), axis=0) - np.log(logits.shape[0])


def entropy(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(probs > 0, probs * np.log(probs), 0.0).sum(-1)


def classification(logits: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    probs = bma_probs(logits)
    per_sample = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    correct = (predicted == y).astype(float)
    onehot = np.eye(probs.shape[-1])[y]
    total_entropy = entropy(probs)
    return {
        "acc": correct.mean(),
        "nll": -bma_log_probs(logits)[np.arange(len(y)), y].mean(),
        "brier": ((probs - onehot) ** 2).sum(-1).mean(),
        "ece": equal_width_ece(confidence, correct, n_bins)[0],
        "mce": equal_width_ece(confidence, correct, n_bins)[1],
        "aece": equal_mass_ece(confidence, correct, n_bins),
        "entropy": total_entropy.mean(),
        "mi": (total_entropy - entropy(per_sample).mean(0)).mean(),
    }


def equal_width_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, float]:
    """(ECE, MCE) over bins [k/n, (k+1)/n), the last one closed at 1, by an explicit loop."""
    ece, mce = 0.0, 0.0
    for k in range(n_bins):
        low, high = k / n_bins, (k + 1) / n_bins
        inside = (confidence >= low) & ((confidence < high) | ((k == n_bins - 1) & (confidence <= high)))
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            ece += inside.sum() / len(confidence) * gap
            mce = max(mce, gap)
    return ece, mce


def equal_mass_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """ECE over ``np.array_split`` of the stably sorted examples into ``n_bins`` groups."""
    order = np.argsort(confidence, kind="stable")
    total = 0.0
    for members in np.array_split(order, n_bins):
        if len(members):
            total += len(members) * abs(correct[members].mean() - confidence[members].mean())
    return total / len(confidence)


def ood_scores(logits: np.ndarray, score: str) -> np.ndarray:
    probs = bma_probs(logits)
    num_classes = logits.shape[-1]
    if score == "max_prob":
        return 1.0 - probs.max(-1)
    per_sample = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    if score == "max_class_variance":
        return 4 * per_sample.var(0).max(-1)
    value = entropy(probs) if score == "entropy" else entropy(probs) - entropy(per_sample).mean(0)
    return value / np.log(num_classes)


def auroc(score_id: np.ndarray, score_ood: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(score_id)), np.ones(len(score_ood))]
    return roc_auc_score(labels, np.r_[score_id, score_ood])


def fpr_at_95_tpr(score_id: np.ndarray, score_ood: np.ndarray) -> float:
    """Accept ``score <= t`` with t the smallest score keeping >= 95% of in-distribution examples."""
    required = int(np.ceil(0.95 * len(score_id) - 1e-9))
    threshold = np.sort(score_id)[required - 1]
    assert (score_id <= threshold).sum() >= required
    return float((score_ood <= threshold).mean())


def mixture_cdf(z: float, mean: np.ndarray, std: np.ndarray) -> float:
    return float(norm.cdf(z, mean, std).mean())


def crps_by_integration(y: float, mean: np.ndarray, std: np.ndarray) -> float:
    """``int (F(z) - [z >= y])^2 dz`` by adaptive quadrature, split at y (where the integrand jumps)."""
    low, high = min(mean.min() - 12 * std.max(), y), max(mean.max() + 12 * std.max(), y)
    left = integrate.quad(lambda z: mixture_cdf(z, mean, std) ** 2, low, y, epsabs=1e-12, epsrel=1e-12, limit=200)[0]
    right = integrate.quad(
        lambda z: (1.0 - mixture_cdf(z, mean, std)) ** 2, y, high, epsabs=1e-12, epsrel=1e-12, limit=200
    )[0]
    return left + right


def mixture_quantile(q: float, mean: np.ndarray, std: np.ndarray) -> float:
    low, high = (mean - 12 * std).min(), (mean + 12 * std).max()
    return optimize.brentq(lambda z: mixture_cdf(z, mean, std) - q, low, high, xtol=1e-14, rtol=1e-14)


def mixture_log_density(y: np.ndarray, mean: np.ndarray, var: np.ndarray) -> float:
    """``log 1/S sum_s prod_d N(y_d; mean_sd, var_sd)`` for one example, ``mean``/``var`` ``[S, D]``."""
    return float(np.log(np.prod(norm.pdf(y, mean, np.sqrt(var)), axis=-1).mean()))
