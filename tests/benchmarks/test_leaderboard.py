"""The leaderboard's bookkeeping (tasks, totals, aggregation over seeds, report) and its scoring, which must
give the numbers ``CalibrationMetrics`` gives; the slow test runs the real script on digits."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from calibration_toys import LinearModel, ToyDataWithOOD
from leaderboard import _cli_overrides, earlier_result, selected
from leaderboard_anchors import ANCHORS, PACKAGES, _train_as_configured
from leaderboard_report import markdown, report_paths, summarise, total_seconds, write_report
from leaderboard_scoring import score
from leaderboard_tasks import TASK_NAMES, Entry, task_entries
from lightning.pytorch import Trainer

from lightning_bayes.callbacks import CalibrationMetrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_is_runnable_as_declared(task: str) -> None:
    entries = task_entries(task)
    names = [e.name for e in entries]
    assert len(set(names)) == len(names)
    assert entries[0].kind == "baseline"  # the MAP every ratio divides by runs first
    for index, entry in enumerate(entries):
        assert (ROOT / "configs" / entry.config).is_file(), entry.config
        assert set(entry.needs) <= set(names[:index]), f"{entry.name} runs before what it starts from"
        if entry.kind == "anchor":
            assert entry.anchor in ANCHORS and entry.anchor in PACKAGES
        else:
            assert len(entry.checkpoint_args) == len(entry.needs), entry.name
    with pytest.raises(ValueError, match="task must be one of"):
        task_entries("imagenet")


def test_digits_lists_every_method_and_anchor() -> None:
    entries = task_entries("digits")
    shown = {e.name for e in entries if e.kind != "prerequisite"}
    configs = {e.config for e in entries if e.kind != "anchor"}
    # every digits config is a row or a run a row starts from
    assert {f"digits/{p.name}" for p in (ROOT / "configs" / "digits").glob("*.yaml")} == configs
    assert {"laplace-torch LL-KFAC", "laplace-torch diag", "laplace-torch KFAC", "vbll package", "ivon-opt loop"} < shown
    assert {"MC dropout", "Deep ensemble (5)"} < shown


def _entries() -> list[Entry]:
    return [
        Entry("MAP", "baseline", "digits/map.yaml"),
        Entry("MAP (second seed)", "prerequisite", "digits/map.yaml", seed_offset=1000),
        Entry("SWAG collection", "prerequisite", "digits/swag.yaml"),
        Entry("SWAG", "ours", "digits/swag_predictive.yaml", ("SWAG collection",), ("--a",)),
        Entry("Curve", "ours", "digits/curve.yaml", ("MAP", "MAP (second seed)"), ("--a", "--b")),
        Entry("Anchor", "anchor", "digits/map.yaml", ("MAP",), anchor="laplace_torch"),
    ]


def _run(fit_s: float, nll: float, acc: float = 0.9) -> dict:
    return {"fit_s": fit_s, "peak_mb": 100 * fit_s, "metrics": {"nll": nll, "acc": acc}}


@pytest.mark.parametrize("monitor", [None, "val/nll"])
def test_an_anchor_trains_on_the_configs_schedule_and_tests_what_our_run_tests(monitor: str | None) -> None:
    """The ivon-opt anchor ran mnist/ivon.yaml's cosine schedule at its first rate throughout and kept its best
    validation epoch, where our run, without a monitor, tests its last: 3 epochs of 2 of 4 batches at rates halved
    each epoch; with a monitor validated every 2nd epoch, the state after epoch 2 comes back."""
    from argparse import Namespace
    from types import SimpleNamespace

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    rates: list[float] = []

    def step(x, y) -> None:
        rates.append(optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            model.weight += 1.0  # the state counts the steps

    scheduler = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": Namespace(step_size=1, gamma=0.5)}
    loader = [(torch.zeros(1, 1), torch.zeros(1))] * 4
    trainer = SimpleNamespace(max_epochs=3, check_val_every_n_epoch=2, limit_train_batches=2,
                              checkpoint_callbacks=[SimpleNamespace(monitor=monitor)])
    cli = SimpleNamespace(trainer=trainer, datamodule=SimpleNamespace(train_dataloader=lambda: loader),
                          config={"model": {"init_args": {"lr_scheduler": scheduler}}})
    validated: list[float] = []
    _train_as_configured(cli, model, [model], step, lambda: validated.append(model.weight.item()) or 0.0, optimizer)
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert validated == ([] if monitor is None else [4.0])
    assert model.weight.item() == (6.0 if monitor is None else 4.0)


def test_totals_count_each_prerequisite_once_and_ratios_are_per_seed() -> None:
    entries = _entries()
    runs = {
        0: {"MAP": _run(10, 0.2), "MAP (second seed)": _run(12, 0.3), "SWAG collection": _run(20, 0.25),
            "SWAG": _run(2, 0.15), "Curve": _run(30, 0.1), "Anchor": {"error": "OOM (> 8 GB)"}},
        1: {"MAP": _run(20, 0.4), "MAP (second seed)": _run(12, 0.3), "SWAG collection": _run(20, 0.25),
            "SWAG": _run(4, 0.25), "Curve": {"error": "ValueError: boom"}, "Anchor": _run(1, 0.5)},
    }  # fmt: skip
    by_name = {e.name: e for e in entries}
    assert total_seconds("Curve", runs[0], by_name) == 10 + 12 + 30
    assert total_seconds("SWAG", runs[1], by_name) == 20 + 4

    rows = {row["name"]: row for row in summarise(runs, entries)}
    assert set(rows) == {"MAP", "SWAG", "Curve", "Anchor"}  # prerequisites are not rows
    swag = rows["SWAG"]
    assert swag["seeds"] == 2 and swag["errors"] == []
    assert swag["metrics"]["nll"] == pytest.approx((0.2, statistics.stdev([0.15, 0.25])))
    assert swag["total_s"] == pytest.approx((23.0, statistics.stdev([22, 24])))
    assert swag["time_vs_map"] == pytest.approx((statistics.fmean([22 / 10, 24 / 20]), statistics.stdev([2.2, 1.2])))
    assert swag["peak_mb"] == 400
    curve = rows["Curve"]  # one seed failed: the other's numbers, the failure listed
    assert curve["seeds"] == 1 and curve["errors"] == ["ValueError: boom"]
    assert curve["metrics"]["nll"] == (0.1, None) and curve["time_vs_map"] == (5.2, None)

    context = {"task": "digits", "kind": "classification", "quick": True, "seeds": [0, 1], "command": "python x",
               "hardware": "cpu", "wall_s": 90.0, "memory": "RSS"}  # fmt: skip
    text = markdown(list(rows.values()), context)
    assert "| SWAG | ours | 0.9000 ± 0.0000 | 0.2000 ± 0.0707 | - |" in text  # no ECE in this toy: "-"
    assert "- Curve: ValueError: boom" in text and "- Anchor: OOM (> 8 GB)" in text
    assert "(--quick)" in text and "Wall time 1.5 min" in text


def test_times_of_runs_timed_on_other_machines_are_not_added_or_divided() -> None:
    """A resumed leaderboard reused MAP timed at 1 thread (9.2 s) and divided a 2-thread VBLL fit by it: 6.72 where
    the pair timed together gave 2.13."""
    entries = _entries()
    here, there = {"machine": "gpu A, 16 threads"}, {"machine": "gpu B, 16 threads"}
    runs = {0: {"MAP": {**_run(10, 0.2), **here}, "MAP (second seed)": {**_run(12, 0.3), **there},
                "SWAG collection": {**_run(20, 0.25), **here}, "SWAG": {**_run(2, 0.15), **there},
                "Curve": {**_run(30, 0.1), **there}, "Anchor": {**_run(1, 0.5), **here}}}  # fmt: skip
    by_name = {e.name: e for e in entries}
    assert total_seconds("SWAG", runs[0], by_name) is None and total_seconds("Anchor", runs[0], by_name) == 11
    rows = {row["name"]: row for row in summarise(runs, entries)}
    assert rows["SWAG"]["total_s"] is None and rows["SWAG"]["time_vs_map"] is None
    assert rows["Anchor"]["time_vs_map"] == (1.1, None)
    assert rows["Curve"]["total_s"] is None  # its two ends were timed on two machines
    assert rows["SWAG"]["metrics"]["nll"] == (0.15, None)  # the metrics stand wherever they were measured


def test_selected_keeps_what_rows_start_from_and_the_map() -> None:
    entries = _entries()
    assert [e.name for e in selected(entries, ["Curve"])] == ["MAP", "MAP (second seed)", "Curve"]
    assert [e.name for e in selected(entries, ["SWAG"])] == ["MAP", "SWAG collection", "SWAG"]
    with pytest.raises(SystemExit, match="unknown names"):
        selected(entries, ["VIKING"])


def test_set_values_reach_every_run_after_the_tasks_own() -> None:
    entry = Entry("TFB", "ours", "text/tfb_smollm2.yaml", quick=("--trainer.max_epochs=1",))
    spec = {"seed": 0, "out": "out", "quick": True, "settings": ["data.init_args.max_test=512"]}
    arguments = _cli_overrides(spec, entry, "tfb_seed0")
    assert arguments[-2:] == ["--trainer.max_epochs=1", "--data.init_args.max_test=512"]
    command = [sys.executable, str(ROOT / "benchmarks" / "leaderboard.py"), "--task", "text", "--set", "max_test"]
    failed = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and "--set takes KEY=VALUE config values" in failed.stderr
    assert "['max_test']" in failed.stderr


def test_resume_reuses_only_a_successful_result_of_the_same_run(tmp_path: Path) -> None:
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"")
    identity = {"task": "text", "entry": "MAP-LoRA", "seed": 0, "quick": False, "settings": ["a=1"], "checkpoints": []}
    path = tmp_path / "map_lora_seed0.result.json"
    assert earlier_result(path, identity, needed=True) is None  # nothing yet
    path.write_text(json.dumps({"fit_s": 3.0, "checkpoint": str(checkpoint), "run": identity}))
    reused = {"fit_s": 3.0, "checkpoint": str(checkpoint), "run": identity, "reused": True}
    assert earlier_result(path, identity, needed=True) == reused
    assert earlier_result(path, {**identity, "settings": ["a=2"]}, needed=True) is None  # other config values
    assert earlier_result(path, {**identity, "quick": True}, needed=True) is None
    checkpoint.unlink()
    assert earlier_result(path, identity, needed=True) is None  # a later row starts from it: its checkpoint is gone
    assert earlier_result(path, identity, needed=False) == reused  # no row starts from it: its scores stand
    path.write_text(json.dumps({"error": "run killed by signal 9", "run": identity}))
    assert earlier_result(path, identity, needed=False) is None


def test_scoring_gives_the_numbers_of_calibration_metrics(tmp_path: Path) -> None:
    model, data, callback = LinearModel(num_samples=3), ToyDataWithOOD(), CalibrationMetrics()
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False, enable_progress_bar=False)
    trainer.test(model, datamodule=data, verbose=False)
    expected = json.loads((tmp_path / "metrics.json").read_text())
    values, bins = score(lambda x: model.predictive(x, 3), data, torch.device("cpu"))
    assert set(values) == set(expected)
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert bins is not None and bins.count.sum() == len(data.test)
    assert bins.ece == pytest.approx(expected["ece"], rel=1e-5)


def test_report_files_are_written_beside_earlier_ones(tmp_path: Path) -> None:
    entries = _entries()
    bins = {"edges": [0.0, 0.5, 1.0], "accuracy": [None, 0.9], "confidence": [None, 0.8], "count": [0.0, 10.0]}
    runs = {0: {name: {**_run(1, 0.1), "reliability": bins} for name in ("MAP", "MAP (second seed)", "Curve")}}
    context = {"task": "digits", "kind": "classification", "quick": False, "seeds": [0], "command": "c",
               "hardware": "h", "wall_s": 1.0, "memory": "m"}  # fmt: skip
    rows = summarise(runs, entries[:2] + entries[4:5])
    first = write_report(report_paths(tmp_path), rows, context, runs)
    second = write_report(report_paths(tmp_path), rows, context, runs)
    assert [p.name for p in first] == ["leaderboard.md", "leaderboard.json", "reliability.png"]
    assert [p.name for p in second] == ["leaderboard-1.md", "leaderboard-1.json", "reliability-1.png"]
    assert "In progress" not in first[0].read_text()
    # a report rewritten after each run says how far the leaderboard got
    again = write_report(second, rows[:1], {**context, "runs_done": 1, "runs_total": 3}, runs)
    assert again[1] == second[1] and "In progress: 1 of 3 runs done." in again[0].read_text()
    resumed = write_report(second, rows, {**context, "runs_done": 3, "runs_total": 3, "runs_reused": 2}, runs)
    reused = "2 of the 3 runs reused from an earlier invocation (--resume) and timed there (a row timed on other"
    assert reused in resumed[0].read_text()
    assert json.loads(again[1].read_text())["rows"][0]["name"] == "MAP"
    saved = json.loads(first[1].read_text())
    assert saved["rows"][1]["name"] == "Curve" and math.isclose(saved["rows"][1]["time_vs_map"][0], 3.0)


def test_a_reports_files_share_one_number_after_a_report_without_a_figure(tmp_path: Path) -> None:
    """A regression report writes no reliability.png: the next report's files were numbered apart
    (leaderboard-1.md, leaderboard-1.json beside reliability.png)."""
    (tmp_path / "leaderboard.md").write_text("earlier")
    (tmp_path / "leaderboard.json").write_text("{}")
    assert [p.name for p in report_paths(tmp_path)] == ["leaderboard-1.md", "leaderboard-1.json", "reliability-1.png"]


@pytest.mark.slow
def test_the_script_runs_our_map_and_two_anchors_on_digits(tmp_path: Path) -> None:
    """The real worker processes: MAP through the CLI, laplace-torch post hoc on its checkpoint, ivon-opt."""
    command = [
        sys.executable, str(ROOT / "benchmarks" / "leaderboard.py"), "--task", "digits", "--out", str(tmp_path),
        "--only", "laplace-torch LL-KFAC", "ivon-opt loop", "--threads", "1",
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=900)
    report = json.loads((tmp_path / "leaderboard.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"MAP", "laplace-torch LL-KFAC", "ivon-opt loop"}
    assert all(row["seeds"] == 1 and not row["errors"] for row in rows.values())
    map_run = report["runs"]["0"]["MAP"]
    written = json.loads((Path(map_run["log_dir"]) / "metrics.json").read_text())
    assert rows["MAP"]["metrics"]["nll"][0] == pytest.approx(written["nll"])  # the CLI's own numbers
    assert rows["laplace-torch LL-KFAC"]["metrics"]["acc"][0] == pytest.approx(written["acc"], abs=0.01)
    assert rows["ivon-opt loop"]["metrics"]["acc"][0] > 0.9  # 8x8 digits: MAP reaches 0.97
    assert (tmp_path / "leaderboard.md").is_file() and (tmp_path / "reliability.png").is_file()


def test_a_leases_state_keeps_every_file_but_the_checkpoints_no_row_starts_from(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
    from leaderboard_state import resumable_files

    logs, runs = tmp_path / "mnist" / "logs", tmp_path / "mnist" / "runs"
    logs.mkdir(parents=True)
    # MAP and the SWAG collection start later rows, VBLL none
    for row, entry in (("map", "MAP"), ("swag_collection", "SWAG collection"), ("vbll", "VBLL")):
        checkpoint = runs / row / "last.ckpt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"weights")
        (runs / row / "epoch=1.ckpt").write_bytes(b"best")
        result = {"checkpoint": str(checkpoint), "run": {"entry": entry}}
        (logs / f"{row}_seed0.result.json").write_text(json.dumps(result))
        (logs / f"{row}_seed0.log").write_text("trained")
    (tmp_path / "mnist" / "leaderboard.md").write_text("| row |")
    kept = {str(path) for path in resumable_files(tmp_path, "mnist")}
    rows, kinds = ("map", "swag_collection", "vbll"), ("log", "result.json")
    logged = {f"mnist/logs/{row}_seed0.{kind}" for row in rows for kind in kinds}
    assert kept == {
        "mnist/leaderboard.md",
        *logged,
        "mnist/runs/map/last.ckpt",
        "mnist/runs/swag_collection/last.ckpt",
    }
