"""Every method's ``predictive`` runs the network in eval mode and leaves the modes as they were: after
``trainer.fit`` a module is in train mode, where a direct call used BatchNorm's batch statistics and dropout (a
ResNet-18's probabilities up to 0.37 off for MAP, 0.60 for a deep ensemble) and overwrote the running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bayes.modules import MAP, DeepEnsemble, MCDropout, VariationalInference, VBLLClassifier


def _body() -> nn.Sequential:
    body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
    body.num_features = 8
    return body


def _network() -> nn.Sequential:
    return nn.Sequential(*_body(), nn.Linear(8, 3))


METHODS = {
    "MAP": lambda: MAP(_network()),
    "MCDropout": lambda: MCDropout(_network(), num_samples=4),
    "DeepEnsemble": lambda: DeepEnsemble(_network(), num_members=2),
    "VBLLClassifier": lambda: VBLLClassifier(_body(), num_classes=3, dataset_size=32, num_samples=4),
    "VariationalInference": lambda: VariationalInference(_network(), num_samples=4),
}


@pytest.mark.parametrize("build", METHODS.values(), ids=METHODS.keys())
def test_a_predictive_in_train_mode_is_the_eval_mode_predictive_and_changes_nothing(build) -> None:
    torch.manual_seed(0)
    module = build()
    x = torch.randn(6, 4)
    for _ in range(3):  # running statistics away from their initial values
        module(torch.randn(16, 4) * 3 + 1)
    module.train()
    kept = next(m for m in module.modules() if isinstance(m, nn.ReLU))
    kept.eval()  # a submodule a method keeps in eval mode stays so
    modes = {name: m.training for name, m in module.named_modules()}
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    torch.manual_seed(1)
    in_train_mode = module.predictive(x).logits
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert all(torch.equal(b, buffers[name]) for name, b in module.named_buffers())
    module.eval()
    torch.manual_seed(1)
    torch.testing.assert_close(in_train_mode, module.predictive(x).logits, rtol=0, atol=0)


def test_a_subclass_that_samples_its_dropout_keeps_it_through_super_predictive() -> None:
    """Only the outermost call switches to eval mode: a MAP subclass turning its dropout on before calling
    ``super().predictive`` got a deterministic network (the inner call set eval mode again)."""

    class SampledDropout(MAP):
        def predictive(self, x, num_samples=None):
            self.backbone[3].train()
            return super().predictive(x, num_samples)

    torch.manual_seed(0)
    module, x = SampledDropout(_network()).train(), torch.randn(6, 4)
    first, second = module.predictive(x).logits, module.predictive(x).logits
    assert not torch.equal(first, second)  # two dropout masks
    assert all(m.training for m in module.modules())  # every mode back as it was
