"""BLoB under DDP (2 CPU processes, gloo): with one weight draw per step shared by the batch (no local
reparameterisation) and the same generator state on every rank, the two ranks' batches of 4 give the single
process's batch of 8, so the means, the scales and both optimisers' states equal the single-process run's. This
holds only if the NLL gradients (rho's included, which the KL optimiser steps) are averaged across ranks and the KL
step, taken outside the forward pass, is the same on every rank. Float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from torch import nn

from lightning_bayes.modules import BLoB

from ddp_comparison import SameNoise, adamw, assert_ranks_equal_one_process, fit_states

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


class SameNoiseBLoB(SameNoise, BLoB):
    pass


def blob() -> BLoB:
    return SameNoiseBLoB(
        nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double(), params="0.*", prior_scale=0.5,
        init_eps=0.2, kl_lr=0.05, cycle_exponent=40.0, local_reparameterization=False, dataset_size=32,
        optimizer=adamw,
    )


@pytest.mark.slow  # two processes, 25-55 s on 2 cores: CI runs the slow suite too
def test_two_processes_reach_the_single_process_posterior(tmp_path: Path) -> None:
    rank0, rank1, single = fit_states(tmp_path, blob, features=3)
    assert "backbone.0.weight.raw_scale" in single and "backbone.0.weight.mean.exp_avg_sq" in single
    assert_ranks_equal_one_process(rank0, rank1, single)
