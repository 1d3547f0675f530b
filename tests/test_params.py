import pytest
import torch
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


def test_a_tied_weight_answers_to_each_of_its_names():
    """An LM head tied to the embedding (SmolLM2) appears once in ``named_parameters()``, under the embedding's name:
    ``last_layer`` and ``lm_head.*`` matched nothing."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.lm_head = nn.Linear(3, 5, bias=False)
            self.lm_head.weight = self.embed.weight

    model = TiedLM()
    assert list(select_parameters(model, "last_layer")) == ["embed.weight"]
    assert select_parameters(model, "lm_head.*")["embed.weight"] is model.embed.weight


def test_last_layer_is_the_last_module_holding_parameters_itself_even_with_children():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 8))
            self.drop = nn.Dropout()

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Head())
    assert list(select_parameters(net, "last_layer")) == ["2.weight"]  # was the first layer's


def test_lora_alias_covers_embedding_adapters():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 4)
            self.q_proj = nn.Linear(4, 4)

        def forward(self, ids):
            return self.q_proj(self.embed_tokens(ids))

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    names = list(select_parameters(model, "lora"))
    assert any("lora_embedding_A" in n for n in names) and any("lora_embedding_B" in n for n in names)
    assert len(names) == 4
