"""The ``lightning-bayes`` command under ``--trainer.strategy ddp`` on 2 CPU processes (Lightning starts rank 1 by
running the command again): a fit's checkpoint, tested and predicted on 2 processes, gives the one-process metrics
and rows; only rank 0 writes the run folder and its metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from cli_helpers import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch"),
]

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
ONE = ["--trainer.strategy=auto", "--trainer.devices=1", "--trainer.accelerator=cpu"]  # the saved config says DDP


def cli(folder: Path, *args: str) -> None:
    command = [sys.executable, "-m", "lightning_bayes", *args, "--trainer.enable_progress_bar=false"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"


def rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as file:
        return {row["index"]: row for row in csv.DictReader(file)}


def test_two_processes_test_and_predict_a_checkpoint_as_one_process_does(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    config = ROOT / "configs" / "digits" / "map.yaml"
    cli(tmp_path, "fit", "--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        "--test_after_fit=false", f"--trainer.logger.init_args.save_dir={logs}", *DDP)  # fmt: skip
    fitted = logs / "digits_map" / "version_0"
    saved = ["--config", str(fitted / "config.yaml"), f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}"]
    for subcommand in ("test", "predict"):
        cli(tmp_path, subcommand, *saved, *ONE)
        cli(tmp_path, subcommand, *saved, *DDP)
    runs = logs / "digits_map"
    versions = sorted(path.name for path in runs.iterdir())
    assert versions == [f"version_{v}" for v in range(5)]  # one folder per command: rank 1 made none

    single, pooled = (json.loads((runs / v / "metrics.json").read_text()) for v in ("version_1", "version_2"))
    assert set(pooled) == set(single) and {"acc", "nll", "ece", "ood_auroc"} <= set(single)
    for name, value in single.items():  # float32 sums over the test and OOD examples in another order
        assert pooled[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name

    one = rows(runs / "version_3" / "predictions.csv")
    rank0, rank1 = (rows(runs / "version_4" / f"predictions-rank{r}.csv") for r in (0, 1))
    assert len(one) == 360 and len(rank0) == len(rank1) == 180 and not set(rank0) & set(rank1)
    assert {**rank0, **rank1}.keys() == one.keys()
    for index, row in {**rank0, **rank1}.items():
        assert row["target"] == one[index]["target"] and row["predicted"] == one[index]["predicted"], index
        assert float(row["confidence"]) == pytest.approx(float(one[index]["confidence"]), rel=1e-5), index


def test_a_run_refused_on_two_processes_leaves_no_version_folder(tmp_path: Path) -> None:
    """VIKING under plain ``ddp`` is refused in ``on_fit_start`` (its warm-up phases leave parameters without
    gradients): the refused run takes back its config and version folder, so the next run is version_0."""
    logs = tmp_path / "logs"
    config = ROOT / "configs" / "digits" / "viking.yaml"
    command = [sys.executable, "-m", "lightning_bayes", "fit", "--config", str(config), "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=2", f"--trainer.logger.init_args.save_dir={logs}",
               "--trainer.enable_progress_bar=false", *DDP]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0 and "ddp_find_unused_parameters_true" in done.stderr
    assert not list(logs.rglob("version_*"))


def test_a_ddp_spawn_fit_tests_in_its_own_run_folder_and_keeps_its_metrics(tmp_path: Path) -> None:
    """Under ``ddp_spawn`` the fit runs in processes gone before the test after it: that test's logger wrote its rows
    into the fit's folder but first deleted the fit's ``metrics.csv`` (Lightning's CSV writer on a folder not empty),
    and its config saver, never having saved in this process, refused the fit's ``config.yaml``."""
    logs = tmp_path / "logs"
    config = ROOT / "configs" / "digits" / "map.yaml"
    spawn = ["--trainer.strategy=ddp_spawn", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    cli(tmp_path, "fit", "--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        f"--trainer.logger.init_args.save_dir={logs}", *spawn)  # fmt: skip
    (run,) = (logs / "digits_map").iterdir()
    with (run / "metrics.csv").open(newline="") as file:
        logged = list(csv.DictReader(file))
    assert [bool(row["val/nll"]) for row in logged] == [True, False]  # the fit's epoch, then the test's row
    assert [bool(row["test/nll"]) for row in logged] == [False, True]
    assert json.loads((run / "metrics.json").read_text())["nll"] > 0
    assert (run / "config.yaml").is_file()


def test_a_viking_fit_tests_as_a_test_of_its_last_checkpoint_does_under_ddp(tmp_path: Path) -> None:
    """The test after a fit re-sweeps VIKING's samples at the final theta_hat, drawing on each rank's generator; the
    fit's set-up for that test reseeded every rank (seed + rank), so its samples differed from a test of the fit's
    last checkpoint, which restores each rank's generator (a digits run: test NLL 2.3025 against 2.2956)."""
    logs = tmp_path / "logs"
    config = ROOT / "configs" / "digits" / "viking.yaml"
    short = ["--trainer.max_epochs=2", "--model.init_args.phase_epochs=[0, 0, 2]", "--trainer.limit_train_batches=3",
             "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=3"]  # fmt: skip
    cli(tmp_path, "fit", "--config", str(config), *short, f"--trainer.logger.init_args.save_dir={logs}", *DDP)
    fitted = logs / "digits_viking" / "version_0"
    last = fitted / "checkpoints" / "last.ckpt"
    cli(tmp_path, "test", "--config", str(fitted / "config.yaml"), f"--ckpt_path={last}", *DDP)
    runs = fitted.parent
    after_fit, of_checkpoint = (json.loads((runs / v / "metrics.json").read_text()) for v in ("version_0", "version_1"))
    assert after_fit == of_checkpoint  # bitwise: the same draws, the same sweeps, the same order of sums
