"""DDP on CPU processes (gloo) whose workers leave the process group before the interpreter shuts down.

Lightning destroys the process group at exit only for NCCL. A gloo group left for interpreter finalisation can
abort a worker that has finished its work ("terminate called without an active exception", SIGABRT): about one
two-process test in ten here, pytorch/pytorch#190489. Destroying the group from an ``atexit`` hook, while the
interpreter is whole, is the fix the PyTorch issue describes.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


def leave_process_group() -> None:
    """Destroy the default process group if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class GlooDDP(DDPStrategy):
    """Lightning's ``DDPStrategy`` whose processes leave the process group at exit."""

    def setup_distributed(self) -> None:
        super().setup_distributed()
        atexit.register(leave_process_group)


def spawned_ddp(find_unused_parameters: bool = False) -> GlooDDP:
    """``strategy="ddp_spawn"`` (or ``"ddp_spawn_find_unused_parameters_true"``) with a clean exit."""
    return GlooDDP(start_method="spawn", find_unused_parameters=find_unused_parameters)
