"""CalibrationMetrics on a tiny linear model through a real Trainer: logged values, files, limits, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from calibration_toys import LinearModel, ToyData, ToyDataWithOOD
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from lightning_bayes.callbacks import CalibrationMetrics
from lightning_bayes.metrics import classification_metrics, ood_metrics, ood_score, regression_metrics
from lightning_bayes.plots import ReliabilityBins
from lightning_bayes.predictive import CategoricalPredictive

CLASSIFICATION_KEYS = {"acc", "nll", "brier", "ece", "mce", "aece", "entropy", "mi", "ood_auroc", "ood_fpr95"}


def make_trainer(tmp_path: Path, callback: CalibrationMetrics, **kwargs: object) -> Trainer:
    return Trainer(
        max_epochs=1,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[callback],
        **kwargs,
    )


def direct_classification(model: LinearModel, data: ToyDataWithOOD, num_samples: int) -> dict[str, float]:
    """Every test metric computed in one go on the whole test set and the whole OOD set."""
    x, y = data.test.tensors
    with torch.no_grad():
        predictive, ood = model.predictive(x, num_samples), model.predictive(data.ood.tensors[0], num_samples)
    collection = classification_metrics()
    collection.update(predictive, y)
    values = {name: value.item() for name, value in collection.compute().items()}
    scores_id, scores_ood = ood_score(predictive).numpy(), ood_score(ood).numpy()
    values["ood_auroc"] = roc_auc_score(
        np.r_[np.zeros(len(scores_id)), np.ones(len(scores_ood))], np.r_[scores_id, scores_ood]
    )
    threshold = np.sort(scores_id)[int(np.ceil(0.95 * len(scores_id))) - 1]  # keeps 57 of 60 ID examples
    values["ood_fpr95"] = float((scores_ood <= threshold).mean())
    probs = predictive.probs.numpy()
    assert values["acc"] == pytest.approx((probs.argmax(-1) == y.numpy()).mean(), abs=1e-7)
    assert values["nll"] == pytest.approx(-np.log(probs[np.arange(len(y)), y.numpy()]).mean(), rel=1e-5)
    return values


def test_classification_fit_and_test_log_the_direct_values_and_write_files(tmp_path: Path) -> None:
    model, data, callback = LinearModel(num_samples=3), ToyDataWithOOD(), CalibrationMetrics(ood_stages=["val", "test"])
    trainer = make_trainer(tmp_path, callback)
    trainer.fit(model, datamodule=data)
    assert {"val/cal/ece", "val/ood/auroc", "val/ood/fpr95"} <= set(trainer.callback_metrics)

    results = trainer.test(model, datamodule=data, verbose=False)[0]
    expected = direct_classification(model, data, num_samples=3)
    for key, value in expected.items():
        logged = f"test/ood/{key[4:]}" if key.startswith("ood_") else f"test/cal/{key}"
        # the callback pools batches of 16 in float32 sums: agreement to float32 round-off
        assert results[logged] == pytest.approx(value, rel=1e-5, abs=1e-6), logged
        assert callback.last_metrics[logged] == pytest.approx(results[logged], rel=1e-7)

    folder = Path(trainer.log_dir)
    written = json.loads((folder / "metrics.json").read_text())
    assert set(written) == CLASSIFICATION_KEYS
    assert written["ece"] == pytest.approx(expected["ece"], rel=1e-5)
    assert (folder / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bins = ReliabilityBins.from_dict(json.loads((folder / "reliability.json").read_text()))
    assert bins.count.sum() == len(data.test) and bins.ece == pytest.approx(expected["ece"], rel=1e-5)
    csv = pd.read_csv(folder / "metrics.csv")
    assert csv["val/cal/acc"].notna().sum() == 1 and csv["test/cal/acc"].notna().sum() == 1

    # testing again from the checkpoint writes new files next to the first ones instead of overwriting them
    trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)
    assert json.loads((folder / "metrics.json").read_text()) == written
    assert set(json.loads((folder / "metrics-1.json").read_text())) == CLASSIFICATION_KEYS
    assert (folder / "reliability-1.png").exists() and (folder / "reliability-1.json").exists()
    # a diagram deleted by hand: the next pair still shares one stem (not reliability.png beside reliability-2.json)
    (folder / "reliability.png").unlink()
    trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)
    assert (folder / "reliability-2.png").exists() and (folder / "reliability-2.json").exists()
    assert not (folder / "reliability.png").exists()
    for old in folder.glob("reliability*"):  # a PNG free at 'reliability' but not its JSON, and the reverse at '-1'
        old.unlink()
    (folder / "reliability-1.json").write_text("{}")
    (folder / "reliability.png").write_bytes(b"")
    trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)
    assert (folder / "reliability-2.png").exists() and (folder / "reliability-2.json").exists()
    assert not (folder / "reliability.json").exists()


class TwoTestSets(ToyDataWithOOD):
    """The test split and the validation split as two test loaders."""

    def test_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        return [DataLoader(self.test, batch_size=self.batch_size), DataLoader(self.val, batch_size=self.batch_size)]


class MultiLoaderModel(LinearModel):
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        return super().test_step(batch, batch_idx)


def test_several_test_loaders_are_scored_apart(tmp_path: Path) -> None:
    """Two test loaders were pooled into one set of metrics (and one reliability diagram): each is scored on its own
    now, under Lightning's ``/dataloader_idx_k`` names, each against the whole OOD set."""
    model, data = MultiLoaderModel(num_samples=3), TwoTestSets()
    trainer = make_trainer(tmp_path, CalibrationMetrics())
    results = trainer.test(model, datamodule=data, verbose=False)
    first, sizes = direct_classification(model, data, num_samples=3), (len(data.test), len(data.val))
    data.test = data.val
    second = direct_classification(model, data, num_samples=3)
    logged = {**results[0], **results[1]}
    for key in ("acc", "nll", "ece", "ood_auroc"):
        name = f"test/ood/{key[4:]}" if key.startswith("ood_") else f"test/cal/{key}"
        assert logged[f"{name}/dataloader_idx_0"] == pytest.approx(first[key], rel=1e-5, abs=1e-6), name
        assert logged[f"{name}/dataloader_idx_1"] == pytest.approx(second[key], rel=1e-5, abs=1e-6), name
    folder = Path(trainer.log_dir)
    written = json.loads((folder / "metrics.json").read_text())
    assert set(written) == {f"{key}/dataloader_idx_{k}" for key in CLASSIFICATION_KEYS for k in (0, 1)}
    assert written["ece/dataloader_idx_1"] == pytest.approx(second["ece"], rel=1e-5)
    for stem, size in zip(("reliability_dataloader_idx_0", "reliability_dataloader_idx_1"), sizes):
        bins = ReliabilityBins.from_dict(json.loads((folder / f"{stem}.json").read_text()))
        assert bins.count.sum() == size and (folder / f"{stem}.png").exists()


class TwoValSets(ToyDataWithOOD):
    """Two validation loaders of 6 and 2 batches of 8."""

    def val_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        short = torch.utils.data.Subset(self.val, range(16))
        return [DataLoader(self.val, batch_size=self.batch_size), DataLoader(short, batch_size=self.batch_size)]


class MultiValModel(LinearModel):
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        return super().validation_step(batch, batch_idx)


def test_each_loaders_ood_metrics_see_as_many_ood_batches_as_it_ran(tmp_path: Path) -> None:
    """Loader 1 ran 2 batches, so its OOD AUROC takes the first 2 OOD batches, whatever other loaders ran (it took the
    6 + 2 batches of both loaders, i.e. all 36 OOD examples)."""
    model, data = MultiValModel(num_samples=3), TwoValSets(batch_size=8)
    callback = CalibrationMetrics(plots=False, ood_stages=["val", "test"])
    results = make_trainer(tmp_path, callback).validate(model, datamodule=data, verbose=False)
    with torch.no_grad():
        short = model.predictive(data.val.tensors[0][:16], 3)
        ood = [model.predictive(data.ood.tensors[0][:count], 3) for count in (36, 16)]
    for idx, (inside, outside) in enumerate([(model.predictive(data.val.tensors[0], 3), ood[0]), (short, ood[1])]):
        collection = ood_metrics()
        collection.update(inside.detach(), False)
        collection.update(outside.detach(), True)
        expected = collection.compute()["auroc"].item()
        assert results[idx][f"val/ood/auroc/dataloader_idx_{idx}"] == pytest.approx(expected, rel=1e-6), idx


def test_recomputes_the_predictive_when_the_module_returns_a_loss(tmp_path: Path) -> None:
    """num_samples=5 differs from the module's 2, and the step outputs are losses: predictive(x, 5) is used."""
    model, data = LinearModel(returns_predictive=False, num_samples=2), ToyDataWithOOD()
    trainer = make_trainer(tmp_path, CalibrationMetrics(num_samples=5, plots=False))
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    expected = direct_classification(model, data, num_samples=5)
    assert results["test/cal/nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert results["test/ood/auroc"] == pytest.approx(expected["ood_auroc"], rel=1e-6)
    assert results["test/cal/mi"] != pytest.approx(direct_classification(model, data, num_samples=2)["mi"], rel=1e-3)
    assert not (Path(trainer.log_dir) / "reliability.png").exists()



class AskedModel(LinearModel):
    """A LinearModel that records the ``num_samples`` its predictive is asked for."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.asked: list[int] = []

    def predictive(self, x: torch.Tensor, num_samples: int) -> CategoricalPredictive:
        self.asked.append(num_samples)
        return super().predictive(x, num_samples)


def test_a_returned_predictive_of_another_sample_count_is_recomputed_with_the_callbacks(tmp_path: Path) -> None:
    """The steps return 2-sample predictives but num_samples=5: the callback asks for 5 and logs their NLL."""
    model, data = AskedModel(num_samples=2), ToyDataWithOOD()
    trainer = make_trainer(tmp_path, CalibrationMetrics(num_samples=5, plots=False))
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    batches = trainer.num_test_batches[0]
    assert model.asked.count(2) == batches and model.asked.count(5) >= batches  # every step's, then the callback's
    model.asked.clear()
    expected = direct_classification(model, data, num_samples=5)
    assert results["test/cal/nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert results["test/cal/nll"] != pytest.approx(direct_classification(model, data, 2)["nll"], rel=1e-3)


class PlainClassifier(LinearModel):
    """The README's own-module recipe: no ``num_samples`` attribute, ``predictive(x, num_samples=None)`` returning
    ``CategoricalPredictive(self(x).unsqueeze(0))``, steps returning losses."""

    def __init__(self) -> None:
        super().__init__(returns_predictive=False)
        del self.num_samples
        self.asked: list[int | None] = []

    def predictive(self, x: torch.Tensor, num_samples: int | None = None) -> CategoricalPredictive:
        self.asked.append(num_samples)
        return CategoricalPredictive(self.net(x).unsqueeze(0))


def test_a_module_without_num_samples_gets_its_own_default(tmp_path: Path) -> None:
    model, data = PlainClassifier(), ToyDataWithOOD()
    results = make_trainer(tmp_path, CalibrationMetrics(plots=False)).test(model, datamodule=data, verbose=False)[0]
    x, y = data.test.tensors
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model.net(x), y).item()
    assert results["test/cal/nll"] == pytest.approx(expected, rel=1e-5)
    assert model.asked and set(model.asked) == {None}


def test_ood_batches_are_limited_like_the_in_distribution_batches(tmp_path: Path) -> None:
    model, data = LinearModel(), ToyDataWithOOD(batch_size=8)
    trainer = make_trainer(tmp_path, CalibrationMetrics(plots=False), limit_test_batches=2)
    trainer.test(model, datamodule=data, verbose=False)
    assert data.ood.reads == 2 * 8  # 2 of the 5 OOD batches, as for the 2 test batches

    data_unlimited = ToyDataWithOOD(batch_size=8)
    make_trainer(tmp_path, CalibrationMetrics(plots=False)).test(model, datamodule=data_unlimited, verbose=False)
    assert data_unlimited.ood.reads == 36


def test_at_test_every_ood_batch_is_scored_when_the_test_set_is_smaller() -> None:
    """16 test examples (2 batches) and 36 OOD examples (5 batches): without limit_test_batches the test scores all
    36 (limiting them to the test's batch count is for validation and limited tests only)."""
    import tempfile

    model, data = LinearModel(), ToyDataWithOOD(batch_size=8)
    data.test = torch.utils.data.TensorDataset(*(t[:16] for t in data.test.tensors))
    with tempfile.TemporaryDirectory() as folder:
        make_trainer(Path(folder), CalibrationMetrics(plots=False)).test(model, datamodule=data, verbose=False)
    assert data.ood.reads == 36


def test_by_default_validation_runs_without_the_ood_pass(tmp_path: Path) -> None:
    model, data = LinearModel(), ToyDataWithOOD(batch_size=8)
    trainer = make_trainer(tmp_path, CalibrationMetrics(plots=False))
    trainer.fit(model, datamodule=data)
    assert data.ood.reads == 0 and not any(name.startswith("val/ood/") for name in trainer.callback_metrics)
    assert "val/cal/nll" in trainer.callback_metrics
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    assert data.ood.reads == 36 and "test/ood/auroc" in results


def test_without_ood_data_only_calibration_is_logged(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, CalibrationMetrics(plots=False))
    results = trainer.test(LinearModel(), datamodule=ToyData(), verbose=False)[0]
    assert not any(name.startswith("test/ood/") for name in results)
    assert set(json.loads((Path(trainer.log_dir) / "metrics.json").read_text())) == CLASSIFICATION_KEYS - {
        "ood_auroc",
        "ood_fpr95",
    }


def test_regression_logs_reg_metrics_and_draws_the_band(tmp_path: Path) -> None:
    model, data = LinearModel(regression=True, num_samples=4), ToyData(regression=True)
    trainer = make_trainer(tmp_path, CalibrationMetrics())
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    x, y = data.test.tensors
    collection = regression_metrics()
    with torch.no_grad():
        collection.update(model.predictive(x, 4), y)
    for name, value in collection.compute().items():
        assert results[f"test/reg/{name}"] == pytest.approx(value.item(), rel=1e-5), name
    folder = Path(trainer.log_dir)
    assert set(json.loads((folder / "metrics.json").read_text())) == {"nll", "rmse", "crps", "coverage90"}
    assert (folder / "predictive_band.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val/reg/crps" in pd.read_csv(folder / "metrics.csv").columns


def test_the_band_shows_the_test_data_and_predictive_in_original_units(tmp_path: Path, monkeypatch) -> None:
    """mcycle's band was drawn in standardised units (x from -1.65 to 2.32 for times of 3.2 to 55 ms) under the
    labels "x" and "y": it now shows the raw test split, the predictive as ``mu_y + sigma_y f`` and the columns'
    names, titled with the method and data."""
    from lightning_bayes.callbacks import calibration
    from lightning_bayes.datamodules import UCIRegressionDataModule
    from lightning_bayes.models import MLP
    from lightning_bayes.modules import MAP

    drawn: dict = {}
    monkeypatch.setattr(calibration, "predictive_band", lambda *args, **kwargs: drawn.update(args=args, **kwargs))
    data = UCIRegressionDataModule("mcycle", batch_size=16)
    model = MAP(MLP(1, 1, hidden=[8]), likelihood="gaussian")
    trainer = make_trainer(tmp_path, CalibrationMetrics(), limit_train_batches=2)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    xs, ys, predictive, grid = drawn["args"]
    raw_x, raw_y = data.raw_split("test")
    for drawn_values, raw in ((xs, raw_x), (ys, raw_y)):
        torch.testing.assert_close(drawn_values.double().sort().values, raw.reshape(-1).double().sort().values,
                                   rtol=1e-6, atol=1e-4)  # fmt: skip
    assert float(grid.min()) < float(raw_x.min()) and float(grid.max()) > float(raw_x.max())
    with torch.no_grad():  # the network sees standardised inputs and predicts a standardised target
        standard = model.predictive(data.standardise_inputs(grid.float().reshape(-1, 1)))
    torch.testing.assert_close(predictive.mean.double(), standard.mean.double() * data.target_std + data.target_mean,
                               rtol=1e-5, atol=1e-4)  # fmt: skip
    torch.testing.assert_close(predictive.variance.double(), standard.variance.double() * data.target_std**2, rtol=1e-5,
                               atol=1e-4)  # fmt: skip
    assert (drawn["xlabel"], drawn["ylabel"], drawn["title"]) == ("times", "accel", "MAP on mcycle")


def test_a_standardised_regression_also_reports_nll_rmse_and_crps_in_the_datas_units(tmp_path: Path) -> None:
    """mcycle's NLL 0.716 in standardised units is 4.618 nats in g (+ log 49.47): the metrics stated neither."""
    scale = torch.tensor([2.5])

    class Standardised(ToyData):
        target_std = scale

    model, data = LinearModel(regression=True, num_samples=4), Standardised(regression=True)
    trainer = make_trainer(tmp_path, CalibrationMetrics(plots=False))
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    assert results["test/reg/nll_original"] == pytest.approx(results["test/reg/nll"] + math.log(2.5), rel=1e-6)
    for name in ("rmse", "crps"):
        assert results[f"test/reg/{name}_original"] == pytest.approx(2.5 * results[f"test/reg/{name}"], rel=1e-6)
    written = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    assert {"nll_original", "rmse_original", "crps_original"} <= set(written) and "coverage90_original" not in written


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_the_ood_pass_and_the_band_grid_reach_the_network_in_the_precisions_dtype(tmp_path: Path, precision) -> None:
    """Under ``64-true`` / ``bf16-true`` (a float64 / bf16 network) the OOD batches and the band's grid reached it in
    float32 ("mat1 and mat2 must have the same dtype" at the first validation end): they are cast as Lightning casts
    a step's batch."""
    classifier, data = LinearModel(num_samples=2), ToyDataWithOOD()
    trainer = make_trainer(tmp_path / "c", CalibrationMetrics(), precision=precision)
    trainer.fit(classifier, datamodule=data)
    results = trainer.test(classifier, datamodule=data, verbose=False)[0]
    dtype = classifier.net.weight.dtype
    assert dtype == {"64-true": torch.float64, "bf16-true": torch.bfloat16}[precision]
    with torch.no_grad():
        scores_id = ood_score(classifier.predictive(data.test.tensors[0].to(dtype), 2)).float().numpy()
        scores_ood = ood_score(classifier.predictive(data.ood.tensors[0].to(dtype), 2)).float().numpy()
    labels = np.r_[np.zeros(len(scores_id)), np.ones(len(scores_ood))]
    assert results["test/ood/auroc"] == pytest.approx(roc_auc_score(labels, np.r_[scores_id, scores_ood]), rel=1e-6)
    regressor, curves = LinearModel(regression=True, num_samples=2), ToyData(regression=True)
    trainer = make_trainer(tmp_path / "r", CalibrationMetrics(), precision=precision)
    trainer.fit(regressor, datamodule=curves)
    trainer.test(regressor, datamodule=curves, verbose=False)
    assert (Path(trainer.log_dir) / "predictive_band.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class ScaledInputs(LinearModel):
    """Scales its inputs in ``on_after_batch_transfer`` (preprocessing on the device, as a GPU pipeline does)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, *rest = batch
        return (x / 4.0, *rest)


def test_the_ood_batches_reach_the_network_as_a_steps_batch_does(tmp_path: Path) -> None:
    """Through the module's batch-transfer hooks: the OOD pass moved its batches without them, so a network that
    preprocesses there scored raw OOD inputs against preprocessed in-distribution ones."""
    model, data = ScaledInputs(num_samples=2), ToyDataWithOOD()
    results = make_trainer(tmp_path, CalibrationMetrics()).test(model, datamodule=data, verbose=False)[0]
    with torch.no_grad():
        scores_id = ood_score(model.predictive(data.test.tensors[0] / 4.0, 2)).numpy()
        scores_ood = ood_score(model.predictive(data.ood.tensors[0] / 4.0, 2)).numpy()
    labels = np.r_[np.zeros(len(scores_id)), np.ones(len(scores_ood))]
    assert results["test/ood/auroc"] == pytest.approx(roc_auc_score(labels, np.r_[scores_id, scores_ood]), rel=1e-6)


def test_bad_arguments_and_mismatched_task_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        CalibrationMetrics(task="segmentation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ood_score must be one of"):
        CalibrationMetrics(ood_score="energy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        CalibrationMetrics(num_samples=0)
    with pytest.raises(ValueError, match=r"ood_stages must be a list of stages from \('val', 'test'\); got 'test'"):
        CalibrationMetrics(ood_stages="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plots must be True or False; got 'no'"):  # a truthy string kept them on
        CalibrationMetrics(plots="no")
    with pytest.raises(ValueError, match="ood_stages must be a list"):
        CalibrationMetrics(ood_stages=["train"])  # type: ignore[list-item]
    trainer = make_trainer(tmp_path, CalibrationMetrics(task="regression"))
    with pytest.raises(TypeError, match=r"task='regression'\) got a CategoricalPredictive"):
        trainer.test(LinearModel(), datamodule=ToyData(), verbose=False)


def test_a_second_instance_is_refused_before_its_names_are_averaged(tmp_path: Path) -> None:
    """Two instances (two OOD scores) logged one ``test/ood/auroc``, Lightning's mean of their two values."""
    trainer = make_trainer(tmp_path, CalibrationMetrics())
    trainer.callbacks.append(CalibrationMetrics(ood_score="max_prob"))
    with pytest.raises(ValueError, match=r"the Trainer has 2 CalibrationMetrics callbacks; they log the same names .* "
                       r"keep one \(to compare OOD scores, run trainer.test once per ood_score\)"):
        trainer.test(LinearModel(), datamodule=ToyDataWithOOD(), verbose=False)


def test_the_librarys_modules_take_several_test_loaders(tmp_path: Path) -> None:
    """Their steps had no ``dataloader_idx`` argument, which Lightning requires for several loaders."""
    from lightning_bayes.datamodules import DigitsDataModule
    from lightning_bayes.models import MLP
    from lightning_bayes.modules import MAP

    data = DigitsDataModule(batch_size=100)
    data.setup("fit")
    loaders = [DataLoader(data.test_set, batch_size=100), DataLoader(data.val_set, batch_size=100)]
    for given in (loaders, dict(zip("ab", loaders))):  # a dict was counted as one loader: its metrics overwrote
        trainer = make_trainer(tmp_path, CalibrationMetrics(plots=False))
        results = trainer.test(MAP(MLP(64, 10)), given, verbose=False)
        logged = {**results[0], **results[1]}
        expected = {"test/cal/acc/dataloader_idx_0", "test/cal/acc/dataloader_idx_1", "test/nll/dataloader_idx_1"}
        assert expected <= set(logged) and "test/cal/acc" not in logged


def test_legacy_true_logs_and_writes_the_reference_codes_metrics(tmp_path: Path) -> None:
    model, data = LinearModel(num_samples=3), ToyDataWithOOD()
    trainer = make_trainer(tmp_path, CalibrationMetrics(legacy=True))
    trainer.fit(model, datamodule=data)
    assert {"val/cal/legacy_nll", "val/cal/legacy_ece", "val/cal/legacy_mce"} <= set(trainer.callback_metrics)
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    x, y = data.test.tensors
    with torch.no_grad():
        predictive = model.predictive(x, 3)
    direct = classification_metrics(legacy=True)
    direct.update(predictive, y)
    for name in ("legacy_nll", "legacy_ece", "legacy_mce", "nll"):
        expected = direct[name].compute().item()
        assert results[f"test/cal/{name}"] == pytest.approx(expected, rel=1e-5, abs=1e-6, nan_ok=True), name
    written = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    assert set(written) == CLASSIFICATION_KEYS | {"legacy_nll", "legacy_ece", "legacy_mce"}
    with pytest.raises(ValueError, match="legacy must be True or False; got 'yes'"):
        CalibrationMetrics(legacy="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("score", ["mutual_information", "max_class_variance"])
def test_a_disagreement_score_of_a_one_sample_predictive_is_warned_about(tmp_path: Path, score: str) -> None:
    """It is 0 for every example, so the AUROC is 0.5 whatever the model; with two samples no warning."""
    with pytest.warns(UserWarning, match=rf"ood_score='{score}'\) measures how LinearModel's predictive samples"):
        results = make_trainer(tmp_path, CalibrationMetrics(ood_score=score, plots=False)).test(
            LinearModel(num_samples=1), datamodule=ToyDataWithOOD(), verbose=False
        )
    assert results[0]["test/ood/auroc"] == 0.5
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*measures how")
        make_trainer(tmp_path, CalibrationMetrics(ood_score=score, plots=False)).test(
            LinearModel(num_samples=2), datamodule=ToyDataWithOOD(), verbose=False
        )
    with warnings.catch_warnings():  # without OOD data nothing is scored by it: no warning
        warnings.filterwarnings("error", message=".*measures how")
        make_trainer(tmp_path, CalibrationMetrics(ood_score=score, plots=False)).test(
            LinearModel(num_samples=1), datamodule=ToyData(), verbose=False
        )
