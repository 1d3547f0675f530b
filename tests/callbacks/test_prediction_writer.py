"""PredictionWriter: ``trainer.predict`` writes one CSV row per test example whose values are the predictive's
(model average, arg max, confidence, entropy, mutual information; regression mean and standard deviations in the
data's units), per process under DDP, never over an existing file; ``lightning-bayes predict`` writes it."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_bayes.callbacks import PredictionWriter
from lightning_bayes.cli import run
from lightning_bayes.datamodules import DigitsDataModule, UCIRegressionDataModule
from lightning_bayes.inference.likelihoods import GaussianLikelihood
from lightning_bayes.models import MLP
from lightning_bayes.modules import DeepEnsemble

from cli_helpers import ROOT, quick_args


def read(path: Path) -> tuple[list[str], torch.Tensor]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], torch.tensor([[float(v) for v in row] for row in rows[1:]], dtype=torch.float64)


def predict(module, datamodule, root: Path) -> Path:
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=root, enable_progress_bar=False,
                      callbacks=[PredictionWriter()])
    trainer.predict(module, datamodule=datamodule)
    return root / "predictions.csv"


def test_classification_rows_are_the_model_average_and_its_uncertainties(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DeepEnsemble(MLP(64, 10, hidden=[16]), num_members=3)  # three different members: MI > 0
    data = DigitsDataModule(batch_size=50)
    header, table = read(predict(module, data, tmp_path))
    assert header == ["index", "target", "predicted", "confidence", "entropy", "mutual_information",
                      *[f"prob_{c}" for c in range(10)]]
    x, y = data.test_set.tensors
    with torch.no_grad():
        expected = module.eval().predictive(x)
    assert table.shape == (len(y), 16) and torch.equal(table[:, 0], torch.arange(len(y), dtype=torch.float64))
    assert torch.equal(table[:, 1], y.double()) and torch.equal(table[:, 2], expected.probs.argmax(-1).double())
    for column, value in ((3, expected.max_prob), (4, expected.entropy), (5, expected.mutual_information)):
        torch.testing.assert_close(table[:, column], value.double(), rtol=1e-6, atol=1e-7, msg=header[column])
    torch.testing.assert_close(table[:, 6:], expected.probs.double(), rtol=1e-6, atol=1e-7)
    assert table[:, 5].min() > 0  # the members disagree


def test_regression_rows_are_in_the_datas_units(tmp_path: Path) -> None:
    torch.manual_seed(0)
    likelihood = GaussianLikelihood(output_dim=1, heteroscedastic=True)
    module = DeepEnsemble(MLP(1, 2, hidden=[8]), num_members=3, likelihood=likelihood)  # epistemic spread > 0
    data = UCIRegressionDataModule("mcycle", batch_size=16)
    header, table = read(predict(module, data, tmp_path))
    assert header == ["index", "target", "mean", "std", "epistemic_std", "aleatoric_std"]
    x, y = data.test_set.tensors
    with torch.no_grad():
        expected = module.eval().predictive(x)
    shift, scale = float(data.target_mean), float(data.target_std)
    assert scale > 10  # g units, far from the standardised ones
    parts = (y.reshape(-1) * scale + shift, expected.mean[:, 0] * scale + shift, expected.variance[:, 0].sqrt() * scale,
             expected.epistemic_variance[:, 0].sqrt() * scale, expected.aleatoric_variance[:, 0].sqrt() * scale)
    for column, value in enumerate(parts, start=1):
        torch.testing.assert_close(table[:, column], value.double(), rtol=1e-6, atol=1e-5, msg=header[column])
    assert table[:, 4].min() > 0


class Stream(torch.utils.data.IterableDataset):
    """Examples one by one, without indices Lightning could track."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_without_a_datamodule_or_indices_rows_are_counted_in_model_units(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DeepEnsemble(MLP(3, 2, hidden=[8]), num_members=2, likelihood=GaussianLikelihood(output_dim=2))
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                      callbacks=[PredictionWriter(filename="stream")])
    trainer.predict(module, torch.utils.data.DataLoader(Stream(x, y), batch_size=4))
    header, table = read(tmp_path / "stream.csv")
    assert header == ["index", "target_0", "target_1", "mean_0", "mean_1", "std_0", "std_1", "epistemic_std_0",
                      "epistemic_std_1", "aleatoric_std_0", "aleatoric_std_1"]
    assert torch.equal(table[:, 0], torch.arange(10, dtype=torch.float64))  # 4 + 4 + 2 rows, counted
    with torch.no_grad():
        expected = module.eval().predictive(x)
    torch.testing.assert_close(table[:, 1:3], y.double(), rtol=0, atol=0)
    torch.testing.assert_close(table[:, 3:5], expected.mean.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(table[:, 5:7], expected.variance.sqrt().double(), rtol=1e-6, atol=1e-7)


def test_several_predict_loaders_write_a_file_each(tmp_path: Path) -> None:
    """Every loader's rows went into one file under the first loader's header, with indices restarting at 0: a
    loader with targets and one without (another column count) shared the file."""
    torch.manual_seed(0)
    module = DeepEnsemble(MLP(64, 10, hidden=[16]), num_members=2)
    data = DigitsDataModule()
    data.setup("fit")
    labelled = torch.utils.data.DataLoader(data.test_set, batch_size=50)
    unlabelled = torch.utils.data.DataLoader(data.test_set.tensors[0][:7], batch_size=4)
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                      callbacks=[PredictionWriter()])
    trainer.predict(module, {"labelled": labelled, "unlabelled": unlabelled})  # a dict (IndexError) or a list
    (first_header, first), (second_header, second) = (read(tmp_path / f"predictions_dataloader_idx_{k}.csv")
                                                      for k in (0, 1))
    assert first_header[:2] == ["index", "target"] and first.shape[0] == len(data.test_set)
    assert second_header[:2] == ["index", "predicted"] and torch.equal(second[:, 0], torch.arange(7.0).double())
    assert not (tmp_path / "predictions.csv").exists()
    (tmp_path / "predictions_dataloader_idx_1.csv").unlink()  # one loader's file of the first run deleted
    trainer.predict(module, {"labelled": labelled, "unlabelled": unlabelled})
    writer = next(c for c in trainer.callbacks if isinstance(c, PredictionWriter))
    assert [p.name for p in writer.paths] == [  # one number for the run, not one per loader
        "predictions_dataloader_idx_0-1.csv", "predictions_dataloader_idx_1-1.csv"]


def test_each_process_writes_its_own_file_and_none_is_overwritten(tmp_path: Path) -> None:
    (tmp_path / "predictions-rank1.csv").write_text("kept")
    writer = PredictionWriter()
    writer.on_predict_start(SimpleNamespace(log_dir=str(tmp_path), world_size=2, global_rank=1, fast_dev_run=0), None)
    assert writer.path == tmp_path / "predictions-rank1-1.csv"
    assert (tmp_path / "predictions-rank1.csv").read_text() == "kept"
    rank0 = PredictionWriter()  # rank 0's file is free, but the run's number is the one every rank's file has free
    rank0.on_predict_start(SimpleNamespace(log_dir=str(tmp_path), world_size=2, global_rank=0, fast_dev_run=0), None)
    assert rank0.path == tmp_path / "predictions-rank0-1.csv"


def test_a_non_predictive_output_and_a_path_as_filename_are_refused(tmp_path: Path) -> None:
    for name in ("out/predictions", "predictions.csv", ".."):  # the stem: "predictions.csv" wrote predictions.csv.csv
        with pytest.raises(ValueError, match="filename must be a plain file stem"):
            PredictionWriter(filename=name)
    with pytest.raises(ValueError, match="filename must be a plain file stem such as 'predictions'; got 3"):
        PredictionWriter(filename=3)  # type: ignore[arg-type]  # pathlib's TypeError named no argument
    writer = PredictionWriter()
    with pytest.raises(TypeError, match="CategoricalPredictive or GaussianPredictive; got Tensor"):
        writer.write_on_batch_end(None, None, torch.zeros(2, 3), [0, 1], (torch.zeros(2, 4), torch.zeros(2)), 0, 0)


def test_the_cli_predict_subcommand_writes_every_test_example(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = ROOT / "configs" / "digits" / "map.yaml"
    run([*quick_args(config, tmp_path, batches=1), "--test_after_fit=false"])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        cli = run(["predict", "--config", str(config), f"--trainer.logger.init_args.save_dir={tmp_path}",
                   "--ckpt_path", str(checkpoint)])
    assert cli.trainer.predict_loop.predictions == []  # rows written as they come, no predictive kept as well
    written = list(tmp_path.rglob("predictions.csv"))
    assert len(written) == 1 and written[0].parent.name == "version_1"  # a new version next to the fit's
    assert f"PredictionWriter: wrote {written[0]}" in caplog.text  # the command says where
    _, table = read(written[0])
    assert table.shape[0] == 360 and sorted(table[:, 0].tolist()) == list(range(360))  # the digits test split
    torch.testing.assert_close(table[:, 6:].sum(1), torch.ones(360, dtype=torch.float64), rtol=0, atol=1e-6)


def test_a_predict_over_empty_loaders_names_no_file(tmp_path: Path) -> None:
    """Lightning skips ``on_predict_start`` when every loader is empty: ``path`` named the previous run's file."""
    module = DeepEnsemble(MLP(3, 2, hidden=[8]), num_members=2)
    writer = PredictionWriter()
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                      callbacks=[writer])
    data = torch.utils.data.TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    trainer.predict(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert writer.path == tmp_path / "predictions.csv"
    trainer.predict(module, torch.utils.data.DataLoader(torch.utils.data.Subset(data, []), batch_size=2))
    assert writer.path is None
