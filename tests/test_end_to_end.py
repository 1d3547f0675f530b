"""Full-data runs of the main configs through the real CLI (marked slow; CI runs them)."""

import json
from pathlib import Path

import pytest
from cli_helpers import ROOT

from lightning_bayes.cli import run

pytestmark = pytest.mark.slow


def _fit(config: str, save_dir: Path) -> dict[str, float]:
    run(["fit", "--config", str(ROOT / "configs" / config), f"--trainer.logger.init_args.save_dir={save_dir}"])
    return json.loads(next(save_dir.rglob("metrics.json")).read_text())


def test_mnist_map_reaches_the_reference_accuracy(tmp_path: Path):
    # reference (LeNet, AdamW 1e-3, batch 128, 10 epochs): acc 0.988, NLL 0.042, ECE 0.006, OOD AUROC 0.985
    metrics = _fit("mnist/map.yaml", tmp_path)
    assert metrics["acc"] >= 0.985
    assert metrics["nll"] <= 0.045 and metrics["ece"] <= 0.01
    assert metrics["ood_auroc"] >= 0.97


def test_quickstart_ensemble_is_accurate_and_detects_fashion_mnist(tmp_path: Path):
    metrics = _fit("quickstart.yaml", tmp_path)
    assert metrics["acc"] >= 0.985 and metrics["nll"] <= 0.04
    assert metrics["ood_auroc"] >= 0.985 and metrics["mi"] > 0
    assert (next(tmp_path.rglob("metrics.json")).parent / "reliability.png").exists()
