"""NullSpaceLaplace on 2 CPU processes (gloo): fitting is refused by name before DDP wraps the module (every sweep
must see all the training batches), while testing a fitted posterior on two processes gives the one-process NLL."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from lightning.pytorch import Trainer

from lightning_bayes.modules import NullSpaceLaplace

from test_nullspace_laplace import fitted, make_data, make_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


def trainer(devices: int) -> Trainer:
    return Trainer(
        max_epochs=1, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )


def test_fitting_on_two_processes_is_refused_by_name() -> None:
    loader, _, _ = make_data()
    with pytest.raises(Exception, match=r"NullSpaceLaplace fits on one device \(world_size=2\)"):
        trainer(2).fit(NullSpaceLaplace(make_model()), train_dataloaders=loader)


def test_a_fitted_posterior_tests_on_two_processes_as_on_one() -> None:
    module, _, _ = fitted(sweeps=5)
    loader, _, _ = make_data()
    # the two ranks' 10 examples each (DistributedSampler, no padding) average to the 20 examples' NLL
    one = trainer(1).test(module, loader, verbose=False)[0]["test/nll"]
    two = trainer(2).test(module, loader, verbose=False)[0]["test/nll"]
    assert two == pytest.approx(one, rel=1e-6)
