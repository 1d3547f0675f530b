"""Lightning's "Found N module(s) in eval mode at the start of training" is quiet for the modules a method keeps in
eval mode on purpose (frozen features, a post-hoc method's network) and shown, as Lightning words it, when a user's
module is in eval mode too; its "configure_optimizers returned None" is quiet for a method whose fit takes no
optimiser steps; the warning filters are as before once the fit loop has started, or after a failed fit."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.models import FrozenFeatures
from lightning_bayes.modules import MAP, NullSpaceLaplace
from lightning_bayes.modules.lightning_notices import modules_kept_in_eval


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 8, generator=generator), torch.arange(16) % 3), batch_size=8)


NOTICES = ("in eval mode at the start of training", "returned `None`, this fit will run with no optimizer")


def notices(module: nn.Module, root: Path) -> list[str]:
    """Lightning's two notices while ``module`` fits for one epoch; asserts the filters are as before."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)  # inside: catch_warnings puts the filters back on exit
        Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                enable_model_summary=False, default_root_dir=root).fit(module, train_dataloaders=loader())
        assert list(warnings.filters) == before
    return [str(w.message) for w in caught if any(notice in str(w.message) for notice in NOTICES)]


def probe() -> nn.Module:
    frozen = FrozenFeatures(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Tanh()))
    return nn.Sequential(frozen, nn.Linear(8, 3))


def test_frozen_features_and_a_post_hoc_network_fit_without_the_notices(tmp_path: Path) -> None:
    module = MAP(probe())
    assert modules_kept_in_eval(module) == ["backbone.0", "backbone.0.backbone", "backbone.0.backbone.0",
                                            "backbone.0.backbone.1", "backbone.0.backbone.2"]
    assert notices(module, tmp_path) == []
    network = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))
    assert notices(NullSpaceLaplace(network, num_samples=2), tmp_path) == []


def test_a_module_the_user_left_in_eval_mode_is_still_noticed(tmp_path: Path) -> None:
    network = probe()
    network[1].eval()  # the trainable head: train() would turn it back, so this one is the user's doing
    assert notices(MAP(network), tmp_path) == [
        ("Found 6 module(s) in eval mode at the start of training. This may lead to unexpected behavior during "
         "training. If this is intentional, you can ignore this warning.")
    ]


def test_a_fit_that_fails_before_its_loop_leaves_no_filter(tmp_path: Path) -> None:
    """A failed sanity check ends the quiet (Lightning tells callbacks, not the module): a later fit of a module the
    user left in eval mode is noticed."""

    class Failing(MAP):
        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            raise RuntimeError("a bug in validation_step")

    before = list(warnings.filters)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="a bug in validation_step"):
        trainer.fit(Failing(probe()), train_dataloaders=loader(), val_dataloaders=loader())
    assert list(warnings.filters) == before


def test_a_post_hoc_fit_failing_before_its_loop_leaves_no_filter(tmp_path: Path) -> None:
    """The no-optimiser quiet starts in configure_optimizers and ends at on_fit_start; a fit failing between them ends
    it by the callback."""

    class Failing(NullSpaceLaplace):
        def on_fit_start(self) -> None:
            raise RuntimeError("a refusal at fit start")

    before = list(warnings.filters)
    network = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="a refusal at fit start"):
        trainer.fit(Failing(network, num_samples=2), train_dataloaders=loader())
    assert list(warnings.filters) == before


def test_a_test_after_a_fit_keeps_the_trainers_callback_without_a_notice(tmp_path: Path, caplog) -> None:
    """configure_callbacks runs at every stage; returning a second EndQuietOnException made Lightning announce that
    it overrides the trainer's one."""
    module = MAP(probe())
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader())
    with caplog.at_level("INFO"):
        trainer.test(module, loader())
    assert "will override existing callbacks" not in caplog.text
    assert sum(type(c).__name__ == "EndQuietOnException" for c in trainer.callbacks) == 1
