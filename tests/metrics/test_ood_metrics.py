"""OOD AUROC and FPR@95%TPR against sklearn and an explicit threshold computation."""

from __future__ import annotations

import pytest
import torch
from metric_references import auroc, fpr_at_95_tpr, ood_scores

from lightning_bayes.metrics import FPR95, OODAUROC, ood_metrics, ood_score
from lightning_bayes.predictive import CategoricalPredictive


def id_logits(seed: int, batch: int) -> torch.Tensor:
    """Logit samples ``[3, batch, 4]`` that mostly agree, with confidence varying across examples."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.rand(1, batch, 1, generator=generator, dtype=torch.float64) * 6.0
    shared = torch.randn(1, batch, 4, generator=generator, dtype=torch.float64) * spread
    return shared + 1.5 * torch.randn(3, batch, 4, generator=generator, dtype=torch.float64)


def ood_logits(seed: int, batch: int) -> torch.Tensor:
    """Logit samples ``[3, batch, 4]`` that disagree (each sample confident about its own class)."""
    generator = torch.Generator().manual_seed(seed)
    return 2.5 * torch.randn(3, batch, 4, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("score", ["entropy", "mutual_information", "max_prob", "max_class_variance"])
@pytest.mark.parametrize("num_id", [100, 137])  # 0.95 * 100 = 95 exactly; 0.95 * 137 = 130.15 -> 131
def test_auroc_and_fpr95_equal_explicit_computations(score: str, num_id: int) -> None:
    in_dist, out_dist = id_logits(0, num_id), ood_logits(1, 60)
    score_id, score_ood = ood_scores(in_dist.numpy(), score), ood_scores(out_dist.numpy(), score)
    collection = ood_metrics("test/ood/", score=score).set_dtype(torch.float64)
    for chunk in torch.arange(num_id).split(40):
        collection.update(CategoricalPredictive(in_dist[:, chunk]), False)
    collection.update(CategoricalPredictive(out_dist), torch.ones(60, dtype=torch.bool))
    values = collection.compute()
    expected_auroc, expected_fpr = auroc(score_id, score_ood), fpr_at_95_tpr(score_id, score_ood)
    assert 0.6 < expected_auroc < 0.98 and 0.0 < expected_fpr < 1.0  # neither class separates perfectly
    # torchmetrics integrates the ROC curve in float32: agreement to float32 round-off
    assert values["test/ood/auroc"].item() == pytest.approx(expected_auroc, rel=1e-6)
    assert values["test/ood/fpr95"].item() == pytest.approx(expected_fpr, abs=1e-12)


def test_fpr95_with_ties_and_a_hand_count() -> None:
    """20 in-distribution examples: 19 must be accepted, so the threshold is the 19th smallest ID score.

    With C = 2 and max probability 0.5 + 0.5 c, the score 1 - max p is 0.5 (1 - c). ID scores:
    0, 0.025, ..., 0.45 (19 values) and 0.5, so the threshold is 0.45. OOD scores 0.15 and 0.25 (equal
    to ID scores), 0.475 and 0.5: two of four are accepted.
    """
    metric = FPR95(score="max_prob").set_dtype(torch.float64)
    id_conf = torch.tensor([1.0 - 0.05 * k for k in range(19)] + [0.0], dtype=torch.float64)
    ood_conf = torch.tensor([0.7, 0.5, 0.05, 0.0], dtype=torch.float64)

    def two_class(confidence: torch.Tensor) -> CategoricalPredictive:
        top = 0.5 + 0.5 * confidence
        return CategoricalPredictive(torch.stack([top, 1 - top], -1).log().unsqueeze(0))

    metric.update(two_class(id_conf), False)
    metric.update(two_class(ood_conf), True)
    assert metric.compute().item() == pytest.approx(0.5, abs=1e-12)


def test_scores_lie_in_unit_interval_and_rank_as_defined() -> None:
    flat = CategoricalPredictive(torch.zeros(2, 1, 4))
    sharp = CategoricalPredictive(torch.tensor([[[50.0, 0, 0, 0]], [[0, 0, 0, 50.0]]]))
    assert ood_score(flat, "entropy").item() == pytest.approx(1.0, rel=1e-6)
    assert ood_score(flat, "mutual_information").item() == pytest.approx(0.0, abs=1e-6)
    # two confident members that disagree: BMA is 50/50 over two classes -> MI = log 2 / log 4 = 1/2
    assert ood_score(sharp, "mutual_information").item() == pytest.approx(0.5, rel=1e-5)
    assert ood_score(sharp, "max_prob").item() == pytest.approx(0.5, rel=1e-6)
    # class 1's probability is 1 then 0: variance 1/4, the largest a probability has -> 1
    assert ood_score(sharp, "max_class_variance").item() == pytest.approx(1.0, rel=1e-6)
    assert ood_score(flat, "max_class_variance").item() == 0.0


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="score must be one of"):
        OODAUROC(score="energy")
    metric = OODAUROC()
    with pytest.raises(ValueError, match=r"is_ood=bool or a bool tensor \[B\]=\(3,\)"):
        metric.update(CategoricalPredictive(torch.zeros(1, 3, 2)), torch.ones(4, dtype=torch.bool))
    metric.update(CategoricalPredictive(torch.zeros(1, 3, 2)), False)
    with pytest.raises(
        ValueError, match="needs both in-distribution and OOD examples; got 3 in-distribution and 0 OOD"
    ):
        metric.compute()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(
        ValueError, match="FPR95.compute needs at least one example"
    ):
        FPR95().compute()


def test_calling_an_ood_metric_accumulates_without_a_batch_value() -> None:
    """``metric(predictive, False)`` (torchmetrics' forward) computed a one-batch AUROC, which has one class only,
    and raised; it now only accumulates."""
    in_dist, out_dist = id_logits(0, 40), ood_logits(1, 20)
    called, updated = OODAUROC().set_dtype(torch.float64), OODAUROC().set_dtype(torch.float64)
    for metric in (called, updated):
        step = metric if metric is called else metric.update
        assert step(CategoricalPredictive(in_dist), False) is None
        step(CategoricalPredictive(out_dist), True)
    assert called.compute().item() == updated.compute().item()


def test_max_prob_keeps_its_resolution_for_confident_float32_predictions() -> None:
    """Logit margins 17 to 30: ``1 - max p`` is 1e-13 to 4e-8, which ``log p_top`` (exactly 0 in float32) lost, so every
    such example scored 0 and AUROC saw ties; the other classes' mass keeps it (float64 as the reference, 1e-5)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 400, 10, generator=generator, dtype=torch.float64)
    logits[..., 0] += torch.linspace(17.0, 30.0, 400, dtype=torch.float64)
    expected = torch.softmax(logits[0], -1)[:, 1:].sum(-1)  # 1 - p_top (class 0 on top), without the cancellation
    scores = ood_score(CategoricalPredictive(logits.float()), "max_prob")
    assert (scores > 0).all() and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=0)
    assert len(set(scores.tolist())) == 400  # no ties: the ranking of the confident examples survives
