"""The opt-in feature cache of FrozenFeatures: exact reuse, only misses computed, disk round trip."""

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_bayes.models import FrozenFeatures, LinearProbe
from lightning_bayes.modules import VBLLClassifier

pytestmark = pytest.mark.usefixtures("single_thread")


class CountingBackbone(nn.Module):
    """A tiny feature extractor that records the batch size of every call. Tensors: a linear map of the
    flattened example; token dicts: the last token's embedding and the number of real tokens, which is
    exactly padding-invariant for left padding."""

    def __init__(self, seed: int = 0, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(6, width)
        self.embedding = nn.Embedding(50, width - 1)
        self.num_features = width
        self.calls: list[int] = []

    def forward(self, x: Tensor | dict[str, Tensor]) -> Tensor:
        if isinstance(x, dict):
            self.calls.append(len(x["input_ids"]))
            length = x["attention_mask"].sum(1, keepdim=True).float()
            return torch.cat([self.embedding(x["input_ids"][:, -1]), length], dim=1)
        self.calls.append(len(x))
        return self.linear(x.flatten(1))


def left_padded(texts: list[list[int]], width: int, pad: int = 0) -> dict[str, Tensor]:
    """A tokenizer's left-padded batch of token id lists, padded to ``width`` positions."""
    ids = torch.full((len(texts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, width - len(text) :] = torch.tensor(text)
        mask[row, width - len(text) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_cached_tensor_features_equal_uncached_and_only_misses_are_computed():
    backbone = CountingBackbone()
    cached = FrozenFeatures(backbone, cache_features=True)
    x = torch.randn(5, 2, 3)
    first = cached(x)
    torch.testing.assert_close(first, backbone(x), rtol=0, atol=0)
    backbone.calls.clear()
    mixed = torch.cat([x[[3, 1]], torch.randn(2, 2, 3), x[[0]]])  # 3 hits, 2 misses
    out = cached(mixed)
    assert backbone.calls == [2], "only the two new examples go through the backbone"
    # cached rows were computed in another batch: BLAS may round them differently (seen: 1 ulp on an AMD EPYC)
    torch.testing.assert_close(out, backbone(mixed), rtol=2e-7, atol=0)
    backbone.calls.clear()
    torch.testing.assert_close(cached(mixed.flip(0)), out.flip(0), rtol=0, atol=0)
    assert backbone.calls == [], "a batch of cached examples never calls the backbone"
    assert not any("feature" in name for name in cached.state_dict()), "the cache is no buffer"


def test_same_text_with_other_padding_is_a_hit():
    backbone = CountingBackbone()
    cached = FrozenFeatures(backbone, cache_features=True)
    texts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    first = cached(left_padded(texts, width=4))
    assert backbone.calls == [3]
    # the same texts padded to 7 in another batch, next to a new text and one repeated twice
    batch = left_padded([[8, 9], [14], [10, 11, 12, 13], [5, 6, 7], [14]], width=7)
    out = cached(batch)
    assert backbone.calls == [3, 1], "the new text, once, is the only backbone input"
    torch.testing.assert_close(out, backbone(batch), rtol=0, atol=0)
    torch.testing.assert_close(out[[3, 0, 2]], first, rtol=0, atol=0)
    # a text differing only where the mask is 0 is the same text; another token is another text
    padded_with_other_id = left_padded([[5, 6, 7]], width=6, pad=49)
    assert len(backbone.calls) == 3 and cached(padded_with_other_id).shape == (1, 4)
    assert len(backbone.calls) == 3
    cached(left_padded([[5, 6, 8]], width=3))
    assert backbone.calls[-1] == 1


def test_disk_round_trip_and_backbones_do_not_share(tmp_path: Path):
    x = torch.randn(4, 6)
    writer = FrozenFeatures(CountingBackbone(seed=0), cache_features=True, feature_cache_dir=str(tmp_path))
    expected = writer(x)
    reader_backbone = CountingBackbone(seed=0)  # same weights, a new process would build it like this
    reader = FrozenFeatures(reader_backbone, cache_features=True, feature_cache_dir=tmp_path)
    torch.testing.assert_close(reader(x), expected, rtol=0, atol=0)
    assert reader_backbone.calls == [], "the features come from disk"
    other_backbone = CountingBackbone(seed=1)  # same architecture and names, other weights
    other = FrozenFeatures(other_backbone, cache_features=True, feature_cache_dir=tmp_path)
    torch.testing.assert_close(other(x), other_backbone(x), rtol=0, atol=0)
    assert other_backbone.calls[0] == 4, "another backbone never reads this one's features"
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    assert not list(tmp_path.rglob("*.tmp")), "no partial files are left behind"


def test_changed_weights_drop_the_in_memory_cache():
    backbone = CountingBackbone(seed=0)
    cached = FrozenFeatures(backbone, cache_features=True)
    x = torch.randn(3, 6)
    cached(x)
    cached.load_state_dict(FrozenFeatures(CountingBackbone(seed=1)).state_dict())
    torch.testing.assert_close(cached(x), backbone(x), rtol=0, atol=0)
    assert backbone.calls[1] == 3, "new weights: recomputed"
    cached.load_state_dict(cached.state_dict())
    cached(x)
    assert len(backbone.calls) == 3, "the same weights reloaded keep the cache"


def test_weights_changed_inside_the_backbone_or_away_from_the_sampled_values_drop_the_cache(tmp_path: Path):
    """Weights loaded into the wrapped backbone itself (not through FrozenFeatures) kept the old features; and the
    identity hashed 4,096 evenly spaced values per tensor, so a backbone differing elsewhere read another's disk
    cache."""
    backbone = CountingBackbone(seed=0)
    cached = FrozenFeatures(backbone, cache_features=True)
    x = torch.randn(3, 6)
    cached(x)
    backbone.load_state_dict(CountingBackbone(seed=1).state_dict())
    torch.testing.assert_close(cached(x), backbone(x), rtol=0, atol=0)
    assert backbone.calls[1] == 3, "new weights: recomputed"

    first, second = (nn.Sequential(nn.Linear(4097, 2, bias=False)) for _ in range(2))
    with torch.no_grad():
        second[0].weight.copy_(first[0].weight)
        second[0].weight[0, 1] += 0.5  # position 1 of 8,194: between the sampled positions 0 and 2
    sampled = torch.arange(4096) * (second[0].weight.numel() - 1) // 4095
    assert 1 not in sampled.tolist()
    features = [FrozenFeatures(net, cache_features=True, feature_cache_dir=tmp_path) for net in (first, second)]
    x = torch.randn(2, 4097)
    torch.testing.assert_close(features[1](x), second(x), rtol=0, atol=0)
    assert not torch.equal(features[0](x), features[1](x))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_features_computed_under_autocast_are_kept_apart():
    """A bf16-mixed run's features were served to a float32 run (0.0022 off), in memory and from a shared folder."""
    backbone = CountingBackbone(seed=0)
    cached = FrozenFeatures(backbone, cache_features=True)
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cached(x)
    full = cached(x)
    assert backbone.calls == [3, 3] and low.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(full, backbone(x), rtol=0, atol=0)


def test_a_folder_of_features_computed_under_autocast_has_a_portable_name(tmp_path: Path):
    """The folder's name took the autocast state as "|autocast-cpu-torch.bfloat16" (``|`` is refused on Windows)."""
    cached = FrozenFeatures(CountingBackbone(seed=0), cache_features=True, feature_cache_dir=str(tmp_path))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached(torch.randn(3, 6))
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith("-autocast-cpu-bfloat16") and not set('|:<>"?*') & set(folder.name), folder.name


def test_options_pass_through_and_bad_values_are_explained(tmp_path: Path):
    probe = LinearProbe(CountingBackbone(), num_classes=2, cache_features=True, feature_cache_dir=str(tmp_path))
    vbll = VBLLClassifier(CountingBackbone(), num_classes=2, dataset_size=8, freeze_backbone=True, cache_features=True)
    assert probe.backbone.cache_features and probe.backbone.feature_cache_dir == tmp_path
    assert vbll.backbone.cache_features and vbll.backbone.feature_cache_dir is None
    assert not LinearProbe(CountingBackbone(), num_classes=2).backbone.cache_features
    with pytest.raises(ValueError, match="cache_features must be True or False"):
        FrozenFeatures(CountingBackbone(), cache_features="yes")
    with pytest.raises(ValueError, match="needs cache_features=True"):
        FrozenFeatures(CountingBackbone(), feature_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="feature_cache_dir must be a folder path"):
        FrozenFeatures(CountingBackbone(), cache_features=True, feature_cache_dir=3)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        FrozenFeatures(CountingBackbone(), cache_features=True, feature_cache_dir=str(tmp_path / "file"))
    with pytest.raises(ValueError, match="cache_features=True / feature_cache_dir=None need freeze_backbone=True"):
        LinearProbe(CountingBackbone(), num_classes=2, freeze_backbone=False, cache_features=True)
    with pytest.raises(ValueError, match=r"cache_features=False / feature_cache_dir='runs/f' need freeze_backbone=True"
                                         r".* give cache_features=False and feature_cache_dir=None to fine-tune"):
        VBLLClassifier(CountingBackbone(), num_classes=2, feature_cache_dir="runs/f")
    cached = FrozenFeatures(CountingBackbone(), cache_features=True)
    with pytest.raises(ValueError, match="the batch size B"):
        cached({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(3, 3)})


def test_a_backbone_built_under_inference_mode_is_cached():
    """Inference tensors keep no version count: reading it raised "Inference tensors do not track version counter"."""
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(6, 3), nn.Tanh())
    cached, x = FrozenFeatures(net, cache_features=True), torch.randn(2, 6)
    with torch.inference_mode():
        first = cached(x)
    with torch.no_grad():
        torch.testing.assert_close(cached(x), first, rtol=0, atol=0)


def test_the_identity_sees_buffers_and_half_precision_weights():
    """Moved BatchNorm statistics and an edited float16 weight give another identity (a stale cache otherwise)."""
    from lightning_bayes.models.identity import backbone_identity

    batch_norm = nn.BatchNorm1d(3)
    before = backbone_identity(batch_norm)
    batch_norm.running_mean.add_(1.0)
    assert backbone_identity(batch_norm) != before
    half = nn.Linear(4, 2).half()
    before = backbone_identity(half)
    with torch.no_grad():
        half.weight[0, 0] += 1
    assert backbone_identity(half) != before


@pytest.mark.parametrize("cached", [False, True])
def test_per_example_jacobians_of_a_head_on_cached_features_are_vectorised(cached: bool):
    """A post-hoc method's per-example Jacobians (``torch.func``: vmap over examples) run through a cached probe:
    vmapped examples have no bytes to key the cache on, so the backbone runs on them, and the Jacobian equals the
    uncached probe's (it failed with "Cannot access data pointer of Tensor that doesn't have storage")."""
    import warnings

    from lightning_bayes.inference.linalg import ParameterFunction, output_constraint

    backbone = CountingBackbone()
    probe = LinearProbe(backbone, num_classes=3, cache_features=cached)
    x, y = torch.randn(5, 2, 3), torch.tensor([0, 1, 2, 0, 1])
    probe(x)  # the cache, when on, holds these examples
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to a loop over examples
        jacobian = ParameterFunction(probe, "last_layer", output_constraint).jacobian(x, y)
    features = backbone(x).detach()
    torch.testing.assert_close(jacobian, _head_jacobian(features, 3), rtol=1e-6, atol=1e-6)


def _head_jacobian(features: Tensor, classes: int) -> Tensor:
    """``d (W f_n + b)_c / d (W, b)`` for a linear head, rows ``(n, c)``, columns ``W`` row-major then ``b``."""
    rows = []
    for f in features:
        for c in range(classes):
            weight = torch.zeros(classes, len(f))
            weight[c] = f
            bias = torch.zeros(classes)
            bias[c] = 1.0
            rows.append(torch.cat([weight.reshape(-1), bias]))
    return torch.stack(rows)


def test_a_null_space_laplace_over_a_cached_probes_head_gives_the_uncached_posterior():
    """Its sweeps (vmapped Jacobians) and linearised predictive (``jvp``) run inside ``torch.func`` transforms, where
    no tensor's bytes can be read (forward mode failed on the cache's keys): the backbone runs there instead."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bayes.modules import NullSpaceLaplace

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 2, 3, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    probabilities = {}
    for cached in (False, True):
        probe = LinearProbe(CountingBackbone(), num_classes=3, cache_features=cached)
        laplace = NullSpaceLaplace(probe, params="last_layer", num_samples=4, predictive="linearized", seed=0)
        L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(laplace, DataLoader(TensorDataset(x, y), batch_size=8))
        probabilities[cached] = laplace.predictive(x[:5]).probs
    torch.testing.assert_close(probabilities[True], probabilities[False], rtol=0, atol=0)
    assert not torch.allclose(probabilities[True][0], probabilities[True][1])  # samples that differ


def test_example_keys_of_a_one_dimensional_batch_and_of_masked_wide_token_tensors():
    """A batch [B] (one number per example) has one key per row; a [B, T, D] tensor beside an attention mask
    (e.g. inputs_embeds) is restricted to the real positions like [B, T] ones, so padding does not change its key."""
    from lightning_bayes.models.feature_cache import example_keys

    keys = example_keys(torch.tensor([1.0, 2.0, 1.0]))
    assert keys[0] == keys[2] != keys[1]
    embeds = torch.randn(1, 3, 4)
    right = {"inputs_embeds": torch.cat([embeds, torch.zeros(1, 2, 4)], 1),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    left = {"inputs_embeds": torch.cat([torch.ones(1, 1, 4), embeds], 1),
            "attention_mask": torch.tensor([[0, 1, 1, 1]])}
    assert example_keys(right) == example_keys(left)
