import pytest
import torch

from lightning_bayes.models import LeNet5, LinearProbe


def test_frozen_probe_trains_only_its_head_on_the_backbone_features():
    torch.manual_seed(0)
    backbone = LeNet5(num_classes=0, dropout=0.5)
    probe = LinearProbe(backbone, num_classes=3).train()
    assert not backbone.training, "a frozen backbone stays in eval mode (no dropout noise in its features)"
    x = torch.randn(4, 1, 28, 28)
    out = probe(x)
    expected = backbone(x) @ probe.head.weight.T + probe.head.bias
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert probe.head.weight.grad is not None


def test_unfrozen_probe_passes_gradients_to_the_backbone():
    probe = LinearProbe(LeNet5(num_classes=0), num_classes=2, freeze_backbone=False).train()
    probe(torch.randn(2, 1, 28, 28)).sum().backward()
    assert probe.backbone.training and all(p.grad is not None for p in probe.backbone.parameters())


def test_half_precision_features_meet_a_float32_head():
    """bf16 features (a bf16 LLM's, or a shared cache's) crashed the float32 head: "mat1 and mat2 must have the same
    dtype"."""
    backbone = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()).to(torch.bfloat16)
    backbone.num_features = 4
    probe = LinearProbe(backbone, num_classes=2)
    x = torch.randn(5, 3, dtype=torch.bfloat16)
    out = probe(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, backbone(x).float() @ probe.head.weight.T + probe.head.bias)


def test_backbone_without_feature_width_is_explained():
    with pytest.raises(ValueError, match="num_features"):
        LinearProbe(torch.nn.Linear(3, 3), num_classes=2)


def test_a_backbone_that_keeps_its_head_is_told_to_drop_it():
    """LeNet5(num_classes=10) ends in its 10-way head while num_features says 84: the probe's head met features
    [B, 10] with torch's "mat1 and mat2 shapes cannot be multiplied"."""
    probe = LinearProbe(LeNet5(num_classes=10), num_classes=3)
    with pytest.raises(ValueError, match=r"^LinearProbe expects features \[B, 84\], B >= 1; got \(2, 10\) \(does the "
                                         r"backbone still end in its classification head\? build it without one: "
                                         r"out_features=0 / num_classes=0\)$"):
        probe(torch.zeros(2, 1, 28, 28))
