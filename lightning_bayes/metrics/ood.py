"""Out-of-distribution detection from a predictive uncertainty score.

``update(predictive, is_ood)`` takes a batch's :class:`CategoricalPredictive` and whether its examples
are OOD (one bool for the whole batch or a bool tensor ``[B]``). The OOD-ness score is, by ``score``:

* ``"entropy"``: ``H[p(y|x)] / log C``,
* ``"mutual_information"``: ``(H[p(y|x)] - E_s H[p_s(y|x)]) / log C``,
* ``"max_prob"``: ``1 - max_c p(c|x)``,
* ``"max_class_variance"``: ``4 max_c Var_s[p_s(c|x)]``, the spread of the sample probabilities (the OOD score of
  the null-space Laplace and VIKING papers; 0 for a single-sample predictive).

Dividing by ``log C`` (the largest entropy), and the variance of a probability by its largest value 1/4, keeps
every score in ``[0, 1]``, so torchmetrics uses it as
a probability-like score as it is and does not squash it with a sigmoid; the ranking is unchanged.

* ``OODAUROC``: area under the ROC curve of the score separating OOD (positive) from in-distribution
  examples (Hendrycks & Gimpel, 2017).
* ``FPR95``: with in-distribution as the positive class, accept as in-distribution every example whose
  score is at most the threshold that keeps 95% of the in-distribution examples; report the fraction of
  OOD examples accepted (Liang et al., 2018).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_roc

from ..predictive import CategoricalPredictive
from ._inputs import categorical, pooled

OODScore = Literal["entropy", "mutual_information", "max_prob", "max_class_variance"]
OOD_SCORES: tuple[str, ...] = ("entropy", "mutual_information", "max_prob", "max_class_variance")


def _rest_of_top(log_probs: Tensor) -> Tensor:
    """``1 - max_c p_c`` as the mass of the other classes, ``sum_{c != top} p_c``: accurate where the top class's
    log-probability rounds to 0 (float32 beyond a logit margin of about 17, where ``-expm1(log p_top)`` gave every
    confident example a score of exactly 0 and AUROC ties)."""
    others = log_probs.scatter(-1, log_probs.argmax(-1, keepdim=True), float("-inf"))
    return torch.logsumexp(others, -1).exp().clamp(0.0, 1.0)


def ood_score(predictive: CategoricalPredictive, score: OODScore = "entropy") -> Tensor:
    """Per-example OOD-ness in ``[0, 1]``, ``[B]``: higher means more likely out of distribution."""
    predictive = categorical(predictive, "ood_score")
    if score not in OOD_SCORES:
        raise ValueError(f"score must be one of {OOD_SCORES}; got {score!r}")
    num_classes = predictive.logits.shape[-1]
    if score == "max_prob":
        return _rest_of_top(predictive.log_probs)
    if score == "max_class_variance":
        variance = predictive.log_probs_per_sample.exp().var(0, correction=0)  # [B, C]
        return (4 * variance.max(-1).values).clamp(0.0, 1.0)
    if num_classes < 2:
        raise ValueError(f"score={score!r} needs at least 2 classes to normalise by log C; got C={num_classes}")
    value = predictive.entropy if score == "entropy" else predictive.mutual_information
    return (value / math.log(num_classes)).clamp(0.0, 1.0)


class _OODDetection(Metric):
    """Keeps every example's OOD score and OOD flag as ``cat`` states.

    Args:
        score: the OOD-ness score, one of :data:`OOD_SCORES` (see :func:`ood_score`).
        kwargs: torchmetrics' ``Metric`` options.
    """

    is_differentiable = False
    full_state_update = False
    scores: list[Tensor]
    is_ood: list[Tensor]

    def __init__(self, score: OODScore = "entropy", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if score not in OOD_SCORES:
            raise ValueError(f"score must be one of {OOD_SCORES}; got {score!r}")
        self.score = score
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("is_ood", [], dist_reduce_fx="cat")

    def forward(self, predictive: CategoricalPredictive, is_ood: bool | Tensor) -> None:
        """Accumulate only: a batch-level value needs both kinds of examples, which one batch rarely has (Metric's
        ``forward`` computed one and raised)."""
        self.update(predictive, is_ood)

    def update(self, predictive: CategoricalPredictive, is_ood: bool | Tensor) -> None:
        scores = ood_score(categorical(predictive, type(self).__name__), self.score)
        if isinstance(is_ood, bool):
            flags = torch.full_like(scores, float(is_ood), dtype=torch.long)
        elif isinstance(is_ood, Tensor) and is_ood.shape == scores.shape and not is_ood.is_floating_point():
            flags = is_ood.to(device=scores.device, dtype=torch.long)
            torch._assert_async(((flags == 0) | (flags == 1)).all(), f"{type(self).__name__}.update expects is_ood "
                                "of 0 (in-distribution) and 1 (OOD) only")
        else:
            got = (
                f"tensor of shape {tuple(is_ood.shape)} and dtype {is_ood.dtype}"
                if isinstance(is_ood, Tensor)
                else repr(is_ood)
            )
            raise ValueError(
                f"{type(self).__name__}.update expects is_ood=bool or a bool tensor [B]=({len(scores)},); got {got}"
            )
        self.scores.append(scores)
        self.is_ood.append(flags)

    def _pooled(self) -> tuple[Tensor, Tensor]:
        scores, is_ood = pooled(self.scores, type(self).__name__), pooled(self.is_ood, type(self).__name__)
        num_ood = int(is_ood.sum())
        if num_ood == 0 or num_ood == is_ood.numel():
            raise ValueError(
                f"{type(self).__name__}.compute needs both in-distribution and OOD examples; "
                f"got {is_ood.numel() - num_ood} in-distribution and {num_ood} OOD"
            )
        return scores, is_ood


class OODAUROC(_OODDetection):
    """AUROC of the OOD score for telling OOD (positive) from in-distribution examples."""

    higher_is_better = True

    def compute(self) -> Tensor:
        scores, is_ood = self._pooled()
        return binary_auroc(scores, is_ood)


class FPR95(_OODDetection):
    """Fraction of OOD examples accepted at the threshold that keeps 95% of in-distribution examples.

    With OOD as the positive class, torchmetrics' ROC at threshold ``t`` flags ``score >= t``; the
    accepted (in-distribution-looking) examples are the rest, so the in-distribution acceptance is
    ``1 - fpr`` and the OOD acceptance ``1 - tpr``. Counts are recovered exactly from the (float32)
    rates, so the comparison with ``ceil(0.95 N_id)`` and the returned fraction carry no round-off.
    """

    higher_is_better = False

    def compute(self) -> Tensor:
        scores, is_ood = self._pooled()
        fpr, tpr, _ = binary_roc(scores, is_ood)
        num_ood = int(is_ood.sum())
        num_id = is_ood.numel() - num_ood
        required = -(-95 * num_id // 100)  # ceil(0.95 N_id) in integer arithmetic
        id_accepted = num_id - torch.round(fpr.double() * num_id)
        ood_accepted = num_ood - torch.round(tpr.double() * num_ood)
        return (ood_accepted[id_accepted >= required].min() / num_ood).to(scores.dtype)
