"""NullSpaceLaplace on 2 CPU processes (gloo): fitting is refused by name before DDP wraps the module (every sweep
must see all the training batches)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from lightning_bayes.modules import NullSpaceLaplace

from ddp_comparison import spawn_trainer
from test_nullspace_laplace import make_data, make_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


def test_fitting_on_two_processes_is_refused_by_name() -> None:
    loader, _, _ = make_data()
    with pytest.raises(Exception, match=r"NullSpaceLaplace fits on one device \(world_size=2\)"):
        spawn_trainer(2, [], max_epochs=1).fit(NullSpaceLaplace(make_model()), train_dataloaders=loader)
