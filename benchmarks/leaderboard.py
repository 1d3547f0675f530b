"""Leaderboard: every method against the libraries users would pick instead, on real data, in one command.

    python benchmarks/leaderboard.py --task digits --quick --out runs/leaderboard/digits
    python benchmarks/leaderboard.py --task mnist --seeds 0 1 2 --out runs/leaderboard/mnist
    python benchmarks/leaderboard.py --task text --only BLoB TFB --set data.init_args.max_test=512

Our methods run through the public CLI (``lightning-bayes fit --config configs/<task>/<method>.yaml``, then
the test of the best or last checkpoint, as ``test_after_fit`` does); the anchors (laplace-torch, the
``vbll`` package, ``ivon-opt``'s manual loop; ``pip install -e '.[bench]'``) copy the model, split and
budget of the config they name (``leaderboard_tasks.py``, ``leaderboard_anchors.py``). Every run is a fresh
process (forked from a server that has imported torch and Lightning), so peak memory is per run and a failure (out of memory, a missing package, an exception) becomes
that row's recorded error; its log is ``OUT/logs/<run>.log``. All rows are scored by the same metrics
(:mod:`lightning_bayes.metrics`, the numbers of ``CalibrationMetrics``).

Outputs in ``OUT``: ``leaderboard.md``, ``leaderboard.json`` (rows, per-seed results, hardware, command),
``reliability.png`` (one reliability diagram per row, first seed), and the runs' logs and checkpoints under
``OUT/runs``. Earlier reports in ``OUT`` are kept (new ones get ``-1``, ``-2``, ...); this run's report is
rewritten after each of its runs, so a leaderboard stopped part way keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform
import re
import shlex
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, cast

import torch

from leaderboard_report import report_paths, summarise, write_report  # benchmarks/leaderboard_report.py
from leaderboard_tasks import TASK_NAMES, Entry, task_entries  # benchmarks/leaderboard_tasks.py
from peak_memory import PeakMemory, cap_data_memory, describe_error  # benchmarks/peak_memory.py
from arguments import positive_int  # benchmarks/arguments.py

ROOT = Path(__file__).resolve().parent.parent
# runs are forked from a server that imported torch but never touched CUDA (a plain fork of this process could
# inherit a CUDA context, which a child cannot use)
FORK_SERVER = multiprocessing.get_context("forkserver")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----- in the worker process --------------------------------------------------------------------------------
def _cli_overrides(spec: dict[str, Any], entry: Entry, run_name: str) -> list[str]:
    seed = spec["seed"] + entry.seed_offset
    out = Path(spec["out"])
    return [
        "--config",
        str(ROOT / "configs" / entry.config),
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        f"--trainer.logger.init_args.name={run_name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *entry.args,
        *(entry.quick if spec["quick"] else ()),
        *(f"--{setting}" for setting in spec["settings"]),
    ]


def run_ours(spec: dict[str, Any], entry: Entry, memory: PeakMemory) -> dict[str, Any]:
    """``lightning-bayes fit --config ... --test_after_fit false``, timed; then the test of ``test_after_fit``."""
    from lightning_bayes.cli import run, test_fitted, trained_checkpoint

    args = ["fit", *_cli_overrides(spec, entry, spec["run_name"]), "--test_after_fit=false"]
    args += [f"{argument}={path}" for argument, path in zip(entry.checkpoint_args, spec["checkpoints"], strict=True)]
    memory.start()
    start = time.perf_counter()
    cli = run(args)
    result: dict[str, Any] = {"fit_s": time.perf_counter() - start, "peak_mb": memory.peak()}
    result["checkpoint"] = trained_checkpoint(cli.trainer)
    if entry.kind == "prerequisite":
        return result
    test_fitted(cli.trainer, cli.model, cli.datamodule)
    folder = Path(cast(str, cli.trainer.log_dir))  # the configs' logger has a save_dir (None would fail as before)
    metrics = json.loads((folder / "metrics.json").read_text())
    result["metrics"] = {key: math.nan if value is None else value for key, value in metrics.items()}  # null: NaN
    if (folder / "reliability.json").is_file():
        result["reliability"] = json.loads((folder / "reliability.json").read_text())
    result["log_dir"] = str(folder)
    return result


def run_anchor(spec: dict[str, Any], entry: Entry, memory: PeakMemory) -> dict[str, Any]:
    """Fit the anchor on the config it copies, timed; then score its predictive on the test and OOD sets."""
    from leaderboard_anchors import ANCHORS, PACKAGES
    from leaderboard_scoring import score

    from lightning_bayes.cli import run

    memory.start()
    start = time.perf_counter()
    cli = run(_cli_overrides(spec, entry, spec["run_name"]), subcommand=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    device = cli.trainer.strategy.root_device
    cli.model.to(device)
    assert entry.anchor is not None  # every "anchor" entry of leaderboard_tasks names its anchor
    try:
        predict = ANCHORS[entry.anchor](cli, spec["checkpoints"], entry.options, device)
    except ImportError as error:
        raise RuntimeError(f"{error}; install {PACKAGES[entry.anchor]} (pip install -e '.[bench]')") from error
    result: dict[str, Any] = {"fit_s": time.perf_counter() - start, "peak_mb": memory.peak()}
    cli.datamodule.setup("test")
    metrics, bins = score(predict, cli.datamodule, device)
    result["metrics"] = metrics
    if bins is not None:
        result["reliability"] = bins.to_dict()
    return result


def worker(spec: dict[str, Any]) -> None:
    """One run in this fresh process; its result (or error) goes to ``spec['result']`` as JSON."""
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    entry = next(e for e in task_entries(spec["task"]) if e.name == spec["entry"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = PeakMemory(device)
    if device.type == "cpu":
        cap_data_memory(spec["max_gb"])
    try:
        result = (run_anchor if entry.kind == "anchor" else run_ours)(spec, entry, memory)
    except Exception as error:  # noqa: BLE001 - recorded in the row: a failing run must not stop the others
        traceback.print_exc()  # into the run's log
        result = {"error": describe_error(error, spec["max_gb"] if device.type == "cpu" else 0)}
    Path(spec["result"]).write_text(json.dumps(result))


# ----- in the parent ------------------------------------------------------------------------------------------
def _child(spec: dict[str, Any], log_path: str) -> None:
    """The forked run: its output goes to its log file."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
        worker(spec)


# what makes two runs of a row the same run (--resume reuses a result only when all of these agree)
SAME_RUN = ("task", "entry", "seed", "quick", "settings", "checkpoints")


def earlier_result(path: Path, identity: dict[str, Any], needed: bool) -> dict[str, Any] | None:
    """The successful result at ``path`` of the same run (``identity``), else None; a run that later rows start
    from (``needed``) counts only while its checkpoint still exists."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if "error" in result or result.get("run") != identity:
        return None
    if needed and result.get("checkpoint") and not Path(result["checkpoint"]).is_file():
        return None
    return {**result, "reused": True}


def run_entry(
    entry: Entry, seed: int, checkpoints: list[str], args: argparse.Namespace, needed: bool
) -> dict[str, Any]:
    """Run ``entry`` for ``seed`` in a fresh process forked from the fork server (torch and Lightning already
    imported there, so a run does not pay the seconds of importing them); its log goes to ``OUT/logs``."""
    run_name = f"{slug(entry.name)}_seed{seed}"
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result_path = logs / f"{run_name}.result.json"
    spec = {
        "task": args.task, "entry": entry.name, "seed": seed, "quick": args.quick, "out": str(args.out),
        "run_name": run_name, "checkpoints": checkpoints, "threads": args.threads, "max_gb": args.max_gb,
        "result": str(result_path), "settings": args.set,
    }  # fmt: skip
    identity = {key: spec[key] for key in SAME_RUN}
    earlier = earlier_result(result_path, identity, needed) if args.resume else None
    if earlier is not None:
        return earlier
    result_path.unlink(missing_ok=True)
    process = FORK_SERVER.Process(target=_child, args=(spec, str(logs / f"{run_name}.log")))
    process.start()
    try:
        process.join()
    finally:  # a stopped leaderboard (Ctrl-C, SIGTERM) stops its run too instead of leaving it computing
        if process.is_alive():
            process.kill()
            process.join()
    if result_path.is_file():  # timed on this machine at these threads (a resumed leaderboard's may not be)
        result = {**json.loads(result_path.read_text()), "run": identity, "machine": machine(args.threads)}
        result_path.write_text(json.dumps(result))
        return result
    code = process.exitcode or 0
    reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return {"error": f"run {reason}" + (" (out of memory?)" if code == -9 else "") + f"; see logs/{run_name}.log"}


def machine(threads: int) -> str:
    """Where a run was timed: its times compare only with runs timed alike."""
    return f"{hardware()}, {threads} threads"


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, CPU only, torch {torch.__version__}"


def selected(entries: list[Entry], only: list[str] | None) -> list[Entry]:
    """``entries`` limited to ``only`` and everything they start from, in the original order."""
    if not only:
        return entries
    names = {e.name for e in entries}
    unknown = sorted(set(only) - names)
    if unknown:
        raise SystemExit(f"--only: unknown names {unknown}; this task has {sorted(names)}")
    by_name, wanted = {e.name: e for e in entries}, set()
    stack = list(only)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack += by_name[name].needs
    baseline = next(e.name for e in entries if e.kind == "baseline")
    wanted.add(baseline)  # the time ratios need the MAP of the same run
    return [e for e in entries if e.name in wanted]


def describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"FAILED: {result['error']}"
    reused = "reused from an earlier run: " if result.get("reused") else ""
    metrics = result.get("metrics", {})
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("acc", "nll", "ece", "ood_auroc", "rmse") if k in metrics)
    return reused + f"{result['fit_s']:.1f} s, peak {result['peak_mb']:.0f} MB" + (f"; {shown}" if shown else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASK_NAMES, required=True)
    parser.add_argument("--quick", action="store_true", help="the task's shorter budgets (leaderboard_tasks.py)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/leaderboard/<task>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the split stays fixed)")
    parser.add_argument("--only", nargs="+", help="these rows (and what they start from) only")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, help="torch threads per run")
    parser.add_argument("--max-gb", type=float, default=0.0, help="CPU: cap each run's new heap memory, RLIMIT_DATA (0: no cap)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the successful results in OUT/logs of the same runs (task, row, seed, --quick, --set and "
        "starting checkpoints): a stopped leaderboard goes on where it stopped",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config values for every run, ours and the anchors alike, after the task's own "
        "(e.g. data.init_args.max_test=512 trainer.limit_val_batches=8)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the cleanup on `kill`
    malformed = [setting for setting in args.set if "=" not in setting or setting.startswith("-")]
    if malformed:
        parser.error(f"--set takes KEY=VALUE config values such as trainer.max_epochs=1; got {malformed}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the fork server and its children
    FORK_SERVER.set_forkserver_preload(["torch", "lightning.pytorch", "lightning_bayes.cli"])
    args.out = (args.out or ROOT / "runs" / "leaderboard" / args.task).resolve()
    entries = selected(task_entries(args.task), args.only)
    command = "python benchmarks/leaderboard.py " + shlex.join(sys.argv[1:])
    print(f"{command}\n{hardware()}; {args.threads} threads per run; output in {args.out}", flush=True)
    started = time.perf_counter()
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    total = len(entries) * len(args.seeds)
    context = {
        "task": args.task,
        "kind": "regression" if args.task == "regression" else "classification",
        "quick": args.quick,
        "seeds": args.seeds,
        "command": command,
        "hardware": hardware() + f", {args.threads} threads per run",
        "memory": "peak CUDA memory allocated during the fit"
        if torch.cuda.is_available()
        else "the run's resident-set high-water mark during the fit, above its size after imports",
        "runs_total": total,
    }
    paths = report_paths(args.out)
    needed = {name for entry in entries for name in entry.needs}
    for seed in args.seeds:
        runs[seed] = {}
        for entry in entries:
            failed = [n for n in entry.needs if "error" in runs[seed][n]]
            if failed:
                result = {"error": f"not run: it starts from {', '.join(failed)}, which failed"}
            else:
                checkpoints = [runs[seed][n]["checkpoint"] for n in entry.needs]
                result = run_entry(entry, seed, checkpoints, args, needed=entry.name in needed)
            runs[seed][entry.name] = result
            done = sum(len(r) for r in runs.values())
            elapsed = (time.perf_counter() - started) / 60
            print(f"[{done}/{total}, {elapsed:.1f} min] seed {seed} {entry.name}: {describe(result)}", flush=True)
            # rewritten after every run, so a stopped leaderboard keeps the rows it finished
            reused = sum(bool(r.get("reused")) for seed_runs in runs.values() for r in seed_runs.values())
            context.update(wall_s=time.perf_counter() - started, runs_done=done, runs_reused=reused)
            rows = summarise(runs, [e for e in entries if any(e.name in r for r in runs.values())])
            written = write_report(paths, rows, context, runs)
    print(written[0].read_text() + "\n" + "\n".join(f"wrote {path}" for path in written))


if __name__ == "__main__":
    main()
