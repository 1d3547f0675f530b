"""Checkpoints leave out a pretrained base that never changed: frozen when built (LoRA, 4-bit), or frozen later as a
whole by a post-hoc head's FrozenFeatures while it still holds the constructor's weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_bayes.models import FrozenFeatures
from lightning_bayes.models.frozen_base import exclude_frozen_base

pytestmark = pytest.mark.usefixtures("single_thread")


class Pretrained(nn.Module):
    """A tiny Llama "from its pretrained source" (seed 0 is the source), last-position hidden state as features."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=16,
        )  # fmt: skip
        self.model = LlamaModel(config)
        exclude_frozen_base(self, "model")

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).last_hidden_state[:, -1]


def test_a_base_frozen_later_is_left_out_while_it_holds_the_pretrained_weights() -> None:
    """FrozenFeatures froze the base after its constructor had decided what to leave out (nothing: all trained
    then), so every post-hoc SmolLM2 head's checkpoint held the whole 650 MB base."""
    trainable = Pretrained()
    assert set(trainable.state_dict()) == {f"model.{k}" for k in trainable.model.state_dict()}, "trains: all saved"
    features = FrozenFeatures(Pretrained())
    assert features.state_dict() == {}
    rebuilt = FrozenFeatures(Pretrained())
    rebuilt.load_state_dict(features.state_dict())  # strict: the base's absence is expected
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rebuilt(ids), features(ids), rtol=0, atol=0)


def test_weights_loaded_into_a_base_before_it_was_frozen_are_saved() -> None:
    """A fine-tuned base is not what the constructor rebuilds: its checkpoint must hold it."""
    tuned = Pretrained()
    with torch.no_grad():
        tuned.model.norm.weight.add_(0.25)
    features = FrozenFeatures(tuned)
    state = features.state_dict()
    assert set(state) == {f"backbone.model.{k}" for k in tuned.model.state_dict()}
    rebuilt = FrozenFeatures(Pretrained())
    rebuilt.load_state_dict(state)
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rebuilt(ids), features(ids), rtol=0, atol=0)


def test_a_tied_weight_and_a_non_persistent_buffer_are_judged_as_a_state_dict_would() -> None:
    """Frozen keys taken from de-duplicated parameter names kept a tied output head (SmolLM2's vocabulary matrix,
    113 MB) in every checkpoint; non-persistent buffers (rotary inv_freq), never in a state dict, made every save of
    a LoRA run hash its whole base."""
    from lightning_bayes.models import frozen_base

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
            self.model[1].weight = self.model[0].weight  # tied, as tie_word_embeddings
            self.model.register_buffer("inv_freq", torch.ones(2), persistent=False)
            exclude_frozen_base(self, "model")

    owner = Tied()
    owner.model.requires_grad_(False)  # frozen after construction, weights untouched
    assert owner.state_dict() == {}
    hashed: list[int] = []
    identity, lora_like = frozen_base.backbone_identity, Tied()  # everything trains: nothing frozen since to hash
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frozen_base, "backbone_identity", lambda base: hashed.append(1) or identity(base))
        assert set(lora_like.state_dict()) == {"model.0.weight", "model.1.weight"} and hashed == []


def test_a_base_frozen_in_part_is_left_out_after_its_trainable_part_moved():
    """The frozen layer stays out of the state dict after the trainable one changed (the identity of the frozen
    parameters alone decides; with the trainable ones in it, every checkpoint after a step held the whole base)."""
    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            self.base[0].requires_grad_(False)
            exclude_frozen_base(self, "base")

    owner = Owner()
    with torch.no_grad():
        owner.base[1].weight.add_(1.0)
    assert set(owner.state_dict()) == {"base.1.weight", "base.1.bias"}


def _assert_a_tuned_base_loads_into(wrap: Callable[[nn.Module], nn.Module], folder: Path) -> nn.Module:
    """Save ``wrap`` of a tuned base, load the file into ``wrap`` of a fresh one: the outputs agree exactly."""
    from lightning_bayes.models.weights import load_trained_weights

    tuned = Pretrained()
    with torch.no_grad():
        tuned.model.norm.weight.add_(0.25)
    trained = wrap(tuned)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()}}, folder / "a.ckpt")
    rebuilt = wrap(Pretrained())
    load_trained_weights(rebuilt, str(folder / "a.ckpt"))
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rebuilt(ids), trained(ids), rtol=0, atol=0)
    return rebuilt


def test_load_trained_weights_restores_a_tuned_base_that_a_fresh_models_state_dict_leaves_out(tmp_path) -> None:
    """A post-hoc method's ``checkpoint=`` loaded the names of the fresh model's state dict, which leaves out its
    base (still as built), so a tuned base saved in the checkpoint was silently not loaded."""
    _assert_a_tuned_base_loads_into(FrozenFeatures, tmp_path)


def test_the_identity_does_not_depend_on_the_thread_count() -> None:
    """A float32 sum's value depends on how the reduction is split: a base hashed with another thread count (or on
    another device) than at construction looked changed, and went into every checkpoint."""
    from lightning_bayes.models.identity import backbone_identity

    layer = nn.Linear(4000, 1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backbone_identity(layer)
        torch.set_num_threads(2)
        two = backbone_identity(layer)
    finally:
        torch.set_num_threads(threads)
    assert one == two
    with torch.no_grad():
        layer.weight.view(-1)[1001] += 1e-6  # not a sampled position (every 976th of the 4e6)
    assert backbone_identity(layer) != one


def test_load_trained_weights_restores_the_base_beside_a_head_that_the_state_dict_keeps(tmp_path) -> None:
    """A probe's fresh state dict holds its head only (the base is as built): the tuned base of the checkpoint, under
    the head's prefix, loads too."""

    class Probe(nn.Module):
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.features, self.head = FrozenFeatures(base), nn.Linear(16, 2)

        def forward(self, ids: Tensor) -> Tensor:
            return self.head(self.features(ids))

    assert set(Probe(Pretrained()).state_dict()) == {"head.weight", "head.bias"}
    _assert_a_tuned_base_loads_into(Probe, tmp_path)


def test_the_byte_checksum_sees_the_tail_bytes_and_takes_offset_views() -> None:
    from lightning_bayes.models.identity import byte_checksum

    nine = torch.zeros(9, dtype=torch.uint8)
    before = byte_checksum(nine)
    nine[8] = 1  # the byte after the last whole 8-byte word
    assert not torch.equal(byte_checksum(nine), before)
    view = torch.arange(10.0)[1:]  # storage offset 4 bytes: no int64 view of it in place
    assert torch.equal(byte_checksum(view), byte_checksum(view.clone()))


def test_the_byte_checksum_is_the_wrapped_word_sum_then_the_tail_bytes() -> None:
    """Against numpy: the int64 sum (wrapping) of the whole 8-byte words, then the ``nbytes mod 8`` bytes after them,
    for every length to 40 bytes and every storage offset of a byte view (an odd offset has no int64 view in place)."""
    import numpy as np

    from lightning_bayes.models.identity import byte_checksum

    data = torch.randint(0, 256, (56,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for offset in range(16):
        for length in range(41):
            flat = data[offset : offset + length]
            whole = length // 8 * 8
            words = np.frombuffer(flat[:whole].numpy().tobytes(), dtype=np.int64)
            expected = [int(words.sum(dtype=np.int64))] + flat[whole:].tolist()
            assert byte_checksum(flat).tolist() == expected, (offset, length)


def test_a_one_element_parameter_is_part_of_the_identity() -> None:
    """A changed scalar parameter (a temperature, a log noise) changes the identity: skipping it, a tuned one looked
    like the frozen base it was built as (and was left out of the checkpoint)."""
    from lightning_bayes.models.identity import backbone_identity

    layer = nn.Linear(1, 1, bias=False)
    before = backbone_identity(layer)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert backbone_identity(layer) != before
