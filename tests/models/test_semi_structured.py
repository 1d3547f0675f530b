"""SemiStructured: the deep part sees the other columns, the linear part exactly the chosen ones."""

import pytest
import torch
from torch import nn

from lightning_bayes.models import SemiStructured


def test_output_is_the_deep_part_on_the_rest_plus_the_linear_part_on_the_chosen_columns():
    torch.manual_seed(0)
    deep = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model = SemiStructured(in_features=5, structured_features=[3, 1], deep=deep, out_features=2)
    x = torch.randn(6, 5)
    expected = deep(x[:, [0, 2, 4]]) + x[:, [3, 1]] @ model.linear.weight.T
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert model.linear.bias is None and model.structured_features == [3, 1]


@pytest.mark.parametrize("chosen", [[], [1, 1], [5], [-1]])
def test_bad_columns_are_named(chosen):
    with pytest.raises(ValueError, match="structured_features"):
        SemiStructured(in_features=5, structured_features=chosen, deep=nn.Identity())


def test_inputs_of_another_width_are_refused():
    """Extra columns were ignored silently (index_select takes the columns it names)."""
    model = SemiStructured(5, [0], nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"SemiStructured expects inputs \[B, in_features=5\] \(float\); got shape "
                                         r"\(3, 6\)"):
        model(torch.zeros(3, 6))
    with pytest.raises(ValueError, match=r"expects inputs \[B, in_features=5\] \(float\); got shape \(2, 5, 1\)"):
        model(torch.zeros(2, 5, 1))
