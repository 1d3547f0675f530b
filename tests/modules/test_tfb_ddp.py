"""TrainingFreeBayes on 2 CPU processes (gloo) against one process on the same batches: the search takes no
gradient over a frozen model (DDP still wraps it: ``BayesianModule.setup``), each rank sums its anchor batches'
NLLs with the draws of their global batch index and the sums are added across ranks, so every candidate's
criterion, every decision and the found sigma are the one-process search's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from ddp_comparison import rank_states, spawn_trainer
from shards import AlternateBatches
from test_tfb_search import _loader, _module

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


class Recorder(Callback):
    """Each rank writes every epoch's candidate and criterion and the final bracket to ``rank<r>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.logged = folder, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        self.logged.append([float(metrics["train/candidate"]), float(metrics["train/relative_nll_change"])])

    def on_train_end(self, trainer, pl_module) -> None:
        bracket = [float(getattr(pl_module, name)) for name in ("sigma", "low", "high")]
        torch.save({"logged": torch.tensor(self.logged, dtype=torch.float64), "bracket": bracket},
                   self.folder / f"rank{trainer.global_rank}.pt")


def search(folder: Path, devices: int) -> list[dict]:
    folder.mkdir()
    data = _loader().dataset
    spawn_trainer(devices, [Recorder(folder)], max_epochs=8, limit_val_batches=0).fit(
        _module(), DataLoader(data, batch_size=16, sampler=AlternateBatches(len(data), 16))
    )
    return rank_states(folder)


@pytest.mark.slow  # two processes, 25-55 s on 2 cores: CI runs the slow suite too
def test_two_processes_search_as_one_process(tmp_path: Path) -> None:
    single = search(tmp_path / "single", 1)[0]
    ranks = search(tmp_path / "ddp", 2)
    assert len(ranks) == 2 and ranks[0]["bracket"] == ranks[1]["bracket"] == single["bracket"]
    assert single["bracket"][0] > 1e-3  # a candidate met the tolerance
    # sums of the same four batch NLLs in another order: float64 round-off
    torch.testing.assert_close(ranks[0]["logged"], single["logged"], rtol=1e-12, atol=0)
    torch.testing.assert_close(ranks[1]["logged"], single["logged"], rtol=0, atol=0)
