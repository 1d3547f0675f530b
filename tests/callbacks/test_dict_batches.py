"""A user's module whose batches are dicts ({"image": x, "label": y}) with every callback that reads batches, given
``target_key``/``input_key``: each gives what it gives the same module on (x, y) tuples."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_bayes.callbacks import CalibrationMetrics, CurveTraining, PredictionWriter, SWASubspace
from lightning_bayes.predictive import CategoricalPredictive, Predictive

from calibration_toys import blobs

pytestmark = pytest.mark.usefixtures("single_thread")
KEYS = {"target_key": "label", "input_key": "image"}


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[index], "label": self.y[index]}


class Classifier(LightningModule):
    """Any module with BatchNorm; ``dict_batches`` says how its batches come."""

    def __init__(self, dict_batches: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dict_batches = dict_batches
        self.net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _split(self, batch):
        return (batch["image"], batch["label"]) if self.dict_batches else batch

    def predictive(self, x: torch.Tensor, num_samples: int | None = None) -> Predictive:
        return CategoricalPredictive(self(x).unsqueeze(0))

    def training_step(self, batch, batch_idx):
        x, y = self._split(batch)
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = self._split(batch)
        return F.cross_entropy(self(x), y)

    def predict_step(self, batch, batch_idx):
        return self.predictive(self._split(batch)[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(dict_batches: bool, seed: int = 0) -> DataLoader:
    x, y = blobs(48, seed)
    return DataLoader(DictDataset(x, y) if dict_batches else TensorDataset(x, y), batch_size=16)


def run(dict_batches: bool, root: Path) -> dict:
    keys = KEYS if dict_batches else {}
    calibration, curve = CalibrationMetrics(plots=False, **keys), CurveTraining(params="net.3.*", plots=False, **keys)
    swa = SWASubspace(params="all", start_epoch=0, max_rank=2, **keys)
    module = Classifier(dict_batches)
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root,
                      enable_checkpointing=False, enable_model_summary=False, callbacks=[calibration, curve, swa])
    trainer.fit(module, loader(dict_batches))
    trainer.test(module, loader(dict_batches, seed=1))
    with swa.swa(module, batches=loader(dict_batches)):
        statistics = module.net[1].running_mean.clone()
    writer = PredictionWriter(target_key=keys.get("target_key"))
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root,
            callbacks=[writer]).predict(module, loader(dict_batches, seed=1))
    with open(root / "predictions.csv", newline="") as handle:
        table = list(csv.reader(handle))
    return {"metrics": calibration.last_metrics, "grid": curve.grid_values["test"], "swa_bn": statistics,
            "table": table}


def test_dict_batches_score_as_tuples_do(tmp_path: Path) -> None:
    tuples, dicts = run(False, tmp_path / "tuples"), run(True, tmp_path / "dicts")
    assert dicts["metrics"] == tuples["metrics"] and "test/cal/nll" in dicts["metrics"]
    assert dicts["grid"] == tuples["grid"]
    assert torch.equal(dicts["swa_bn"], tuples["swa_bn"])
    assert dicts["table"] == tuples["table"] and dicts["table"][0][:2] == ["index", "target"]


def test_a_dict_batch_without_target_key_is_refused_by_name(tmp_path: Path) -> None:
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, callbacks=[CalibrationMetrics(plots=False)])
    with pytest.raises(ValueError, match=r"CalibrationMetrics got a dict batch \(keys \['image', 'label'\]\); give "
                       "target_key"):
        trainer.test(Classifier(dict_batches=True), loader(True))
