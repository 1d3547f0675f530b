import pytest
import torch

from lightning_bayes.models import MLP, LeNet5


def test_lenet_has_the_literature_parameter_count_and_feature_mode():
    net = LeNet5(num_classes=10)
    expected = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (256 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert sum(p.numel() for p in net.parameters()) == expected == 44426
    x = torch.randn(3, 1, 28, 28)
    assert net(x).shape == (3, 10)
    features = LeNet5(num_classes=0)
    assert features(x).shape == (3, features.num_features) == (3, 84)
    assert sum(isinstance(m, torch.nn.Dropout) for m in LeNet5(dropout=0.2).modules()) == 2


def test_mlp_shapes_and_errors():
    net = MLP(in_features=64, out_features=10, hidden=[32, 16], dropout=0.1, activation="tanh")
    assert net(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert MLP(64, 0, hidden=[32]).forward(torch.randn(2, 64)).shape == (2, 32)
    with pytest.raises(ValueError, match="activation"):
        MLP(4, 2, activation="swish")
    with pytest.raises(ValueError, match="LeNet5 expects images"):
        LeNet5()(torch.randn(2, 1, 8, 8))
