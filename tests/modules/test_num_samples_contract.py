"""``predictive(x, num_samples)`` across methods: a bad count is refused by name everywhere (also where S is fixed at
1), and an ensemble's S is the members asked for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bayes.models import MLP
from lightning_bayes.modules import MAP, DeepEnsemble, IVONModule, VariationalInference, VBLLRegressor


def _features() -> nn.Module:
    backbone = nn.Linear(4, 8)
    backbone.num_features = 8
    return backbone


POINT_PREDICTIVES = {
    "MAP": lambda: MAP(MLP(4, 3)),
    "VBLLRegressor": lambda: VBLLRegressor(_features(), dataset_size=10),
    "VariationalInference(mean_prediction)": lambda: VariationalInference(MLP(4, 3), mean_prediction=True),
    "IVONModule(mean_prediction)": lambda: IVONModule(MLP(4, 3), dataset_size=10, mean_prediction=True),
}


@pytest.mark.parametrize("build", POINT_PREDICTIVES.values(), ids=POINT_PREDICTIVES.keys())
def test_a_point_predictive_has_one_sample_and_refuses_a_bad_count(build) -> None:
    torch.manual_seed(0)
    module, x = build(), torch.randn(5, 4)
    assert module.predictive(x, num_samples=7).num_samples == 1
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match=rf"^num_samples must be a positive integer; got {bad!r}$"):
            module.predictive(x, num_samples=bad)


def test_an_ensemble_predicts_with_its_first_members_and_refuses_more_than_it_has() -> None:
    torch.manual_seed(0)
    ensemble, x = DeepEnsemble(MLP(4, 3), num_members=3), torch.randn(5, 4)
    with torch.no_grad():
        members = torch.stack([member(x) for member in ensemble.members])
        assert ensemble.predictive(x).logits.shape[0] == 3
        torch.testing.assert_close(ensemble.predictive(x, num_samples=2).logits, members[:2])
    with pytest.raises(ValueError, match=r"^num_samples=4 exceeds the ensemble's 3 members$"):
        ensemble.predictive(x, num_samples=4)
    with pytest.raises(ValueError, match=r"^num_samples must be a positive integer; got 0$"):
        ensemble.predictive(x, num_samples=0)
