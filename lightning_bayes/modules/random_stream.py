"""The global random stream (torch's CPU and CUDA generators) as checkpoint state.

Dropout masks, weight noise and sampled predictives draw from torch's global generators, which Lightning does
not checkpoint: a resumed fit would restart them from ``seed_everything`` and train on other draws than the
unstopped fit. :class:`~lightning_bayes.modules.base.BayesianModule` saves them with every checkpoint and
restores them on loading.
"""

from __future__ import annotations

from typing import Any

import torch


def global_rng_states() -> dict[str, Any]:
    """The global CPU (and, where present, every CUDA device's) generator states."""
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to ``states`` (from :func:`global_rng_states`)."""
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
