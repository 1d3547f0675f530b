"""MLP and LeNet-5: shapes, literature parameter counts, feature-extractor mode, dropout placement."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_bayes.models import MLP, LeNet5


def test_lenet_has_the_literature_parameter_count():
    conv = (6 * 1 * 25 + 6) + (16 * 6 * 25 + 16)
    dense = (256 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert sum(p.numel() for p in LeNet5(num_classes=10).parameters()) == conv + dense == 44426
    assert sum(p.numel() for p in LeNet5(num_classes=10, in_channels=3).parameters()) == 44426 + 2 * 6 * 25


def test_lenet_feature_mode_gives_the_penultimate_activations():
    torch.manual_seed(0)
    classifier, extractor = LeNet5(num_classes=10), LeNet5(num_classes=0)
    extractor.features.load_state_dict(classifier.features.state_dict())
    x = torch.randn(3, 1, 28, 28)
    features = extractor(x)
    assert features.shape == (3, extractor.num_features) == (3, 84)
    torch.testing.assert_close(classifier(x), features @ classifier.head.weight.T + classifier.head.bias)
    with pytest.raises(ValueError, match=r"LeNet5 expects images \[B, 1, 28, 28\] \(float\); got shape \(2, 1, 8, 8\)"):
        extractor(torch.randn(2, 1, 8, 8))


def test_lenet_dropout_follows_the_two_hidden_linear_layers():
    layers = list(LeNet5(dropout=0.2).features)
    after = [type(layers[i - 2]) for i, m in enumerate(layers) if isinstance(m, nn.Dropout)]
    assert after == [nn.Linear, nn.Linear] and all(m.p == 0.2 for m in layers if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, nn.Dropout) for m in LeNet5().modules())


def test_mlp_flattens_counts_and_extracts_features():
    net = MLP(in_features=64, out_features=10, hidden=[32, 16], dropout=0.1, activation="tanh")
    assert sum(p.numel() for p in net.parameters()) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    assert net(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    extractor = MLP(64, 0, hidden=[32])
    assert extractor(torch.randn(2, 64)).shape == (2, extractor.num_features) == (2, 32)
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2



def test_one_output_is_a_linear_head_not_the_feature_extractor():
    """``out_features=1`` / ``num_classes=1`` (a regression mean, a binary logit) gets its head; only 0 drops it."""
    mlp, lenet = MLP(64, 1, hidden=[16]), LeNet5(num_classes=1)
    assert isinstance(mlp.head, nn.Linear) and isinstance(lenet.head, nn.Linear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(mlp(x), mlp.features(x) @ mlp.head.weight.T + mlp.head.bias)
    assert mlp(x).shape == (3, 1) and lenet(torch.randn(2, 1, 28, 28)).shape == (2, 1)

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "swish"}, "activation must be one of"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\); got 1.0"),
        ({"hidden": [8, 0]}, r"hidden=\[8, 0\]"),
    ],
)
def test_mlp_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(4, 2, **kwargs)


def test_backbones_name_the_shape_and_dtype_they_expect_and_refuse_bad_widths() -> None:
    """A wrong width, a missing batch axis, float64 or numpy inputs failed deep in torch (mat1 and mat2 shapes cannot
    be multiplied; expected m1 and m2 to have the same dtype); ``hidden=128`` failed as 'int' is not iterable."""
    net = MLP(4, 3, hidden=[8])
    for bad, got in ((torch.zeros(6, 5), r"shape \(6, 5\)"), (torch.zeros(4), r"shape \(4,\)")):
        with pytest.raises(ValueError, match=r"MLP expects inputs \[B, 4\] .*\(float\); got " + got):
            net(bad)
    with pytest.raises(ValueError, match=r"MLP expects inputs in its weights' dtype torch.float32; got .*float64"):
        net(torch.zeros(6, 4, dtype=torch.float64))
    from lightning_bayes.modules import VariationalInference

    variational = VariationalInference(MLP(4, 3, hidden=[8])).backbone  # its first layer holds q(W) by now
    with pytest.raises(ValueError, match=r"MLP expects inputs in its weights' dtype torch.float32; got .*float64"):
        variational(torch.zeros(6, 4, dtype=torch.float64))  # torch's "mat1 and mat2 must have the same dtype"
    with pytest.raises(TypeError, match=r"MLP expects inputs \[B, 4\] .*\(a float tensor\); got ndarray"):
        net(np.zeros((6, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"LeNet5 expects images \[B, 1, 28, 28\] \(float\); got shape \(2, 3, 28"):
        LeNet5()(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"LeNet5 expects inputs in its weights' dtype torch.float32; got .*uint8"):
        LeNet5()(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the inputs itself
        assert net(torch.zeros(6, 4, dtype=torch.bfloat16)).shape == (6, 3)
    with pytest.raises(ValueError, match=r"hidden must be a list of layer widths \(ints\), e.g. \[256, 256\]; got 128"):
        MLP(64, 10, hidden=128)  # type: ignore[arg-type]
    for args, got in (((4.5, 3), "4.5 and 3"), ((4, "3"), "4 and '3'")):
        with pytest.raises(ValueError, match=f"in_features and out_features must be ints; got {got}"):
            MLP(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_classes and in_channels must be ints; got '10' and 1"):
        LeNet5("10")  # type: ignore[arg-type]
