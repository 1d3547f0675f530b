"""SWASubspace under FSDP2 and DDP (2 CPU processes, gloo; ``tests/distributed_run.py``): the callback (gathering
FSDP2's sharded parameters with DTensor ``full_tensor``) collects the moments the one-process run collects on the
same global batches, and a run stopped and resumed through the strategy's checkpoint ends with the same moments
and parameters as one that was not stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_run import assert_swag_moments_close, fit_and_resume, fit_in_one_process, swa_subspace_state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch"),
]


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_collect_the_one_process_moments_and_resume_exactly(strategy: str, tmp_path: Path) -> None:
    single = fit_in_one_process(tmp_path / "single", 3, "swa")
    sharded, resumed = fit_and_resume(tmp_path, 3, "swa", strategy=strategy)

    expected = swa_subspace_state(single)["moments"]
    assert expected["count"].item() == 8  # steps 5..12: the snapshots of epochs 2 and 3
    for run in (sharded, resumed):
        # the same iterates up to the summation order of the two ranks' gradient average (float64)
        assert_swag_moments_close(run, expected, rtol=1e-10, atol=1e-12)
        for name, value in single["state_dict"].items():  # full (gathered) parameters in the checkpoint
            torch.testing.assert_close(run["state_dict"][name], value, rtol=1e-10, atol=1e-12, msg=name)
    # stopping and resuming changes nothing: the same sharded computation, bit for bit
    for key, value in swa_subspace_state(sharded)["moments"].items():
        assert torch.equal(swa_subspace_state(resumed)["moments"][key], value), key
