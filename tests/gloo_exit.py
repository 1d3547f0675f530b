"""DDP on CPU processes (gloo) whose workers leave the process group before the interpreter shuts down.

Lightning destroys the process group at exit only for NCCL. A gloo group left for interpreter finalisation can
abort a worker that has finished its work ("terminate called without an active exception", SIGABRT): about one
two-process test in ten here, pytorch/pytorch#190489. Destroying the group from an ``atexit`` hook, while the
interpreter is whole, is the fix the PyTorch issue describes. A worker script (``distributed_run.py``) can go
further: once every rank has done its work it leaves without interpreter finalisation at all (``exit_worker``);
CI once saw a two-process FSDP2 worker abort even after it had destroyed its group (not reproduced in 30 runs here).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


def leave_process_group() -> None:
    """Destroy the default process group if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_worker() -> NoReturn:
    """End a distributed worker script: wait for every rank (each has written what it owes), leave the group and
    exit at once (``os._exit``), so that no thread of the group or its store is torn down by finalisation."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class GlooDDP(DDPStrategy):
    """Lightning's ``DDPStrategy`` whose processes leave the process group at exit."""

    def setup_distributed(self) -> None:
        super().setup_distributed()
        atexit.register(leave_process_group)


def spawned_ddp(find_unused_parameters: bool = False) -> GlooDDP:
    """``strategy="ddp_spawn"`` (or ``"ddp_spawn_find_unused_parameters_true"``) with a clean exit."""
    return GlooDDP(start_method="spawn", find_unused_parameters=find_unused_parameters)
