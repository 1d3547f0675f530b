"""The packaged EfficientNet-Lite0 weights in timm recognise real photographs."""

import pytest
import torch
import torch.nn.functional as F
from skimage import data

from lightning_bayes.models import TimmBackbone
from lightning_bayes.models.timm import EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_SIZE, EFFICIENTNET_LITE0_STD, timm_backbone


def _preprocess(image) -> torch.Tensor:
    x = torch.tensor(image).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    x = F.interpolate(x, size=(EFFICIENTNET_LITE0_SIZE, EFFICIENTNET_LITE0_SIZE), mode="bilinear", antialias=True)
    mean, std = torch.tensor(EFFICIENTNET_LITE0_MEAN).view(1, 3, 1, 1), torch.tensor(EFFICIENTNET_LITE0_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return timm_backbone("tf_efficientnet_lite0", num_classes=1000, pretrained="packaged").eval()


@pytest.mark.parametrize("image, label", [("chelsea", 285), ("coffee", 967)])  # Egyptian cat, espresso
def test_packaged_weights_classify_real_images(imagenet_model, image: str, label: int):
    with torch.no_grad():
        logits = imagenet_model(_preprocess(getattr(data, image)()))
    assert logits.argmax(-1).item() == label


def test_feature_mode_and_fresh_head():
    features = TimmBackbone("tf_efficientnet_lite0", num_classes=0, pretrained="packaged").eval()
    with torch.no_grad():
        assert features(torch.zeros(2, 3, 64, 64)).shape == (2, features.num_features) == (2, 1280)
    head = timm_backbone("tf_efficientnet_lite0", num_classes=7, pretrained="packaged")
    assert head.classifier.out_features == 7


def test_packaged_weights_only_for_lite0():
    with pytest.raises(ValueError, match="only available for tf_efficientnet_lite0"):
        timm_backbone("resnet18", num_classes=10, pretrained="packaged")
