"""Post-hoc fit of our null-space Laplace vs laplace-torch on one trained LeNet-5 (MNIST), and our cost as P and O grow.

Install laplace-torch with ``pip install -e '.[bench]'`` (``laplace-torch==0.3``; it leaves torch as it is).

Part 1 trains a LeNet-5 MAP on MNIST (or loads ``--checkpoint``, a checkpoint of ``configs/mnist/map.yaml``)
and, for that one model and the same N training examples (their first N in the datamodule's seeded order),
fits and evaluates, each method in a fresh process so that peak memory is per method:

* ``MAP``: the network itself (no fit): the baseline of the predictive's cost and metrics;
* ``ours``: :class:`lightning_bayes.modules.NullSpaceLaplace` over all layers, output constraint, micro-batch
  16, ``--sweeps`` sweeps, ``--samples`` samples, linearised predictive, driven by a plain ``Trainer``;
* laplace-torch ``Laplace(model, "classification", ...)``: last-layer KFAC, all-layer diagonal and all-layer
  KFAC GGN, each with its default backend (``curvlinops``) and with ``asdl`` (``--backends``); the prior
  precision is optimised by ``optimize_prior_precision(method="marglik")`` (scalar, 100 Adam steps, counted
  in the fit time), and the predictive is the GLM one with ``--link-approx`` (probit by default).

Fit time is the posterior's own pass over the data (our sweeps; laplace-torch's ``fit`` with batches of
``--batch-size`` plus its prior optimisation); predict time covers the ``--num-test`` test images in batches
of ``--batch-size``. Memory is measured per phase (fit, predict) as the peak above the phase's start:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the resident set's high-water mark ``VmHWM``, reset through
``/proc/self/clear_refs`` after freed heap is handed back to the OS. On CPU each worker's private writable
memory (``RLIMIT_DATA``) is capped at ``--max-gb`` above its size once model and data are loaded, so a method
that needs more fails with "OOM" in its row instead of waking the kernel's OOM killer. Accuracy, NLL (of the
model average) and ECE (15 equal-width bins) come from :mod:`lightning_bayes.metrics`; laplace-torch's
probabilities enter them as a one-sample ``CategoricalPredictive``. (laplace-torch's all-layer GLM predictive builds the ``[B, C, P]``
Jacobian of a whole batch with ``jacrev`` of the batch output, whose cost and memory grow with ``B^2 C``;
ours takes one JVP per sample.)

Part 2 times one micro-batch projection step of ours (B = 16, S = ``--samples``) on a synthetic MLP
``784 -> w -> w -> O``: P from 1e4 to 1e6 at O = 10 (output constraint), and O in {2, 10, 100} at P ~ 1e5
for the output constraint (``M_b = B O`` rows) and the loss constraint (``M_b = B`` rows). A step is the
per-example Jacobian ``J_b`` (``vmap(jacrev)``), then the projection of every sample: in the first sweep it
forms ``J_b J_b^T`` in float64 and its eigendecomposition, later sweeps reuse the cached factor.
``MAP step`` is a forward and backward pass of the mean loss on the same 16 inputs, for scale.

Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp-wait-policy`` says otherwise: on a machine
whose cores are busy with other jobs, MKL's multi-threaded ``eigh`` of a 160 x 160 matrix (one per
micro-batch) otherwise spins for about a second instead of taking milliseconds.

    python benchmarks/laplace_compare.py --quick --threads 2
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.metrics import (
    Accuracy,
    ExpectedCalibrationError,
    NegativeLogLikelihood,
)
from lightning_bayes.models import MLP, LeNet5, load_trained_weights
from lightning_bayes.predictive import CategoricalPredictive

from peak_memory import PeakMemory, cap_data_memory, describe_error, synchronize  # benchmarks/peak_memory.py
from arguments import positive_int  # benchmarks/arguments.py

MICRO_BATCH = 16  # ours: examples per projection step (the reference's B)
INPUT_DIM = 784  # part 2's synthetic MLP inputs
LAPLACE_ROWS = [  # (row name, subset_of_weights, hessian_structure)
    ("LL-KFAC", "last_layer", "kron"),
    ("diag", "all", "diag"),
    ("KFAC", "all", "kron"),
]
BACKENDS = ("curvlinops", "asdl")


# ----- helpers ---------------------------------------------------------------------------------------
def number_or_name(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_row(values: list[str], widths: list[int], left_last: bool = False) -> str:
    cells = [v.rjust(w) for v, w in zip(values, widths, strict=True)]
    if left_last:
        cells[-1] = values[-1].ljust(widths[-1])
    return "  ".join(cells).rstrip()


def print_table(header: list[str], rows: list[list[str]], left_last: bool = False) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print(format_row(row, widths, left_last))


# ----- part 1: the trained model and the data ----------------------------------------------------------
def prepare(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Train (or load) the MAP LeNet-5, take N training and the test images, save all in ``path``."""
    from lightning.pytorch import Trainer

    from lightning_bayes.datamodules import MNISTDataModule
    from lightning_bayes.modules import MAP

    data = MNISTDataModule(batch_size=128, seed=args.seed)
    data.setup()  # the training and the test splits
    torch.manual_seed(args.seed)
    model = LeNet5(num_classes=10)
    info: dict[str, Any] = {}
    if args.checkpoint:
        info["source"] = f"checkpoint {load_trained_weights(model, args.checkpoint)}"
    else:
        start = time.perf_counter()
        trainer = Trainer(
            max_steps=args.map_steps, accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
            logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            limit_val_batches=0,
        )  # fmt: skip
        optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
        trainer.fit(MAP(model, optimizer=optimizer), train_dataloaders=data.train_dataloader())
        info["source"] = (
            f"trained here: {args.map_steps} AdamW steps of batch 128 on the {data.num_train} MNIST training "
            f"images ({time.perf_counter() - start:.0f} s)"
        )
    train_x, train_y = (t[: args.num_train] for t in data.train_set.tensors)  # type: ignore[union-attr]
    test_x, test_y = (t[: args.num_test] for t in data.test_set.tensors)  # type: ignore[union-attr]
    model = model.cpu().eval()
    torch.save(
        {"state_dict": model.state_dict(), "train": (train_x, train_y), "test": (test_x, test_y)}, path
    )
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["last_layer"] = sum(p.numel() for p in model.head.parameters())
    return info


def load_setup(path: Path, device: torch.device) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = LeNet5(num_classes=10)
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), TensorDataset(*saved["train"]), TensorDataset(*saved["test"])


def evaluate(batches: list[tuple[CategoricalPredictive, Tensor]]) -> dict[str, float]:
    metrics = {"acc": Accuracy(), "nll": NegativeLogLikelihood(), "ece": ExpectedCalibrationError(n_bins=15)}
    for predictive, y in batches:
        for metric in metrics.values():
            metric.update(predictive, y)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def from_probs(probs: Tensor) -> CategoricalPredictive:
    """A one-sample predictive whose model average is ``probs`` (laplace-torch returns probabilities)."""
    return CategoricalPredictive(probs.double().clamp_min(1e-300).log().unsqueeze(0))


def run_method(method: str, args: argparse.Namespace, setup: Path) -> dict[str, Any]:
    """Fit and evaluate one method in this (fresh) process."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, train, test = load_setup(setup, device)
    test_loader = DataLoader(test, batch_size=args.batch_size)
    with torch.no_grad():
        model(test.tensors[0][: args.batch_size].to(device))  # warm-up: allocator and kernels
    fit: Callable[[], dict[str, Any]]
    predict: Callable[[Tensor], CategoricalPredictive]
    result: dict[str, Any] = {}

    if method == "MAP":
        fit = dict
        predict = lambda x: CategoricalPredictive(model(x).unsqueeze(0))
    elif method == "ours":
        from lightning.pytorch import Trainer

        from lightning_bayes.modules import NullSpaceLaplace

        module = NullSpaceLaplace(
            model, params="all", constraint="output", num_samples=args.samples, alpha=number_or_name(args.alpha)
        )
        trainer = Trainer(
            max_epochs=args.sweeps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        )  # fmt: skip

        def fit() -> dict[str, Any]:
            trainer.fit(module, train_dataloaders=DataLoader(train, batch_size=MICRO_BATCH, shuffle=False))
            module.to(device)
            return {"note": f"alpha={module.alpha():.3g}, rank~{module.rank():.0f}, {args.sweeps} sweeps"}

        predict = lambda x: cast(CategoricalPredictive, module.predictive(x))  # the default categorical likelihood
    else:
        from laplace import Laplace
        from laplace.curvature import AsdlGGN, CurvlinopsGGN

        name, backend = method.rsplit("/", 1)
        _, subset, structure = next(row for row in LAPLACE_ROWS if row[0] == name)
        la = Laplace(
            model, "classification", subset_of_weights=subset, hessian_structure=structure,
            backend={"curvlinops": CurvlinopsGGN, "asdl": AsdlGGN}[backend],
        )  # fmt: skip

        def fit() -> dict[str, Any]:
            la.fit(DataLoader(train, batch_size=args.batch_size, shuffle=False))
            synchronize(device)
            fitted = time.perf_counter()
            la.optimize_prior_precision(pred_type="glm", method="marglik", link_approx=args.link_approx)
            return {"prior_s": time.perf_counter() - fitted, "note": f"prior prec {float(la.prior_precision.mean()):.3g}"}

        predict = lambda x: from_probs(  # classification: a tensor of probabilities, not a (mean, variance) pair
            cast(Tensor, la(x, pred_type="glm", link_approx=args.link_approx, n_samples=args.samples))
        )

    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        cap_data_memory(args.max_gb)
    memory = PeakMemory(device)
    try:
        memory.start()
        start = time.perf_counter()
        result.update(fit())
        synchronize(device)
        result["fit_s"] = time.perf_counter() - start
        result["fit_mb"] = memory.peak()
        memory.start()
        start = time.perf_counter()
        batches = []
        with torch.no_grad():
            for x, y in test_loader:
                batches.append((predict(x.to(device)), y.to(device)))
        synchronize(device)
        result["predict_s"] = time.perf_counter() - start
        result["predict_mb"] = memory.peak()
    except (MemoryError, RuntimeError, ValueError) as error:
        result["error"] = describe_error(error, args.max_gb if device.type == "cpu" else 0)
        result["fit_mb" if "fit_mb" not in result else "predict_mb"] = memory.peak()
    if "error" not in result:
        result.update(evaluate([(p.__class__(p.logits.cpu()), y.cpu()) for p, y in batches]))
    return result


# ----- part 2: our step as P and O grow ----------------------------------------------------------------
def width_for(parameters: float, outputs: int) -> int:
    """Hidden width w of ``784 -> w -> w -> O`` with about ``parameters`` parameters."""
    b = INPUT_DIM + 2 + outputs  # P = w^2 + (784 + 2 + O) w + O
    return max(1, round((-b + math.sqrt(b * b + 4 * (parameters - outputs))) / 2))


def scaling_cases(args: argparse.Namespace) -> list[tuple[str, str, int, float]]:
    """(what varies, constraint, O, target P): P from 1e4 to 1e6 at O = 10, then O in {2, 10, 100} at P ~ 1e5."""
    grid = (1e4, 1e5, 1e6) if args.quick else (1e4, 3e4, 1e5, 3e5, 1e6)
    cases = [("P", "output", 10, p) for p in grid]
    cases += [("O", c, o, 1e5) for c in ("output", "loss") for o in (2, 10, 100)]
    return cases


def scaling_case(constraint: str, outputs: int, target: float, args: argparse.Namespace) -> dict[str, Any]:
    """Time our step (and a MAP step) on a ``784 -> w -> w -> outputs`` MLP with about ``target`` parameters."""
    from lightning_bayes.inference.likelihoods import build_likelihood
    from lightning_bayes.inference.linalg import (
        GramFactor,
        LossConstraint,
        ParameterFunction,
        gram,
        output_constraint,
    )
    from lightning_bayes.inference.nullspace import AlternatingProjections

    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 5)
    likelihood = build_likelihood("categorical")
    torch.manual_seed(args.seed)
    model = MLP(INPUT_DIM, outputs, hidden=[width_for(target, outputs)] * 2).to(device).eval()
    row: dict[str, Any] = {"constraint": constraint, "O": outputs, "P": sum(p.numel() for p in model.parameters())}
    row["M"] = MICRO_BATCH * (outputs if constraint == "output" else 1)
    x = torch.randn(MICRO_BATCH, INPUT_DIM, device=device)
    y = torch.randint(0, outputs, (MICRO_BATCH,), device=device)
    try:
        def map_step() -> None:
            model.zero_grad(set_to_none=True)
            likelihood.loss(model(x), y).backward()

        row["map_ms"] = 1e3 * median_seconds(map_step, max(repeats, 20), device)  # short: more repeats
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        chosen = output_constraint if constraint == "output" else LossConstraint(likelihood)
        function = ParameterFunction(model, "all", chosen)
        projections = AlternatingProjections(function.size, args.samples, seed=args.seed).to(device)
        row["jac_ms"] = 1e3 * median_seconds(lambda: function.jacobian(x, y), repeats, device)
        jacobian = function.jacobian(x, y)
        g = gram(jacobian)
        row["eigh_ms"] = 1e3 * median_seconds(partial(GramFactor.of, g), repeats, device)
        row["first_ms"] = 1e3 * median_seconds(partial(projections.project, jacobian), repeats, device)
        projections.project(jacobian, key=0)
        row["cached_ms"] = 1e3 * median_seconds(partial(projections.project, jacobian, key=0), repeats, device)
        del jacobian, g  # freed before the memory probe
        memory = PeakMemory(device)
        memory.start()
        projections.project(function.jacobian(x, y))  # one first-sweep step, for its peak memory
        row["peak_mb"] = memory.peak()
    except (MemoryError, RuntimeError) as error:
        row["error"] = describe_error(error, args.max_gb if device.type == "cpu" else 0)
    return row


def run_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    if device.type == "cpu":
        cap_data_memory(args.max_gb)
    rows = []
    for varies, constraint, outputs, target in scaling_cases(args):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append({"varies": varies, **scaling_case(constraint, outputs, target, args)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


# ----- the parent: one worker process per method ------------------------------------------------------
def run_worker(task: str, args: argparse.Namespace, workdir: Path) -> Any:
    """Run ``task`` in a fresh interpreter (same arguments); its answer comes back through a JSON file."""
    out = workdir / f"{task.replace('/', '_')}.json"
    env = dict(os.environ)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", task, "--workdir", str(workdir)]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    if out.is_file():
        return json.loads(out.read_text())
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    reason = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    print(f"[{task}] failed ({reason}):\n  " + "\n  ".join(tail), file=sys.stderr)
    return {"error": f"worker {reason}" + (" (OOM killer?)" if done.returncode == -9 else "")}


def methods(args: argparse.Namespace) -> list[str]:
    return ["MAP", "ours"] + [f"{name}/{b}" for b in args.backends for name, _, _ in LAPLACE_ROWS]


def print_comparison(results: dict[str, dict[str, Any]]) -> None:
    def peak(r: dict[str, Any]) -> float | None:
        values = [r[k] for k in ("fit_mb", "predict_mb") if r.get(k) is not None]
        return max(values) if values else None

    ours = results.get("ours", {})
    header = ["method", "fit s", "predict s", "fit MB", "predict MB", "acc", "NLL", "ECE", "fit/ours", "peak/ours",
              "notes"]  # fmt: skip
    rows = []
    for method, r in results.items():
        notes = r.get("note", "") + (f" (marglik {r['prior_s']:.1f} s)" if "prior_s" in r else "")
        if "error" in r:
            notes = r["error"] + (" while predicting" if "fit_s" in r else "")
        row = [method, "-" if method == "MAP" or "fit_s" not in r else f"{r['fit_s']:.1f}"]
        row.append(f"{r['predict_s']:.1f}" if "predict_s" in r else "-")
        row += [f"{r[k]:.0f}" if r.get(k) is not None else "-" for k in ("fit_mb", "predict_mb")]
        row += [f"{r[k]:.4f}" if k in r else "-" for k in ("acc", "nll", "ece")]
        fit_ratio = r["fit_s"] / ours["fit_s"] if method != "MAP" and "fit_s" in r and ours.get("fit_s") else None
        ours_peak, this_peak = peak(ours), peak(r)
        peak_ratio = this_peak / ours_peak if this_peak is not None and ours_peak and "error" not in r else None
        row += [f"{fit_ratio:.2f}" if fit_ratio else "-", f"{peak_ratio:.2f}" if peak_ratio is not None else "-", notes]
        rows.append(row)
    print_table(header, rows, left_last=True)


def print_scaling(rows: list[dict[str, Any]]) -> None:
    header = ["varies", "constraint", "O", "P", "M_b", "MAP step ms", "J_b ms", "eigh ms", "proj ms (1st)", "proj ms (cached)",
              "step ms (1st)", "step ms (cached)", "step/MAP", "J_b MB", "peak MB"]  # fmt: skip
    table = []
    for r in rows:
        row = [r["varies"], r["constraint"], str(r["O"]), f"{r['P']:.3g}", str(r["M"])]
        if "cached_ms" not in r:
            table.append(row + [f"{r['map_ms']:.1f}" if "map_ms" in r else "-"] + ["-"] * (len(header) - 7)
                         + [r.get("error", "?")])  # fmt: skip
            continue
        first, cached = r["jac_ms"] + r["first_ms"], r["jac_ms"] + r["cached_ms"]
        row += [f"{r[k]:.1f}" for k in ("map_ms", "jac_ms", "eigh_ms", "first_ms", "cached_ms")]
        row += [f"{first:.1f}", f"{cached:.1f}", f"{cached / r['map_ms']:.0f}", f"{4 * r['M'] * r['P'] / 2**20:.0f}"]
        row.append(f"{r['peak_mb']:.0f}")
        table.append(row)
    print_table(header, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=None,
        help="torch intra-op threads (CPU), in every worker")
    parser.add_argument("--quick", action="store_true", help="fewer MAP steps, N, test images, sweeps and P values")
    parser.add_argument("--checkpoint", default=None, help="MAP checkpoint of configs/mnist/map.yaml (glob ok)")
    parser.add_argument("--map-steps", type=positive_int, default=None,
        help="MAP training steps (default 2000, quick 300)")
    parser.add_argument("--num-train", type=positive_int, default=None,
        help="N training examples (default 10000, quick 2000)")
    parser.add_argument("--num-test", type=positive_int, default=None, help="test images (default 10000, quick 1000)")
    parser.add_argument("--sweeps", type=positive_int, default=None, help="our sweeps T (default 10, quick 2)")
    parser.add_argument("--samples", type=positive_int, default=30,
        help="our posterior samples S (and MC link samples)")
    parser.add_argument("--alpha", default="evidence", help="our prior precision: a number or a rule name")
    parser.add_argument("--batch-size", type=positive_int, default=32,
        help="laplace-torch fit batches and all test batches")
    parser.add_argument("--link-approx", default="probit", choices=["probit", "mc", "bridge"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                        help="laplace-torch curvature backends (curvlinops is its default)")  # fmt: skip
    parser.add_argument("--skip", nargs="*", default=[], choices=["compare", "scaling"], help="parts to leave out")
    parser.add_argument("--repeats", type=positive_int, default=None,
        help="timed repeats per part-2 case (default 5, quick 2)")
    parser.add_argument("--max-gb", type=float, default=None, help="per-worker memory cap on CPU (default 6; 0: none)")
    parser.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "inherit"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.map_steps = args.map_steps or (300 if quick else 2000)
    args.num_train = args.num_train or (2000 if quick else 10000)
    args.num_test = args.num_test or (1000 if quick else 10000)
    args.sweeps = args.sweeps or (2 if quick else 10)
    args.max_gb = 6.0 if args.max_gb is None else args.max_gb
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    if args.worker is not None:  # a child: one task, answer in a file
        workdir = Path(args.workdir)
        task = args.worker
        answer = run_scaling(args) if task == "scaling" else run_method(task, args, workdir / "setup.pt")
        (workdir / f"{task.replace('/', '_')}.json").write_text(json.dumps(answer))
        return

    import laplace  # noqa: F401  # missing, it stops here, before any work, with the usual ImportError

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if on_cuda else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}, laplace-torch {importlib.metadata.version('laplace-torch')}, "
        f"OMP_WAIT_POLICY={args.omp_wait_policy if args.omp_wait_policy != 'inherit' else os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"one process per method" + ("" if on_cuda else f", memory cap {args.max_gb:g} GB per process")
    )
    with tempfile.TemporaryDirectory(prefix="laplace_compare_") as tmp:
        workdir = Path(tmp)
        if "compare" not in args.skip:
            info = prepare(args, workdir / "setup.pt")
            print(
                f"LeNet-5 MAP ({info['parameters']} parameters, last layer {info['last_layer']}), {info['source']}; "
                f"posteriors on N={args.num_train} training images, tested on {args.num_test} MNIST test images "
                f"in batches of {args.batch_size}"
            )
            print(
                f"ours: all layers, output constraint, micro-batch {MICRO_BATCH}, T={args.sweeps} sweeps, S={args.samples}, "
                f"alpha={args.alpha}, linearised; laplace-torch: GGN, fit batch {args.batch_size}, marglik prior "
                f"precision, GLM predictive ({args.link_approx})"
            )
            results = {}
            for method in methods(args):
                results[method] = run_worker(method, args, workdir)
                print(f"  {method}: done", file=sys.stderr, flush=True)
            print(
                f"MB: peak {'CUDA memory allocated' if on_cuda else 'resident set size'} above the start of each phase; "
                "peak/ours compares the larger of the two"
            )
            print_comparison(results)
        if "scaling" not in args.skip:
            print(
                f"\nour cost per micro-batch step (B={MICRO_BATCH}, S={args.samples}, MLP 784-w-w-O, synthetic inputs; "
                f"median of {args.repeats or (2 if quick else 5)}): 1st = first sweep (Gram + eigh), cached = later sweeps"
            )
            rows = run_worker("scaling", args, workdir)
            if isinstance(rows, dict):
                print(f"part 2 failed: {rows['error']}")
            else:
                print_scaling(rows)


if __name__ == "__main__":
    main()
