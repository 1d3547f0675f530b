"""BatchNorm refresh: the running mean equals the exact data-set mean of each BatchNorm layer's inputs (equal
batches, 1e-6), for (x, y) batches and dict inputs; batch statistics leave the running statistics untouched."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_bayes.inference.batchnorm import (
    batch_statistics,
    refresh_batchnorm,
    running_statistics,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5))


def data() -> Tensor:
    return 3.0 + 2.0 * torch.randn(60, 4, generator=torch.Generator().manual_seed(1))


def exact_input_means(model: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    model.eval()
    with torch.no_grad():
        first = model[0](x)
        second = model[3](torch.relu((first - first.mean(0)) / torch.sqrt(first.var(0, unbiased=False) + 1e-5)
                                     * model[1].weight + model[1].bias))
    return first.mean(0), second.mean(0)


def test_running_means_equal_the_data_set_means_of_the_layer_inputs() -> None:
    """update_bn averages equal-size batches, and each batch normalises with its own statistics: so the second
    layer's input depends on the batch; one batch of all 60 points makes both means exact."""
    model, x = make_model(), data()
    y = torch.zeros(60, dtype=torch.long)
    refresh_batchnorm(model, [(x, y)])
    assert model.training  # mode restored
    first, second = exact_input_means(model, x)
    torch.testing.assert_close(model[1].running_mean, first, rtol=0, atol=1e-6)
    torch.testing.assert_close(model[4].running_mean, second, rtol=0, atol=1e-6)


def test_equal_batches_average_to_the_first_layers_data_set_mean() -> None:
    model, x = make_model(), data()
    refresh_batchnorm(model, [(x[i : i + 15], None) for i in range(0, 60, 15)])
    first, _ = exact_input_means(model, x)
    torch.testing.assert_close(model[1].running_mean, first, rtol=0, atol=1e-6)


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.net(x["features"])


def test_dict_inputs_reach_the_model_as_they_are() -> None:
    model, x = DictInput(), data()
    refresh_batchnorm(model, [({"features": x}, torch.zeros(60))], device="cpu")
    first, _ = exact_input_means(model.net, x)
    torch.testing.assert_close(model.net[1].running_mean, first, rtol=0, atol=1e-6)


def test_a_model_without_batchnorm_is_left_alone_without_a_pass() -> None:
    def refuse():
        raise AssertionError("no pass over the data expected")
        yield  # pragma: no cover

    refresh_batchnorm(nn.Linear(3, 2), refuse())


def test_batch_statistics_normalise_by_the_batch_and_keep_running_statistics() -> None:
    model, x = make_model(), data()
    model.eval()
    before = {n: b.clone() for n, b in model.state_dict().items()}
    with batch_statistics(model), torch.no_grad():
        out = model[1](model[0](x))
        torch.testing.assert_close(out.mean(0), model[1].bias.detach(), rtol=0, atol=1e-5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not model[1].training and model[1].momentum == 0.1
    assert set(running_statistics(model)) == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}
