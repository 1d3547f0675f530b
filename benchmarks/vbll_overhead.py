"""Training-step cost of our VBLL heads vs a plain softmax head and vs ``vbll==0.4.9``, in one process.

A step is ``zero_grad``, forward, loss, backward and an AdamW step. Three heads run side by side on the
same inputs, their repeats interleaved so that load changes on a shared machine hit all three alike:

* ``softmax``: ``nn.Linear(D, K)`` + cross-entropy;
* ``ours``: :class:`lightning_bayes.inference.vbll.DiscriminativeVBLL` (Jensen bound);
* ``compiled`` (with ``--compile``): ours with its loss under ``torch.compile`` as ``compile_loss=True`` runs it
  (:func:`lightning_bayes.modules.vbll.compiled_head_loss`: the head's forward and backward fused into a few
  kernels; on a GPU a small head's eager step is bound by kernel launches, not arithmetic);
* ``vbll``: ``vbll.DiscClassification`` used as documented, ``out = layer(x); out.train_loss_fn(y)``
  (its ``forward`` also draws the 20-sample predictive).

``head`` rows time the head alone on fixed features that take gradients (as a backbone's output
does); ``model`` rows put the head on a real backbone (LeNet-5 on 28x28 inputs, D = 84; timm
ResNet-18 on 32x32 inputs, D = 512). Peak memory is ``torch.cuda.max_memory_allocated`` above the
memory in use before the head was built (CUDA only: a CPU process's peak RSS is a lifetime high-water
mark, not a per-measurement figure). Cases whose estimated footprint exceeds ``--max-gb`` are skipped
and listed; e.g. a dense head at D = 2048, K = 1000 has 4.2e9 covariance parameters.

    python benchmarks/vbll_overhead.py --device cpu --threads 2 --quick
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import vbll
from torch import Tensor, nn

from lightning_bayes.inference.vbll import PARAMETERIZATIONS, DiscriminativeVBLL, Parameterization
from lightning_bayes.models import LeNet5, timm_backbone
from lightning_bayes.modules.vbll import compiled_head_loss, head_loss
from arguments import non_negative_int, positive_int  # benchmarks/arguments.py

DATASET_SIZE = 50_000  # lambda = 1/N; it does not change the cost
RANK = 3
FULL_GRID = [(d, k, 128) for d in (84, 512, 2048) for k in (10, 100, 1000)] + [(128, 10, 32)]
QUICK_GRID = [(84, 10, 128), (128, 10, 32), (512, 10, 128), (512, 100, 128), (2048, 1000, 128)]
BACKBONES = {"lenet": (84, (1, 28, 28)), "resnet18": (512, (3, 32, 32))}
HEADS = ("softmax", "ours", "compiled", "vbll")


@dataclass(frozen=True)
class Case:
    mode: str  # "head" or a backbone name
    width: int
    classes: int
    batch: int
    parameterization: Parameterization


def estimated_gb(head: str, case: Case) -> float:
    """Rough float32 footprint of one head's step (parameters, AdamW state, gradients, largest temporaries)."""
    d, k, b, p = case.width, case.classes, case.batch, case.parameterization
    if head == "softmax":
        floats = 4 * k * d + 4 * b * k
    elif head == "compiled":
        return estimated_gb("ours", case)
    elif p == "dense" and head == "ours":  # packed triangles (+ grad, AdamW state), arranged D x KD (+ grad)
        floats = 4 * k * d * d + 4 * b * k * d
    elif p == "dense":  # square triangles (+ grad, AdamW state), built L, and the B x K x D x D broadcast
        floats = 6 * k * d * d + 3 * b * k * d * d
    elif p == "lowrank":
        floats = 4 * k * d * (RANK + 1) + 4 * b * k * (RANK if head == "ours" else d * (RANK + 1))
    else:
        floats = 8 * k * d + (4 * b * k if head == "ours" else 4 * b * k * d)
    return 4 * floats / 2**30


def build_head(head: str, case: Case) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
    d, k, p = case.width, case.classes, case.parameterization
    if head == "softmax":
        linear = nn.Linear(d, k)
        return linear, lambda x, y: F.cross_entropy(linear(x), y)
    if head in ("ours", "compiled"):
        ours = DiscriminativeVBLL(d, k, 1.0 / DATASET_SIZE, p, rank=RANK)
        if head == "compiled":
            torch._dynamo.reset()  # every case compiles afresh rather than counting towards the recompile limit
        loss = compiled_head_loss if head == "compiled" else head_loss
        return ours, lambda x, y: loss(ours, x, y).total
    theirs = vbll.DiscClassification(d, k, 1.0 / DATASET_SIZE, p, cov_rank=RANK)
    return theirs, lambda x, y: theirs(x).train_loss_fn(y)


def build_backbone(name: str) -> nn.Module:
    return LeNet5(num_classes=0) if name == "lenet" else timm_backbone("resnet18", num_classes=0)


def make_step(head: str, case: Case, device: torch.device) -> Callable[[], None]:
    """One training step of ``head`` (with a fresh backbone in ``model`` mode) on fixed random data."""
    torch.manual_seed(0)
    module, loss_fn = build_head(head, case)
    y = torch.randint(0, case.classes, (case.batch,), device=device)
    if case.mode == "head":
        features = torch.randn(case.batch, case.width, device=device, requires_grad=True)
        backbone: nn.Module = nn.Identity()
        inputs = features
    else:
        backbone = build_backbone(case.mode)
        inputs = torch.randn(case.batch, *BACKBONES[case.mode][1], device=device)
    model = nn.ModuleDict({"backbone": backbone, "head": module}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        inputs.grad = None
        loss_fn(backbone(inputs), y).backward()
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(head: str, case: Case, device: torch.device) -> float:
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = make_step(head, case, device)
    step()
    step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del step
    return peak / 2**20


def time_case(case: Case, heads: list[str], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per step of each head, repeats interleaved across heads."""
    steps = {head: make_step(head, case, device) for head in heads}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {head: [] for head in heads}
    for _ in range(repeats):
        for head, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[head].append(time.perf_counter() - start)
    return {head: 1e3 * statistics.median(values) for head, values in times.items()}


def cases(args: argparse.Namespace) -> list[Case]:
    grid = [tuple(case) for case in args.case] if args.case else QUICK_GRID if args.quick else FULL_GRID
    found = [Case("head", d, k, b, p) for d, k, b in grid for p in args.parameterizations]
    for name in args.backbones:
        width = BACKBONES[name][0]
        found += [Case(name, width, 10, 128, p) for p in args.parameterizations]
    return found


def format_row(values: list[str], widths: list[int]) -> str:
    return "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--quick", action="store_true", help=f"grid {QUICK_GRID} and fewer repeats")
    parser.add_argument(
        "--case", type=positive_int, nargs=3, action="append", metavar=("D", "K", "B"),
        help="head rows of these sizes only",
    )
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed steps per head (default 20, quick 7)")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
        help="untimed steps per head (the first compiles)")
    parser.add_argument("--compile", action="store_true", help="add ours with its loss under torch.compile")
    parser.add_argument("--parameterizations", nargs="+", default=list(PARAMETERIZATIONS), choices=PARAMETERIZATIONS)
    parser.add_argument(
        "--backbones",
        nargs="*",
        default=list(BACKBONES),
        choices=list(BACKBONES),
        help="model rows: real backbones, D = 84 (lenet) and 512 (resnet18), K = 10, batch 128; none to skip",
    )
    parser.add_argument(
        "--max-gb",
        type=float,
        default=None,
        help="skip heads estimated above this (default: 6 on CPU, 80%% of the GPU)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (7 if args.quick else 20)
    limit = args.max_gb
    if limit is None:
        limit = 0.8 * torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 6.0
    on_cuda = device.type == "cuda"
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if on_cuda else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}, vbll {importlib.metadata.version('vbll')}, median of {repeats} steps, "
        f"step = zero_grad + forward + loss + backward + AdamW"
    )
    names = [h for h in HEADS if args.compile or h != "compiled"]
    header = ["mode", "D", "K", "B", "cov", *(f"{h} ms" for h in names), "ours/softmax"]
    header += ["compiled/softmax"] if args.compile else []
    header += ["vbll/ours"]
    if on_cuda:
        header += [f"{h} MB" for h in names]
    widths = [max(8, len(h)) for h in header]
    print(format_row(header, widths))
    skipped: list[str] = []
    for case in cases(args):
        heads = [h for h in names if estimated_gb(h, case) <= limit]
        skipped += [
            f"{h} {case.mode} D={case.width} K={case.classes} B={case.batch} {case.parameterization} "
            f"(~{estimated_gb(h, case):.0f} GB)"
            for h in names if h not in heads
        ]  # fmt: skip
        ms = time_case(case, heads, device, repeats, args.warmup)
        row = [case.mode, str(case.width), str(case.classes), str(case.batch), case.parameterization]
        row += [f"{ms[h]:.2f}" if h in ms else "-" for h in names]
        row += [f"{ms[h] / ms['softmax']:.2f}" if h in ms else "-" for h in ("ours", "compiled") if h in names]
        row.append(f"{ms['vbll'] / ms['ours']:.1f}" if "vbll" in ms and "ours" in ms else "-")
        if on_cuda:
            row += [f"{peak_memory_mb(h, case, device):.0f}" if h in heads else "-" for h in names]
        print(format_row(row, widths), flush=True)
    if skipped:
        print(f"skipped (estimated footprint above --max-gb={limit:.0f}): " + "; ".join(skipped))
    if not on_cuda:
        print("peak memory: CUDA only (a CPU process's peak RSS is a lifetime high-water mark)")


if __name__ == "__main__":
    main()
