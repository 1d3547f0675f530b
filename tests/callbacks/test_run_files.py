"""Run files never overwrite: name.json, name-1.json, ..."""

import json

from lightning.pytorch import Trainer

from lightning_bayes.callbacks import CalibrationMetrics, PredictionWriter
from lightning_bayes.callbacks.run_files import loader_suffixes, unique_path, write_json
from lightning_bayes.datamodules import DigitsDataModule
from lightning_bayes.models import MLP
from lightning_bayes.modules import MAP


def test_write_json_never_overwrites(tmp_path):
    first = write_json(tmp_path / "run", "metrics", {"acc": 1.0})
    second = write_json(tmp_path / "run", "metrics", {"acc": 0.5})
    assert (first.name, second.name) == ("metrics.json", "metrics-1.json")
    assert json.loads(first.read_text()) == {"acc": 1.0} and json.loads(second.read_text()) == {"acc": 0.5}
    assert unique_path(tmp_path / "run", "metrics", ".json").name == "metrics-2.json"
    assert unique_path(tmp_path / "run", "plot", ".png").name == "plot.png"


def test_non_finite_values_are_written_as_standard_json_nulls(tmp_path):
    """``json.dump`` alone wrote a diverged run's NaN NLL as a bare ``NaN``, which strict JSON readers refuse."""
    data = {"nll": float("nan"), "acc": 0.5, "bins": [1.0, float("inf"), -float("inf")], "nested": {"x": float("nan")}}
    text = write_json(tmp_path, "metrics", data).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"nll": None, "acc": 0.5, "bins": [1.0, None, None], "nested": {"x": None}}


def test_fast_dev_run_writes_no_files(tmp_path):
    """Lightning turns its loggers and checkpoints off under ``fast_dev_run``; the library's run files stay off too
    (without a logger they would land in the root folder)."""
    trainer = Trainer(
        fast_dev_run=True, default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, callbacks=[CalibrationMetrics(), PredictionWriter()],
    )  # fmt: skip
    model, data = MAP(MLP(64, 10, hidden=[16])), DigitsDataModule(batch_size=50)
    trainer.fit(model, datamodule=data)
    assert trainer.test(model, datamodule=data, verbose=False)[0]["test/cal/nll"] > 0  # still computed
    assert len(trainer.predict(model, datamodule=data)) == 1  # one batch
    assert list(tmp_path.rglob("*")) == []


def test_a_plot_and_its_data_take_one_free_stem(tmp_path):
    """Only ``reliability.json`` exists (e.g. a user deleted the PNG): the new pair is ``reliability-1.png`` and
    ``reliability-1.json``, not ``reliability.png`` beside ``reliability-1.json``."""
    (tmp_path / "reliability.json").write_text("{}")
    png = unique_path(tmp_path, "reliability", ".png", ".json")
    assert png.name == "reliability-1.png"
    assert write_json(tmp_path, png.stem, {"a": 1}).name == "reliability-1.json"
    assert unique_path(tmp_path, "reliability", ".png").name == "reliability.png"  # without a companion: its own


def test_loader_suffixes_name_every_loader_once_there_are_two_or_more():
    """As Lightning names a step's logs: no suffix for one loader, ``/dataloader_idx_k`` for each of several."""
    loader = object()  # a pytree leaf, as a DataLoader is; only the count matters
    assert loader_suffixes(loader) == loader_suffixes([loader]) == [""]
    assert loader_suffixes([loader, loader]) == ["/dataloader_idx_0", "/dataloader_idx_1"]
    assert loader_suffixes({"a": loader, "b": loader, "c": loader}) == [f"/dataloader_idx_{k}" for k in range(3)]
