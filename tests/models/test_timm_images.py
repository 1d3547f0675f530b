"""TimmImageModel: dataset pixels in [0, 1], grey or RGB, any size, adapted to a pretrained timm network's input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from lightning_bayes.models import TimmImageModel, timm_backbone

EGYPTIAN_CAT, ESPRESSO = 285, 967


def _pixels(image) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> ``[1, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 255.0


@pytest.fixture(scope="module")
def imagenet_model() -> TimmImageModel:
    return TimmImageModel("tf_efficientnet_lite0", num_classes=1000, pretrained="packaged").eval()


@pytest.mark.parametrize("image, label", [("chelsea", EGYPTIAN_CAT), ("coffee", ESPRESSO)])
def test_real_photographs_at_their_own_size_are_classified(imagenet_model, image: str, label: int):
    """The whole frame (300 x 451 and 400 x 600 px) resized to the pretrained 224 px by the model itself: the
    explicit timm preprocessing (bicubic, antialiased, clamped, mean = std = 0.5) gives the same logits. Chelsea is a
    tabby: with a centre crop "tiger cat" (282) and "Egyptian cat" (285) are close; the whole frame gives 285."""
    pixels = _pixels(getattr(data, image)())
    explicit = F.interpolate(pixels, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        logits = imagenet_model(pixels)
        expected = imagenet_model.network((explicit - 0.5) / 0.5)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    probs = logits.softmax(-1)
    assert probs.argmax(-1).item() == label and probs[0, label] > 0.5


def test_grey_images_are_the_rgb_image_of_three_equal_channels():
    """28 px grey digits enlarged to 64 px: the same features as the grey image stacked three times, and as the timm
    extractor on the explicitly resized (antialiased bicubic: PIL's kernel) and normalised images."""
    model = TimmImageModel("tf_efficientnet_lite0", pretrained="packaged", input_size=64, channels_last=False).eval()
    grey = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model(grey)
        rgb = model(grey.expand(-1, 3, -1, -1).contiguous())
        upsampled = F.interpolate(grey, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1)
        extractor = timm_backbone("tf_efficientnet_lite0", num_classes=0, pretrained="packaged").eval()
        expected = extractor((upsampled.expand(-1, 3, -1, -1) - 0.5) / 0.5)
    assert features.shape == (3, model.num_features) == (3, 1280)
    torch.testing.assert_close(features, rgb, rtol=0, atol=0)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(28, 28), (20, 40), (300, 200)])
def test_the_resize_is_pils_bicubic_as_in_timms_evaluation_transform(size):
    """timm's evaluation transform resizes with PIL: the adaptation matches PIL's float bicubic (``a = -0.5``),
    enlarging, shrinking and both at once (torch's plain bicubic enlarges with ``a = -0.75``: up to 0.08 off)."""
    from PIL import Image

    model = TimmImageModel("test_efficientnet", input_size=64)
    pixels = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(1))
    adapted = model.adapt(pixels)[0, 0] * model.std[0] + model.mean[0]
    resized = Image.fromarray(pixels[0, 0].numpy(), mode="F").resize((64, 64), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.array(resized)).clamp(0, 1)
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-5)


def test_half_precision_images_are_resized_on_a_cpu():
    """A CPU has no bf16 antialiased resize: it runs in float32, then back in bf16 (under ``bf16-true``)."""
    model = TimmImageModel("test_efficientnet", num_classes=3, input_size=32).to(torch.bfloat16).eval()
    pixels = torch.rand(2, 1, 40, 40)
    adapted = model.adapt(pixels.to(torch.bfloat16))
    assert adapted.dtype == torch.bfloat16
    # bf16 rounds to 2^-8 relative: the pixels and the resized pixels (< 1) once each, divided by the std (0.224),
    # and the normalised value (|v| < 2.3) once: 2 * 2^-8 / 0.224 + 2.3 * 2^-8 < 0.045
    torch.testing.assert_close(adapted.float(), model.adapt(pixels), rtol=0, atol=0.045)
    assert model(pixels.to(torch.bfloat16)).shape == (2, 3)


def test_the_forward_compiles_as_one_graph():
    """No graph break in a compiled forward (the functorch layout check is not traced), and the first batch's
    pixels are still checked."""
    import torch._dynamo

    model = TimmImageModel("test_efficientnet", num_classes=3, input_size=32).eval()
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        torch.compile(model, backend="eager")((torch.rand(2, 1, 28, 28) - 0.5) / 0.5)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(TimmImageModel("test_efficientnet", num_classes=3, input_size=32).eval())(
        torch.rand(2, 1, 28, 28)
    )
    assert explained.graph_break_count == 1  # the eager pixel check of the first batch, nothing else


def test_images_of_the_input_size_are_only_normalised_with_the_pretrained_mean_and_std():
    """timm's ImageNet mean / std for a ResNet config (not EfficientNet-Lite0's 0.5), per channel."""
    model = TimmImageModel("resnet10t", input_size=32)
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.adapt(images), (images - mean) / std)
    assert model.adapt(torch.rand(2, 1, 20, 24)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(2, 2, 28, 28), r"images must be \[B, 1 or 3, H, W\] .* got shape \(2, 2, 28, 28\)"),
        (torch.rand(2, 28, 28), r"got shape \(2, 28, 28\)"),
        ((torch.rand(2, 1, 28, 28) - 0.13) / 0.31, r"pixels in \[0, 1\] .* give the datamodule normalize=False"),
        (torch.linspace(-0.95, 0.95, 2 * 28 * 28).reshape(2, 1, 28, 28),  # in [-1, 1]: named with its range
         r"pixels in \[0, 1\] .* got values in \[-0.95, 0.95\]"),
    ],
)
def test_inputs_it_cannot_adapt_are_explained(images: torch.Tensor, message: str):
    """Refused each time it is given (a notebook re-running a fit), until a batch of pixels passes."""
    model = TimmImageModel("test_efficientnet", input_size=32).eval()
    for _ in range(2):
        with pytest.raises(ValueError, match=message):
            model(images)
    model(torch.rand(2, 1, 28, 28))
    assert model._pixels_checked


@pytest.mark.parametrize("input_size", [0, 7, 32.5, True])
def test_a_bad_input_size_is_named(input_size):
    with pytest.raises(ValueError, match=f"input_size must be None or an int >= 8 .*got {input_size!r}"):
        TimmImageModel("test_efficientnet", input_size=input_size)


def test_a_vit_takes_the_input_size_asked_for():
    """A ViT is built for its input size (timm asserted "Input height (32) doesn't match model (224)" at the first
    forward of a 32 px TimmImageModel)."""
    vit = TimmImageModel("test_vit", input_size=32).eval()
    assert vit.network.patch_embed.img_size == (32, 32)
    assert vit(torch.rand(2, 1, 28, 28)).shape == (2, vit.num_features)


def test_another_input_size_is_another_backbone_for_the_feature_cache():
    """Equal weights resized to another size give other features: the cache's backbone identity tells them apart (it
    served one run's 112 px features to a 64 px run before the adaptation was part of the repr)."""
    from lightning_bayes.models.identity import backbone_identity

    small, large = TimmImageModel("test_efficientnet", input_size=32), TimmImageModel("test_efficientnet", input_size=48)
    large.load_state_dict(small.state_dict())
    same = TimmImageModel("test_efficientnet", input_size=32)
    same.load_state_dict(small.state_dict())
    assert backbone_identity(small) != backbone_identity(large)
    assert backbone_identity(small) == backbone_identity(same)


def test_the_nhwc_layout_gives_the_nchw_outputs():
    torch.manual_seed(0)
    nhwc = TimmImageModel("test_efficientnet", num_classes=3, input_size=32).eval()
    nchw = TimmImageModel("test_efficientnet", num_classes=3, input_size=32, channels_last=False).eval()
    nchw.load_state_dict(nhwc.state_dict())
    images = torch.rand(4, 1, 28, 28)
    assert nhwc.adapt(images).is_contiguous(memory_format=torch.channels_last)
    assert nhwc.network.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(images), nchw(images), rtol=1e-5, atol=1e-5)


def test_per_example_jacobians_run_vectorised_through_the_adaptation():
    """``torch.func``'s vmap over examples (VIKING, the null-space Laplace) passes the resize and the pixel check (not
    taken on batched values): the vectorised Jacobian equals the loop's, with no fallback warning."""
    import warnings

    from lightning_bayes.inference.likelihoods import CategoricalLikelihood
    from lightning_bayes.inference.linalg import LossConstraint, ParameterFunction

    torch.manual_seed(0)
    model = TimmImageModel("test_efficientnet", num_classes=3, input_size=32).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 1])
    constraint = LossConstraint(CategoricalLikelihood())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vectorised = ParameterFunction(model, "last_layer", constraint).jacobian(x, y)
    looped = ParameterFunction(model, "last_layer", constraint, vectorize=False).jacobian(x, y)
    torch.testing.assert_close(vectorised, looped, rtol=1e-5, atol=1e-6)


def test_a_non_bool_channels_last_is_named():
    with pytest.raises(ValueError, match="channels_last must be True or False; got 'yes'"):
        TimmImageModel("test_efficientnet", channels_last="yes")


def test_images_of_the_input_size_are_not_resampled(monkeypatch: pytest.MonkeyPatch):
    """No per-batch resize when the batch already has the input size (it would clamp pixels within the check's
    1e-3 tolerance and cost a resample per batch)."""
    from lightning_bayes.models import timm_images

    model = TimmImageModel("resnet10t", input_size=32)
    calls = []
    real = timm_images.functional.interpolate
    monkeypatch.setattr(timm_images.functional, "interpolate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.adapt(torch.rand(2, 3, 32, 32))
    assert calls == []
    model.adapt(torch.rand(2, 3, 20, 24))
    assert calls == [1]
