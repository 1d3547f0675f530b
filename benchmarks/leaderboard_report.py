"""The leaderboard's outputs: rows aggregated over seeds, ``leaderboard.md``, ``leaderboard.json`` and the
reliability diagrams side by side (``reliability.png``). Nothing here runs a method."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, cast

from lightning_bayes.callbacks.run_files import first_free_index, numbered
from lightning_bayes.plots import ReliabilityBins, reliability_grid

from leaderboard_tasks import Entry  # benchmarks/leaderboard_tasks.py

CLASSIFICATION_COLUMNS = (
    ("acc", "acc"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("brier", "Brier"),
    ("ood_auroc", "OOD AUROC"),
)
REGRESSION_COLUMNS = (("nll", "NLL"), ("rmse", "RMSE"), ("crps", "CRPS"), ("coverage90", "90% coverage"))


def total_seconds(name: str, runs: dict[str, dict[str, Any]], entries: dict[str, Entry]) -> float | None:
    """Seconds to produce ``name`` from nothing: its own fit plus, once each, every run it starts from (None when
    they were not all timed on one machine at one thread count: a leaderboard resumed elsewhere)."""
    seen: set[str] = set()

    def collect(current: str) -> None:
        if current not in seen:
            seen.add(current)
            for need in entries[current].needs:
                collect(need)

    collect(name)
    times = [runs.get(n, {}).get("fit_s") for n in seen]
    if len({runs[n].get("machine") for n in seen if n in runs}) > 1:  # resumed on other hardware or threads
        return None
    return None if any(t is None for t in times) else float(sum(cast("list[float]", times)))  # no None, by any()


def _mean_and_spread(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs_by_seed: dict[int, dict[str, dict[str, Any]]], entries: list[Entry]) -> list[dict[str, Any]]:
    """One row per shown entry: metrics, fit time, time to produce (with prerequisites), its ratio to MAP's fit
    time in the same seed's run, and peak memory; mean and sample standard deviation over seeds that succeeded.
    """
    by_name = {e.name: e for e in entries}
    baseline = next(e.name for e in entries if e.kind == "baseline")
    rows = []
    for entry in entries:
        if entry.kind == "prerequisite":
            continue
        results = [runs[entry.name] for runs in runs_by_seed.values() if entry.name in runs]
        succeeded = [r for r in results if "error" not in r]
        row: dict[str, Any] = {
            "name": entry.name,
            "kind": entry.kind,
            "config": entry.config,
            "note": entry.note,
            "seeds": len(succeeded),
            "errors": sorted({r["error"] for r in results if "error" in r}),
        }
        if succeeded:
            keys = sorted(set.intersection(*(set(r["metrics"]) for r in succeeded)))
            row["metrics"] = {k: _mean_and_spread([r["metrics"][k] for r in succeeded]) for k in keys}
            row["fit_s"] = _mean_and_spread([r["fit_s"] for r in succeeded])
            totals, ratios = [], []
            for runs in runs_by_seed.values():
                if "error" in runs.get(entry.name, {"error": ""}):
                    continue
                total = total_seconds(entry.name, runs, by_name)
                map_fit = runs.get(baseline, {}).get("fit_s")
                if total is not None:
                    totals.append(total)
                    if map_fit and runs[baseline].get("machine") == runs[entry.name].get("machine"):
                        ratios.append(total / map_fit)
            row["total_s"] = _mean_and_spread(totals) if totals else None
            row["time_vs_map"] = _mean_and_spread(ratios) if ratios else None
            row["peak_mb"] = max(r["peak_mb"] for r in succeeded)
            row["reliability"] = succeeded[0].get("reliability")
        rows.append(row)
    return rows


def _cell(value: tuple[float, float | None] | None, digits: int) -> str:
    if value is None or value[0] is None or not math.isfinite(value[0]):
        return "-"
    mean, spread = value
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


_METRIC_NOTES = {
    "classification": "NLL is that of the model average; ECE uses 15 equal-width bins; OOD AUROC separates the test "
    "set from the datamodule's OOD set by predictive entropy.",
    "regression": "NLL and CRPS are those of the predictive mixture; RMSE is its mean's; coverage is the share of "
    "test targets inside the central 90% interval.",
}


def _progress(context: dict[str, Any]) -> str:
    done, total = context.get("runs_done", 0), context.get("runs_total", 0)
    reused = context.get("runs_reused", 0)
    text = f" In progress: {done} of {total} runs done." if done < total else ""
    if reused:  # --resume: their times (and time / MAP) come from the invocation that ran them
        text += (
            f" {reused} of the {done} runs reused from an earlier invocation (--resume) and timed there (a row timed "
            "on other hardware or threads than a run it needs or MAP shows no total or time / MAP)."
        )
    return text


def markdown(rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    """The table with the command, hardware and seeds above it and the failures below."""
    columns = CLASSIFICATION_COLUMNS if context["kind"] == "classification" else REGRESSION_COLUMNS
    header = ["method", "kind", *(label for _, label in columns), "fit s", "total s", "time / MAP", "peak MB"]
    lines = [
        f"# Leaderboard: {context['task']}" + (" (--quick)" if context["quick"] else ""),
        "",
        f"`{context['command']}`",
        "",
        f"Hardware: {context['hardware']}. Seeds: {', '.join(map(str, context['seeds']))}"
        + (" (mean ± sample standard deviation)" if len(context["seeds"]) > 1 else "")
        + f". Wall time {context['wall_s'] / 60:.1f} min."
        + _progress(context),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    failures = []
    for row in rows:
        if "metrics" not in row:
            cells = ["failed"] + ["-"] * (len(columns) + 3)
            failures.append(row)
        else:
            cells = [_cell(row["metrics"].get(key), 4) for key, _ in columns]
            cells += [_cell(row["fit_s"], 1), _cell(row["total_s"], 1), _cell(row["time_vs_map"], 2)]
            cells.append(f"{row['peak_mb']:.0f}")
            if row["errors"]:
                failures.append(row)
        lines.append("| " + " | ".join([row["name"], row["kind"], *cells]) + " |")
    lines += [
        "",
        _METRIC_NOTES[context["kind"]] + " *fit s*: the run's own training or post-hoc fit (config "
        "instantiation and validation included, test excluded; our runs validate as their configs say, with the "
        "CLI's calibration metrics at the method's predictive draws (the OOD data at test only), the anchors' loops "
        "only the "
        "validation NLL); *total s*: with the runs it starts from (the MAP, "
        "the SWAG collection); *time / MAP*: total over the MAP's fit in the same run; *peak MB*: "
        + context["memory"]
        + ".",
    ]
    if failures:
        lines += ["", "Failures (recorded, not hidden):", ""]
        lines += [f"- {row['name']}: {'; '.join(row['errors'])}" for row in failures]
    return "\n".join(lines) + "\n"


def report_paths(folder: Path) -> list[Path]:
    """This run's ``leaderboard.md``, ``leaderboard.json`` and ``reliability.png`` in ``folder``: next to earlier
    reports as ``-1``, ``-2``, ... instead of overwriting them, under one number (the first free for all three, so a
    report's files stay together after one without a figure)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [("leaderboard", ".md"), ("leaderboard", ".json"), ("reliability", ".png")]
    index = first_free_index(folder, files)
    return [numbered(folder, stem, index, ending) for stem, ending in files]


def write_report(
    paths: list[Path], rows: list[dict[str, Any]], context: dict[str, Any], runs: dict[int, Any]
) -> list[Path]:
    """Write the table, the JSON and (when a row has reliability bins) the diagrams to ``paths`` (from
    :func:`report_paths`); return the paths written."""
    markdown_path, json_path, png_path = paths
    markdown_path.write_text(markdown(rows, context))
    json_path.write_text(json.dumps({"context": context, "rows": rows, "runs": runs}, indent=2, default=str))
    panels = {row["name"]: ReliabilityBins.from_dict(row["reliability"]) for row in rows if row.get("reliability")}
    return [markdown_path, json_path] + ([reliability_grid(panels, png_path)] if panels else [])
