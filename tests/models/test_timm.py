"""timm backbones and the packaged EfficientNet-Lite0 ImageNet weights."""

import pytest
import torch

from lightning_bayes.models import load_packaged_efficientnet_lite0, timm_backbone
from lightning_bayes.models.timm import packaged_efficientnet_lite0_file

@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return timm_backbone("tf_efficientnet_lite0", num_classes=1000, pretrained="packaged").eval()


@pytest.fixture(scope="module")
def packaged_state() -> dict:
    return torch.load(packaged_efficientnet_lite0_file(), map_location="cpu", weights_only=True)


def test_every_packaged_tensor_lands_in_its_timm_slot(imagenet_model, packaged_state):
    state = imagenet_model.state_dict()
    torch.testing.assert_close(state["conv_stem.weight"], packaged_state["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["bn2.running_var"], packaged_state["_bn1.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(state["classifier.weight"], packaged_state["_fc.weight"], rtol=0, atol=0)


def test_feature_mode_gives_the_pooled_features_of_the_classifier(imagenet_model):
    extractor = timm_backbone("tf_efficientnet_lite0", num_classes=0, pretrained="packaged").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(x)
        expected = imagenet_model.forward_head(imagenet_model.forward_features(x), pre_logits=True)
    assert features.shape == (2, extractor.num_features) == (2, 1280)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_other_head_sizes_keep_a_fresh_head_and_grey_input_sums_the_rgb_stem(imagenet_model):
    model = timm_backbone("tf_efficientnet_lite0", num_classes=7, pretrained="packaged", in_chans=1, drop_rate=0.2)
    assert model.classifier.weight.shape == (7, 1280) and model.drop_rate == 0.2
    stem = imagenet_model.conv_stem.weight.sum(dim=1, keepdim=True)  # timm's adapt_input_conv for one channel
    torch.testing.assert_close(model.conv_stem.weight, stem, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[6][0].conv_pwl.weight, imagenet_model.blocks[6][0].conv_pwl.weight)


def test_a_mismatching_tensor_is_named_with_its_pair(tmp_path, packaged_state):
    broken = dict(packaged_state, **{"_bn0.weight": torch.ones(31)})
    torch.save(broken, tmp_path / "broken.pth")
    model = timm_backbone("tf_efficientnet_lite0", num_classes=0)
    with pytest.raises(ValueError, match=r"first mismatching pair _bn0.weight \(31,\) -> bn1.weight \(32,\)"):
        load_packaged_efficientnet_lite0(model, tmp_path / "broken.pth")


def test_a_local_checkpoint_file_is_loaded_without_the_hub(tmp_path):
    torch.manual_seed(0)
    source = timm_backbone("test_efficientnet", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    loaded = timm_backbone("test_efficientnet", num_classes=0, pretrained=str(tmp_path / "weights.pth"))
    torch.testing.assert_close(loaded.conv_stem.weight, source.conv_stem.weight, rtol=0, atol=0)
    assert loaded.num_features == source.num_features


def test_a_yaml_config_builds_a_timm_backbone():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--backbone", type=torch.nn.Module)
    config = parser.parse_string(
        "backbone:\n"
        "  class_path: lightning_bayes.models.timm_backbone\n"
        "  init_args: {name: test_efficientnet, num_classes: 0, pretrained: false, drop_rate: 0.1}\n"
    )
    backbone = parser.instantiate_classes(config).backbone
    assert backbone.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, backbone.num_features)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "resnet18", "pretrained": "packaged"}, "holds weights for name='tf_efficientnet_lite0' only"),
        ({"pretrained": "/no/such/weights.pth"}, "no such file"),
        ({"num_classes": -1}, "num_classes=-1"),
        ({"name": "resnet_18"}, r"name='resnet_18' is not a timm model; did you mean one of \[.*'resnet18'"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm_backbone(**{"name": "tf_efficientnet_lite0", "num_classes": 10, **kwargs})


def test_a_timm_source_prefix_is_left_to_timm(tmp_path):
    """``local-dir:`` and ``hf-hub:`` names are timm's own lookups, which ``timm.is_model`` does not know: they were
    refused as "not a timm model"."""
    import timm
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("resnet10t", num_classes=3), tmp_path)
    model = timm_backbone(f"local-dir:{tmp_path}", num_classes=3, pretrained=True)
    assert type(model).__name__ == "ResNet"


def test_a_local_checkpoint_files_head_of_the_asked_size_is_loaded(tmp_path):
    """timm compares num_classes with its config's (1000) and dropped a fine-tuned 10-class head of the file."""
    torch.manual_seed(0)
    tuned = timm_backbone("test_resnet", num_classes=10)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pth")
    torch.manual_seed(1)
    loaded = timm_backbone("test_resnet", num_classes=10, pretrained=str(tmp_path / "tuned.pth"))
    torch.testing.assert_close(loaded.fc.weight, tuned.fc.weight, rtol=0, atol=0)
    other = timm_backbone("test_resnet", num_classes=7, pretrained=str(tmp_path / "tuned.pth"))  # another size: fresh
    assert other.fc.weight.shape == (7, tuned.fc.in_features)


def test_a_file_of_another_network_or_naming_is_refused_not_ignored(tmp_path):
    """timm loads a file without its head non-strictly: another network's weights, or a Lightning checkpoint's
    prefixed names, left the network at its random initialisation with only a log line."""
    torch.save(timm_backbone("test_efficientnet", num_classes=1000).state_dict(), tmp_path / "other.pth")
    tuned = timm_backbone("test_resnet", num_classes=10).state_dict()
    prefixed = {f"backbone.network.{k}": v for k, v in tuned.items()}
    torch.save({"state_dict": prefixed}, tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match=r"pretrained='.*other.pth' does not fit timm's 'test_resnet': .* size "
                                         r"mismatch for bn1.weight"):
        timm_backbone("test_resnet", num_classes=10, pretrained=str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match=r"pretrained='.*run.ckpt' lacks \d+ of the \d+ tensors of timm's "
                                         r"'test_resnet' \(e.g. \['conv1.0.weight'"):
        timm_backbone("test_resnet", num_classes=10, pretrained=str(tmp_path / "run.ckpt"))


def test_a_network_built_for_one_input_size_is_built_for_the_asked_one():
    """A ViT's position embeddings fix its input size: img_size builds it for another (timm asserted "Input height
    (32) doesn't match model (224)" at the first forward); networks that take any size refuse the argument."""
    vit = timm_backbone("test_vit", num_classes=0, img_size=32)
    assert vit.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, vit.num_features)
    with pytest.raises(ValueError, match=r"img_size=32 is for networks built for one input size .* 'test_resnet'"):
        timm_backbone("test_resnet", num_classes=0, img_size=32)


def test_hub_weights_offline_name_the_argument_and_the_offline_choices(monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    import lightning_bayes.models.timm as timm_module

    def offline(name, pretrained=False, **options):
        if pretrained:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        raise AssertionError("only the hub call is expected")

    monkeypatch.setattr(timm_module.timm, "create_model", offline)
    expected = r"pretrained=True could not fetch timm's 'resnet18' weights .* pretrained='packaged' \('tf_efficientnet"
    with pytest.raises(OSError, match=expected):
        timm_backbone("resnet18", num_classes=0, pretrained=True)


def test_a_file_timm_renames_on_loading_is_accepted(tmp_path):
    """The check reads the file as timm does, through the family's checkpoint_filter_fn: a ViT saved with open_clip's
    ``visual.trunk.`` prefix, which timm loads, was refused as lacking every tensor."""
    torch.manual_seed(0)
    vit = timm_backbone("test_vit", num_classes=1000)
    torch.save({f"visual.trunk.{k}": t for k, t in vit.state_dict().items()}, tmp_path / "clip.pth")
    loaded = timm_backbone("test_vit", num_classes=10, pretrained=str(tmp_path / "clip.pth"))
    torch.testing.assert_close(loaded.patch_embed.proj.weight, vit.patch_embed.proj.weight, rtol=0, atol=0)
