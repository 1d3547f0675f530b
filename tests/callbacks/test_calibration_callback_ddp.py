"""CalibrationMetrics under DDP (2 CPU processes): the written metrics equal the single-process ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from calibration_toys import LinearModel, ToyData, ToyDataWithOOD, blobs, curve
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import TensorDataset

from lightning_bayes.callbacks import CalibrationMetrics

from gloo_exit import spawned_ddp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


def run_test(tmp_path: Path, data: ToyData | None = None, **trainer_kwargs: object) -> dict[str, float]:
    trainer = Trainer(
        logger=CSVLogger(tmp_path, version="run"),  # fixed: the parent of spawned ranks would count a new version
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[CalibrationMetrics()],
        **trainer_kwargs,
    )
    data = ToyDataWithOOD() if data is None else data
    trainer.test(LinearModel(num_samples=3, regression=data.regression), datamodule=data, verbose=False)
    folder = tmp_path / "lightning_logs" / "run"
    assert (folder / ("predictive_band.png" if data.regression else "reliability.png")).exists()
    return json.loads((folder / "metrics.json").read_text())


def test_two_processes_write_the_single_process_metrics(tmp_path: Path) -> None:
    """One batch of 16 per rank (ranks take alternate examples) pools the first 32 test examples, as two
    batches do in one process; the OOD loader, sharded the same way and limited to as many batches, must
    then pool the first 32 OOD examples (unsharded, both ranks would score OOD examples 0-15 twice).
    """
    single = run_test(tmp_path / "single", devices=1, limit_test_batches=2)
    distributed = run_test(tmp_path / "ddp", devices=2, strategy=spawned_ddp(), limit_test_batches=1)
    assert set(distributed) == set(single)
    for name, value in single.items():
        # float32 sums in a different order
        assert distributed[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_without_the_distributed_sampler_the_ood_data_is_not_sharded_either(tmp_path: Path) -> None:
    """``use_distributed_sampler=False`` (the null-space Laplace's requirement): every rank scores the same first two
    test batches, so the OOD loader must not be sharded either; each rank then scores the first 32 OOD examples and
    the pooled metrics (every example twice) are the one-process ones."""
    single = run_test(tmp_path / "single", devices=1, limit_test_batches=2)
    distributed = run_test(tmp_path / "ddp", devices=2, strategy=spawned_ddp(), limit_test_batches=2,
                           use_distributed_sampler=False)
    for name, value in single.items():
        if name != "aece":  # adaptive ECE's equal-mass bins move when every example comes twice
            assert distributed[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


class OddSizes(ToyDataWithOOD):
    """61 test and 35 OOD examples: on 2 processes the DistributedSampler repeats one of each on rank 1."""

    def __init__(self, regression: bool = False) -> None:
        super().__init__(regression=regression)
        self.test = TensorDataset(*(curve if regression else blobs)(61, 2))
        self.ood = TensorDataset(*(tensor[:35] for tensor in self.ood.tensors))


@pytest.mark.slow  # two processes, 25-55 s on 2 cores: CI runs the slow suite too
@pytest.mark.parametrize("regression", [False, True])
def test_the_samplers_repeats_are_not_scored_twice(tmp_path: Path, regression: bool) -> None:
    """With N not a multiple of the processes, DistributedSampler pads by repeating examples; the callback scored
    them (61 test examples: acc 0.4918 on one process, 0.5 on two; RMSE 1.047 against 1.077)."""
    single = run_test(tmp_path / "single", OddSizes(regression), devices=1)
    distributed = run_test(tmp_path / "ddp", OddSizes(regression), devices=2, strategy=spawned_ddp())
    assert set(distributed) == set(single)
    for name, value in single.items():
        assert distributed[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
