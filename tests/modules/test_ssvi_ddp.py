"""SSVI under DDP (2 CPU processes, gloo): a support update ranks weights by the growth gradient, a gradient of
the masked mean that DDP does not average (it averages parameter gradients only), so the module averages it
across ranks; then every rank drops and grows the same weights and the masks, means, scales and Adam moments equal
the single process's on the same global batches (weight draws shared by the batch, one seeded stream on every
rank: the two ranks' batches of 4 are the single process's batch of 8). Float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_bayes.modules import SSVI

from ddp_comparison import SameNoise, adam, assert_ranks_equal_one_process, fit_states

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


class SameNoiseSSVI(SameNoise, SSVI):
    pass


def network() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def ssvi() -> SSVI:
    return SameNoiseSSVI(network(), density=0.5, update_every=2, drop_fraction=0.3, local_reparameterization=False,
                         dataset_size=32, optimizer=adam)


def test_two_processes_update_the_supports_as_one_process(tmp_path: Path) -> None:
    rank0, rank1, single = fit_states(tmp_path, ssvi, features=6)
    assert int(single["iteration"]) == 8  # updates at iterations 2, 4 and 6 (the last quarter is frozen)
    torch.manual_seed(0)
    initial = SSVI(network(), density=0.5, seed=0).state_dict()
    masks = [name for name in single if name.endswith("mask")]
    assert masks and any(not torch.equal(single[m], initial[m]) for m in masks)  # supports moved
    assert_ranks_equal_one_process(rank0, rank1, single)
