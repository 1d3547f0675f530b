import pytest
from torch import nn

from lightning_bayes.params import select_parameters


def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net[0].bias.requires_grad_(False)
    return net


def test_aliases_and_globs_select_the_expected_names():
    net = _net()
    assert list(select_parameters(net, "all")) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(select_parameters(net, "trainable")) == ["0.weight", "2.weight", "2.bias"]
    assert list(select_parameters(net, "last_layer")) == ["2.weight", "2.bias"]
    assert list(select_parameters(net, "*.weight")) == ["0.weight", "2.weight"]
    assert list(select_parameters(net, ["all", "!*.bias"])) == ["0.weight", "2.weight"]


def test_selected_objects_are_the_module_parameters():
    net = _net()
    assert select_parameters(net, "last_layer")["2.weight"] is net[2].weight


def test_lora_alias_matches_peft_names():
    class Lora(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(2, 2)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(2, 1)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(1, 2)})

    names = list(select_parameters(Lora(), "lora"))
    assert names == ["lora_A.default.weight", "lora_A.default.bias", "lora_B.default.weight", "lora_B.default.bias"]


@pytest.mark.parametrize("bad", ["*.gamma", ["nope"], []])
def test_pattern_matching_nothing_names_the_selector(bad):
    with pytest.raises(ValueError, match="params"):
        select_parameters(_net(), bad)
