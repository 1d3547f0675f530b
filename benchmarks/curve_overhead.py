"""Cost of a curve-training step against a MAP step, measured in one process.

Both run the same LeNet-5 ``MAP`` module through the Trainer on the same random MNIST-shaped batches; the
curve run adds :class:`lightning_bayes.callbacks.curve_training.CurveTraining` (every parameter on a
quadratic Bezier curve, one t per batch, weight decay on theta(t)). A step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` (the draw of t, forward through the parametrisation,
backward, the weight-decay gradient and the SGD step); the repeats alternate between the two runs so that
load changes on a shared machine hit both alike, and the ratio of the medians is reported.

    OMP_NUM_THREADS=1 python benchmarks/curve_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.callbacks.curve_training import CurveTraining
from lightning_bayes.models import LeNet5
from lightning_bayes.modules import MAP

from step_timer import StepTimer  # benchmarks/step_timer.py
from arguments import positive_int  # benchmarks/arguments.py


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def run(curve: bool, loader: DataLoader, steps: int, folder: str) -> list[float]:
    torch.manual_seed(0)
    module = MAP(LeNet5(num_classes=10), optimizer=sgd)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if curve:
        end = f"{folder}/end.pt"
        torch.save(MAP(LeNet5(num_classes=10)).state_dict(), end)
        callbacks.append(CurveTraining(params="all", end=end, weight_decay=5e-4))
    Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=folder,
    ).fit(module, loader)
    return timer.seconds[steps // 10 :]  # the first steps warm up allocators and caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=200, help="training steps per run")
    parser.add_argument("--repeats", type=positive_int, default=3, help="alternating MAP/curve runs")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(args.batch_size * 16, 1, 28, 28, generator=generator),
        torch.randint(0, 10, (args.batch_size * 16,), generator=generator),
    )
    loader = DataLoader(data, batch_size=args.batch_size)
    times: dict[str, list[float]] = {"map": [], "curve": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            times["map"] += run(False, loader, args.steps, folder)
            times["curve"] += run(True, loader, args.steps, folder)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"LeNet-5, batch {args.batch_size}, {args.threads} thread(s), {args.repeats} x {args.steps} steps each")
    for name, median in medians.items():
        print(f"  {name:5s} step: median {1e3 * median:.2f} ms")
    print(f"  curve / MAP step time: {medians['curve'] / medians['map']:.3f}")


if __name__ == "__main__":
    main()
