"""Checkpoints without the frozen pretrained base: a LoRA or 4-bit model's state dict holds what training changes.

Under LoRA (peft) or a 4-bit NF4 base (bitsandbytes) the base weights never change after ``from_pretrained``, so
saving them only copies what the constructor rebuilds from the pretrained source: 540 MB per SmolLM2 checkpoint
against the adapters' 1 MB. Worse, a 4-bit base does not load back through ``load_state_dict`` (the NF4
quantisation state comes back as unexpected keys), so fit-then-test from the best checkpoint failed. After
:func:`exclude_frozen_base` the owner's state dict leaves out every entry of ``owner.<attribute>`` that is not a
trainable parameter at that moment (frozen weights, their quantisation state, persistent buffers), and loading
accepts their absence (the module keeps the values it was built with); checkpoints that do hold them still load.
A base frozen later as a whole (a post-hoc head's :class:`~lightning_bayes.models.FrozenFeatures`: 650 MB per
SmolLM2 checkpoint) is left out too while it still holds what the constructor built (its
:func:`~lightning_bayes.models.identity.backbone_identity` then), so weights loaded into it later are saved.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn

from ..params import FSDP1_WRAPPER, is_dtensor
from .identity import backbone_identity
from .weights import persistent_buffers


def _frozen_keys(base: nn.Module, attribute: str) -> tuple[str, ...]:
    """The owner's keys of ``base``'s state-dict entries that are not trainable parameters (a 4-bit weight's
    quantisation state included), as the constructor leaves it: read once, before any strategy wraps the module."""
    return tuple(
        f"{attribute}.{key}"
        for key, value in base.state_dict(keep_vars=True).items()
        if not (isinstance(value, nn.Parameter) and value.requires_grad)
    )


def _frozen_now(base: nn.Module, attribute: str) -> set[str]:
    """The owner's keys of ``base``'s frozen parameters and persistent buffers now, tied names included (as in a state
    dict), from names alone: the same on every rank and without a collective (a nested ``state_dict()`` under FSDP1
    gathers the shards and answers on rank 0 only)."""
    frozen = [name for name, p in base.named_parameters(remove_duplicate=False) if not p.requires_grad]
    return {f"{attribute}.{name.replace(FSDP1_WRAPPER, '')}" for name in [*frozen, *persistent_buffers(base)]}


def _sharded(base: nn.Module) -> bool:
    """Whether a strategy shards ``base`` (FSDP2's DTensors, FSDP1's wrapped units): its values are not whole here."""
    return any(is_dtensor(p) or FSDP1_WRAPPER in name for name, p in base.named_parameters())


class _FrozenBaseHooks:
    """State-dict hooks (a picklable object, so the module still pickles for ``ddp_spawn``) over the owner's
    ``attribute``: ``keys`` were frozen when it was built, ``built`` is its identity then."""

    def __init__(self, attribute: str, keys: tuple[str, ...], built: str) -> None:
        self.attribute, self.keys, self.built = attribute, keys, built
        self._prefixes: list[str] = []

    def _left_out(self, owner: nn.Module) -> set[str]:
        """The frozen entries a checkpoint need not hold: those frozen when built, and those frozen since while the
        base still holds what the constructor built (under a sharding strategy, which hands out shards, that is not
        checked: they are kept)."""
        base = getattr(owner, self.attribute)
        now = _frozen_now(base, self.attribute)
        if now <= set(self.keys) or _sharded(base) or backbone_identity(base) != self.built:
            return set(self.keys)
        return now | set(self.keys)

    def drop(self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
        for key in self._left_out(module):
            state_dict.pop(prefix + key, None)

    def remember_prefix(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._prefixes.append(prefix)

    def allow_missing(self, module: nn.Module, incompatible: Any) -> None:
        prefix = self._prefixes.pop() if self._prefixes else ""
        frozen = set(self.keys) | _frozen_now(getattr(module, self.attribute), self.attribute)
        expected = {(prefix + key).replace(FSDP1_WRAPPER, "") for key in frozen}
        # FSDP1 names the missing keys with its wrapper segments: compared without them
        incompatible.missing_keys[:] = [
            key for key in incompatible.missing_keys if key.replace(FSDP1_WRAPPER, "") not in expected
        ]


def exclude_frozen_base(owner: nn.Module, attribute: str) -> None:
    """Leave the non-trainable entries of ``owner.<attribute>``'s state dict out of ``owner``'s state dict and
    accept their absence when loading (nothing changes while everything trains); call it when the constructor has
    built ``owner.<attribute>`` from its pretrained source."""
    base: nn.Module = getattr(owner, attribute)
    hooks = _FrozenBaseHooks(attribute, _frozen_keys(base, attribute), backbone_identity(base))
    # partials: torch marks its hooks with an attribute, which a bound method cannot take
    owner.register_state_dict_post_hook(partial(hooks.drop))
    owner.register_load_state_dict_pre_hook(partial(hooks.remember_prefix))
    owner.register_load_state_dict_post_hook(partial(hooks.allow_missing))
