"""IVON under FSDP2 (2 CPU processes, gloo; ``tests/distributed_run.py``): parameters and optimiser state are DTensor
shards, every rank keeps its shard of the one-process noise, so the sharded run follows the one-process run on
the same global batches; the strategy's checkpoint (which keeps only the optimiser's ``state`` and
``param_groups``) carries the Hessian, momentum, noise seed and step, so a resumed run ends as an unstopped one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_run import fit_and_resume, fit_in_one_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch"),
]


def test_sharded_ivon_follows_the_one_process_posterior_and_resumes_exactly(tmp_path: Path) -> None:
    single = fit_in_one_process(tmp_path / "single", 3, "ivon")
    sharded, resumed = fit_and_resume(tmp_path, 3, "ivon")

    expected_state = single["optimizer_states"][0]["state"]
    assert single["optimizer_states"][0]["param_groups"][0]["noise_steps"] == 12  # 3 epochs of 4 steps
    for run in (sharded, resumed):
        group = run["optimizer_states"][0]["param_groups"][0]
        assert (group["noise_seed"], group["noise_steps"]) == (0, 12)
        # the one-process means up to the summation order of the two ranks' gradient average (float64)
        for name, value in single["state_dict"].items():
            torch.testing.assert_close(run["state_dict"][name], value, rtol=1e-9, atol=1e-12, msg=name)
        state = run["optimizer_states"][0]["state"]  # gathered into full tensors
        for index, expected in expected_state.items():
            for key in ("hess", "momentum"):
                torch.testing.assert_close(state[index][key], expected[key], rtol=1e-9, atol=1e-12, msg=key)
    for name, value in sharded["state_dict"].items():  # stopping and resuming changes nothing
        assert torch.equal(resumed["state_dict"][name], value), name
