"""The members of a deep ensemble: M networks given, or M - 1 copies of one network with re-drawn weights.

From one network, the copies share its frozen parameters and its
:class:`~lightning_bayes.models.FrozenFeatures` (feature cache included) and re-draw their trainable parameters
through their layers' own initialisers (``reset_parameters``; peft's ``reset_lora_parameters``). The original
keeps its weights, so a network whose constructor initialises differently from its layers (timm's ResNets zero
the last BatchNorm of each block and draw convolutions by fan-out; Hugging Face models draw N(0, 0.02)) or that
was pretrained would start the members from two different distributions: that is warned, naming the parameters,
and a list of M networks built alike (e.g. one YAML entry repeated) starts every member as its constructor does.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import combinations
from typing import Any, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..checks import is_int
from ..models.frozen import FrozenFeatures

_LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_SPREAD_ELEMENTS = 64  # from this size a tensor's RMS tells its initialiser's scale within about 6%
_SPREAD_RATIO = 2.0  # two draws of one initialiser at 64 elements differ by 2x in RMS practically never


def ensemble_members(backbone: Union[nn.Module, Sequence[nn.Module]], num_members: int | None) -> list[nn.Module]:
    """The M members: ``backbone`` itself if it is a list of networks, else it and ``num_members - 1`` copies
    with re-drawn trainable weights (``num_members`` None: 5)."""
    if isinstance(backbone, nn.Module) and not isinstance(backbone, nn.ModuleList):
        count = 5 if num_members is None else num_members
        if not is_int(count) or count < 2:
            raise ValueError(f"num_members must be an int >= 2 for an ensemble; got {num_members!r}")
        _check_trainable(backbone, "backbone")
        return [backbone, *_redrawn_copies(backbone, count - 1)]
    listed = isinstance(backbone, (nn.ModuleList, Sequence)) and not isinstance(backbone, str)
    members = list(backbone) if listed else None
    if members is None or not all(isinstance(m, nn.Module) for m in members):
        raise ValueError(f"backbone must be a network or a list of networks; got {type(backbone).__name__}")
    if len(members) < 2 or (num_members is not None and num_members != len(members)):
        raise ValueError(
            f"backbone as a list holds the members: at least 2, and num_members (or None) must match; got "
            f"{len(members)} networks and num_members={num_members!r}"
        )
    for index, member in enumerate(members):
        _check_trainable(member, f"backbone[{index}]")
    if len({id(m) for m in members}) < len(members):
        raise ValueError("backbone as a list holds one network more than once: those members would be one network")
    pairs = [] if any(_on_meta(m) for m in members) else combinations(range(len(members)), 2)
    equal = [(i, j) for i, j in pairs if _start_equal(members[i], members[j])]
    if equal:
        rank_zero_warn(
            f"DeepEnsemble: backbone[{equal[0][0]}] and backbone[{equal[0][1]}] start with the same trainable weights "
            "(built under one seed, or pretrained with a zero head): they differ only through training noise"
        )
    return members


def share_structure(members: Sequence[nn.Module]) -> bool:
    """Whether every member is the first's network with other weights: the same module classes and settings (their
    repr: an activation, a dropout rate) and the same parameter and buffer names and shapes. ``vmap`` over stacked
    weights runs every member through the first's modules, so members that differ in anything else loop."""

    def structure(member: nn.Module) -> tuple[object, ...]:
        tensors = [(n, t.shape) for n, t in [*member.named_parameters(), *member.named_buffers()]]
        return repr(member), [(n, type(m)) for n, m in member.named_modules()], tensors

    return all(structure(member) == structure(members[0]) for member in members[1:])


def _on_meta(network: nn.Module) -> bool:
    """Whether ``network`` has parameters without values (built on the meta device, e.g. under Lightning's
    ``init_module(empty_init=True)``): nothing to compare."""
    return any(p.is_meta for p in network.parameters())


def _check_trainable(network: nn.Module, name: str) -> None:
    if not any(p.requires_grad for p in network.parameters()):
        raise ValueError(f"DeepEnsemble needs a {name} with trainable parameters; {type(network).__name__} has none")


def _start_equal(first: nn.Module, second: nn.Module) -> bool:
    mine, theirs = [[p for p in m.parameters() if p.requires_grad] for m in (first, second)]
    return len(mine) == len(theirs) and all(
        a is b or (a.shape == b.shape and torch.equal(a, b)) for a, b in zip(mine, theirs)
    )


def _redrawn_copies(backbone: nn.Module, count: int) -> list[nn.Module]:
    copies = [_copy_sharing_frozen(backbone) for _ in range(count)]
    lora_init = _lora_initialisations(backbone)
    redrawn = [_reinitialise_trainable(member, lora_init) for member in copies]
    kept = _not_redrawn(copies[0], redrawn[0])  # the same names in every copy
    trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]
    if kept and len(kept) == len(trainable):
        raise ValueError(
            f"DeepEnsemble re-initialises each member's trainable parameters through their layers' "
            f"reset_parameters(), but none of {type(backbone).__name__}'s has one (e.g. {kept[:3]}): every member "
            "would be the same network. Build the backbone from layers that do (nn.Linear, nn.Conv2d, ...) or give "
            "the module holding them a reset_parameters(), or pass the members as a list of networks"
        )
    if kept:
        rank_zero_warn(
            f"DeepEnsemble: {len(kept)} trainable parameters of {type(backbone).__name__} have no layer "
            f"reset_parameters() and start equal in every member: {kept[:5]}"
        )
    different = [] if _on_meta(backbone) else _started_differently(backbone, copies[0], redrawn[0])
    if different:
        rank_zero_warn(
            f"DeepEnsemble: the first member keeps {type(backbone).__name__}'s weights as given, the others re-draw "
            f"them through their layers' reset_parameters(), and the two differ in scale for {len(different)} "
            f"trainable parameters (e.g. {different[:4]}): the constructor initialises them its own way, or the "
            "network is pretrained, so the members start from different distributions. Pass backbone as a list of "
            "num_members networks built alike (e.g. one YAML entry repeated) to start each as its constructor does"
            + (" (LoRA adapters re-draw with their config's init_lora_weights when it is True or 'gaussian', as "
               "True otherwise)" if lora_init else "")
        )
    return copies


def _copy_sharing_frozen(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose frozen parameters are the original's tensors and whose
    :class:`~lightning_bayes.models.FrozenFeatures` are the original's modules, feature cache included (the
    ``deepcopy`` memo): M probes on one frozen backbone compute and keep each example's features once, not M times."""
    memo: dict[int, Any] = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo.update({id(m): m for m in module.modules() if isinstance(m, FrozenFeatures)})
    return copy.deepcopy(module, memo)


def _reinitialise_trainable(module: nn.Module, lora_init: dict[str, bool | str]) -> set[int]:
    """Re-draw the trainable parameters the way their layers initialise them: peft LoRA layers through
    ``reset_lora_parameters`` (with ``lora_init``'s scheme for the adapter: A random, B = 0), other layers whose own
    parameters are all trainable through ``reset_parameters``; frozen layers and frozen adapters (shared with the
    original) keep their weights. Returns the ids of the re-drawn parameters."""
    reset_lora = getattr(module, "reset_lora_parameters", None)
    if callable(reset_lora) and isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
        redrawn: set[int] = set()
        # in the layer's order (a set's order of strings changes with PYTHONHASHSEED, and so would the draws)
        for adapter in dict.fromkeys([*_keys(module, "lora_A"), *_keys(module, "lora_embedding_A")]):
            tensors = [t for name in _LORA_FACTORS for t in _adapter_tensors(getattr(module, name, None), adapter)]
            if tensors and all(t.requires_grad for t in tensors):
                reset_lora(adapter, lora_init.get(adapter, True))
                redrawn |= {id(t) for t in tensors}
        return redrawn
    own = list(module.parameters(recurse=False))
    reset = getattr(module, "reset_parameters", None)
    redrawn = set()
    if own and callable(reset) and all(p.requires_grad for p in own):
        reset()
        redrawn = {id(p) for p in own}
    for child in module.children():
        redrawn |= _reinitialise_trainable(child, lora_init)
    return redrawn


def _keys(module: nn.Module, name: str) -> list[str]:
    container = getattr(module, name, None)
    return list(container.keys()) if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) else []


def _adapter_tensors(container: object, adapter: str) -> list[Tensor]:
    """The tensors of ``adapter`` in a LoRA layer's ``lora_A``-like container (modules or parameters by name)."""
    if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter not in container:
        return []
    value = container[adapter]
    return list(value.parameters()) if isinstance(value, nn.Module) else [value]


def _lora_initialisations(network: nn.Module) -> dict[str, bool | str]:
    """Adapter name -> the ``init_lora_weights`` a re-draw uses: the peft config's when ``reset_lora_parameters``
    takes it (True or 'gaussian'), True otherwise (False, 'pissa', 'olora', ...: data- or base-dependent schemes
    that would rewrite the shared base). Empty without peft."""
    found = (getattr(m, "peft_config", None) for m in network.modules())
    configs: dict[str, Any] = next((c for c in found if isinstance(c, dict)), {})
    schemes = {name: getattr(config, "init_lora_weights", True) for name, config in configs.items()}
    return {name: scheme if scheme == "gaussian" else True for name, scheme in schemes.items()}


def _not_redrawn(member: nn.Module, redrawn: set[int]) -> list[str]:
    """The trainable parameters of ``member`` that no layer's reset drew anew (they start equal in every member)."""
    return [name for name, p in member.named_parameters() if p.requires_grad and id(p) not in redrawn]


def _started_differently(original: nn.Module, copy_: nn.Module, redrawn: set[int]) -> list[str]:
    """Names of the re-drawn parameters whose original and re-drawn values cannot come from one initialiser: one
    constant (e.g. zeros) and the other not, two different constants, or, from 64 elements, RMS values more than
    2x apart (two draws of one initialiser differ by about 8% there, N(0, 1) draws by 1.5x once in a thousand; timm's
    fan-out convolutions are 2.45x torch's default)."""
    originals = dict(original.named_parameters())
    return [
        name
        for name, p in copy_.named_parameters()
        if id(p) in redrawn and _scales_differ(originals[name].detach(), p.detach())
    ]


def _scales_differ(first: Tensor, second: Tensor) -> bool:
    if first.numel() < 2:
        return False
    first, second = first.float(), second.float()
    constant = [bool((t == t.reshape(-1)[0]).all()) for t in (first, second)]
    if any(constant):
        return not all(constant) or not torch.equal(first.reshape(-1)[:1], second.reshape(-1)[:1])
    if first.numel() < _SPREAD_ELEMENTS:
        return False
    rms = [float(t.square().mean().sqrt()) for t in (first, second)]
    return max(rms) > _SPREAD_RATIO * min(rms)
