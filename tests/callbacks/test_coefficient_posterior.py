"""CoefficientPosterior: summaries of a known Gaussian posterior, names from the datamodule, files never
overwritten, errors named."""

import json
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.callbacks import CoefficientPosterior
from lightning_bayes.models import SemiStructured
from lightning_bayes.modules import VariationalInference

pytestmark = pytest.mark.usefixtures("single_thread")


class Columns(LightningDataModule):
    feature_names: ClassVar[list[str]] = ["age", "bmi", "bp"]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=8)


def test_summaries_match_the_gaussian_posterior_and_files_are_new(tmp_path: Path):
    model = SemiStructured(in_features=3, structured_features=[2, 1], deep=nn.Linear(1, 1))
    module = VariationalInference(model, params="linear.*", likelihood="gaussian", init_scale=0.2)
    family = module.backbone.linear.weight
    mean, scale = torch.tensor([[0.5, -0.1]]), torch.tensor([[0.2, 0.3]])
    with torch.no_grad():
        family.mean.copy_(mean)
        family.raw_scale.copy_(scale + torch.log(-torch.expm1(-scale)))  # softplus^-1
    trainer = Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[CoefficientPosterior(num_samples=40_000)])
    for _ in range(2):
        trainer.test(module, datamodule=Columns())
    summary = json.loads((tmp_path / "coefficients.json").read_text())
    assert sorted(summary) == ["bmi", "bp"]  # the datamodule's names at the structured columns [2, 1]
    draws = 40_000
    for name, mu, sigma in zip(["bp", "bmi"], mean[0].tolist(), scale[0].tolist()):
        stats = summary[name]
        assert abs(stats["mean"] - mu) < 4 * sigma / math.sqrt(draws)
        assert abs(stats["std"] / sigma - 1) < 4 * math.sqrt(1 / (2 * draws))
        for key, z in (("q05", -1.6449), ("q50", 0.0), ("q95", 1.6449)):  # quantile error <= 2.1 sigma / sqrt(n)
            assert abs(stats[key] - (mu + z * sigma)) < 0.02 * sigma * 4, key
        probability = 0.5 * (1 + math.erf(mu / (sigma * math.sqrt(2))))
        assert abs(stats["prob_positive"] - probability) < 4 * math.sqrt(probability * (1 - probability) / draws)
    assert (tmp_path / "coefficients.png").stat().st_size > 0
    assert (tmp_path / "coefficients-1.json").exists() and (tmp_path / "coefficients-1.png").exists()


def test_bad_arguments_are_named(tmp_path: Path):
    module = VariationalInference(nn.Sequential(nn.Linear(3, 1)), likelihood="gaussian")
    for callback, name in ((CoefficientPosterior(layer="backbone.9"), "layer"),
                           (CoefficientPosterior(layer="backbone"), "layer"),
                           (CoefficientPosterior(layer="backbone.0", names=["a"]), "names")):
        trainer = Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False, callbacks=[callback])
        with pytest.raises(ValueError, match=name):
            trainer.test(module, datamodule=Columns())
    with pytest.raises(ValueError, match="num_samples"):
        CoefficientPosterior(num_samples=1)
    with pytest.raises(ValueError, match="names must be None or a list of str, one per weight; got 'abc'"):
        CoefficientPosterior(names="abc")  # type: ignore[arg-type]  # labelled three weights 'a', 'b', 'c'


def test_a_layer_that_is_not_there_is_refused_before_the_fit_runs(tmp_path: Path):
    """It was found in on_test_end, after the whole fit and test."""
    module = VariationalInference(nn.Sequential(nn.Linear(3, 1)), likelihood="gaussian")
    trainer = Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False, max_epochs=1,
                      callbacks=[CoefficientPosterior(layer="backbone.9")])
    steps: list[int] = []
    module.training_step = lambda *args: steps.append(1)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"layer='backbone.9' is not a submodule of VariationalInference"):
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4))
    assert steps == []


def test_the_draws_follow_the_callbacks_seed_not_the_global_generator(tmp_path: Path):
    """Runs after different global seeds write identical summaries with seed=0; seed=1 writes other ones."""
    module = VariationalInference(nn.Sequential(nn.Linear(3, 1)), likelihood="gaussian", init_scale=0.2)

    def summary(global_seed: int, seed: int, folder: str) -> dict:
        torch.manual_seed(global_seed)
        trainer = Trainer(logger=False, default_root_dir=tmp_path / folder, enable_progress_bar=False,
                          enable_model_summary=False,
                          callbacks=[CoefficientPosterior(layer="backbone.0", num_samples=50, seed=seed, plots=False)])
        trainer.test(module, datamodule=Columns(), verbose=False)
        return json.loads((tmp_path / folder / "coefficients.json").read_text())

    first = summary(1, 0, "a")
    assert summary(2, 0, "b") == first
    assert summary(1, 1, "c") != first
