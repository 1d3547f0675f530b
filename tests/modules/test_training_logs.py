"""The objective's parts are logged only at the steps whose logs Lightning writes, and what is written is what
logging them at every step wrote; the total is logged at every step."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_bayes.modules import VariationalInference

from toy_classification import blobs, classifier


class CountLogs(Callback):
    """Records, per training step, the names the module logs (``self.log`` calls) during it."""

    def __init__(self) -> None:
        self.logged: dict[str, list[int]] = {}

    def on_train_start(self, trainer, module) -> None:
        log = module.log

        def recording_log(name: str, *args, **kwargs) -> None:
            if trainer.training:
                self.logged.setdefault(name, []).append(trainer.global_step + 1)  # the batch under way, from 1
            log(name, *args, **kwargs)

        module.log = recording_log


def written_rows(root: Path, every: int, counter: CountLogs) -> list[dict[str, str]]:
    """Train 12 steps of mean-field VI (seeded) with ``log_every_n_steps=every``; the CSV logger's step rows."""
    torch.manual_seed(0)
    module = VariationalInference(classifier(), init_scale=0.1, dataset_size=24)
    trainer = Trainer(
        max_epochs=4, accelerator="cpu", logger=CSVLogger(root, name="logs"), log_every_n_steps=every,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[counter],
    )
    trainer.fit(module, DataLoader(blobs(24), batch_size=8))
    (path,) = root.rglob("metrics.csv")
    with path.open() as file:
        return [row for row in csv.DictReader(file) if row.get("train/loss")]


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_parts_are_logged_at_written_steps_and_written_as_when_logged_every_step(tmp_path: Path) -> None:
    every_step, every_fifth = CountLogs(), CountLogs()
    all_rows = written_rows(tmp_path / "one", 1, every_step)
    rows = written_rows(tmp_path / "five", 5, every_fifth)
    assert every_step.logged["train/kl"] == every_step.logged["train/loss"] == list(range(1, 13))
    # the parts only at the 5th and 10th batches, whose logs Lightning writes (rows of steps 4 and 9, from 0)
    assert every_fifth.logged["train/kl"] == every_fifth.logged["train/nll"] == [5, 10]
    assert every_fifth.logged["train/loss"] == list(range(1, 13))
    assert [row["step"] for row in rows] == ["4", "9"]
    by_step = {row["step"]: row for row in all_rows}
    for row in rows:
        for name in ("train/loss", "train/nll", "train/kl", "train/kl_scale"):
            assert row[name] == by_step[row["step"]][name]
