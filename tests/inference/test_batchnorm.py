"""BatchNorm refresh: the running mean equals the exact data-set mean of each BatchNorm layer's inputs (1e-6, batches
of any sizes), for (x, y) batches and dict inputs; batch statistics leave the running statistics untouched."""

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
    """Each batch normalises with its own statistics, so the second layer's input depends on the batch; one batch
    of all 60 points makes both means exact."""
    model, x = make_model(), data()
    y = torch.zeros(60, dtype=torch.long)
    refresh_batchnorm(model, [(x, y)])
    assert model.training  # mode restored
    first, second = exact_input_means(model, x)
    torch.testing.assert_close(model[1].running_mean, first, rtol=0, atol=1e-6)
    torch.testing.assert_close(model[4].running_mean, second, rtol=0, atol=1e-6)


def test_float32_batches_reach_a_float64_model_in_float64() -> None:
    """The batches of a network trained under ``precision="64-true"`` are float32 in the loader (Lightning casts them
    for each step); the refresh casts them to the parameters' dtype ("mat1 and mat2 must have the same dtype")."""
    model, x = make_model().double(), data().double()
    refresh_batchnorm(model, [(x.float(), torch.zeros(60, dtype=torch.long))])
    first, second = exact_input_means(model, x.float().double())
    torch.testing.assert_close(model[1].running_mean, first, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[4].running_mean, second, rtol=0, atol=1e-12)


def test_integer_inputs_keep_their_dtype() -> None:
    """Token ids reach an embedding as ids: only floating inputs take the parameters' dtype."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.BatchNorm1d(12)).double()
    ids = torch.randint(0, 10, (20, 3), generator=torch.Generator().manual_seed(0))
    refresh_batchnorm(model, [ids])
    with torch.no_grad():
        expected = model[1](model[0](ids)).mean(0)
    torch.testing.assert_close(model[2].running_mean, expected, rtol=0, atol=1e-12)


def test_unequal_batches_average_over_examples_not_batches() -> None:
    """Momentum ``b / (n + b)`` (the spec's and drbayes' ``bn_update``): 50 examples then 10 give the 60-example mean
    (``update_bn``'s equal-weight average of batch means was 0.5 here against the data-set mean 1/6)."""
    model = nn.Sequential(nn.BatchNorm1d(1))
    x = torch.cat([torch.zeros(50, 1), torch.ones(10, 1)])
    refresh_batchnorm(model, [x[:50], x[50:]])
    torch.testing.assert_close(model[0].running_mean, torch.tensor([1 / 6]), rtol=0, atol=1e-7)
    # the running variance: the examples-weighted average of the batches' unbiased variances (0 and 0 here)
    torch.testing.assert_close(model[0].running_var, torch.tensor([0.0]), rtol=0, atol=1e-7)
    model, x = make_model(), data()
    refresh_batchnorm(model, [(x[:37], None), (x[37:], None)])
    first, _ = exact_input_means(model, x)
    torch.testing.assert_close(model[1].running_mean, first, rtol=0, atol=1e-6)


def test_a_layer_called_twice_per_forward_averages_every_call() -> None:
    """``bn(x) + bn(x + 10)`` on zeros: the layer's inputs average 5 (one momentum per forward gave the second call
    the last word: 7.5)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(1)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(x) + self.bn(x + 10)

    model = Twice()
    refresh_batchnorm(model, [torch.zeros(20, 1), torch.zeros(12, 1)])
    torch.testing.assert_close(model.bn.running_mean, torch.tensor([5.0]), rtol=0, atol=1e-6)


def test_modes_and_momenta_come_back_and_dropout_runs_in_the_pass() -> None:
    """As ``update_bn`` and drbayes: the whole model in training mode for the pass, each module's mode restored."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.BatchNorm1d(6, momentum=0.3))
    model.eval()
    model[1].train()
    seen_modes = []
    model[1].register_forward_hook(lambda module, args, out: seen_modes.append(module.training))
    refresh_batchnorm(model, [data()[:20], data()[20:]])
    assert seen_modes == [True, True]
    assert [m.training for m in model] == [False, True, False] and model[2].momentum == 0.3
    assert int(model[2].num_batches_tracked) == 2


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
