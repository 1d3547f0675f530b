"""NullSpaceLaplace on 2 CPU processes (gloo): fitting is refused by name before DDP wraps the module (every sweep
must see all the training batches)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from lightning.pytorch import Trainer

from lightning_bayes.modules import NullSpaceLaplace

from test_nullspace_laplace import make_data, make_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


def test_fitting_on_two_processes_is_refused_by_name() -> None:
    loader, _, _ = make_data()
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    with pytest.raises(Exception, match=r"NullSpaceLaplace fits on one device \(world_size=2\)"):
        trainer.fit(NullSpaceLaplace(make_model()), train_dataloaders=loader)
