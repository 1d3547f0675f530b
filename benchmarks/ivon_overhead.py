"""Cost of an IVON training step against an AdamW MAP step, measured in one process.

Both train LeNet-5 through the Trainer on the same random MNIST-shaped batches: ``MAP`` with AdamW, and
:class:`~lightning_bayes.modules.ivon.IVONModule` with :class:`~lightning_bayes.optim.IVON` at ``mc_samples`` 1
(and optionally more). A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (IVON: the draw,
forward, backward and update inside ``optimizer.step``); the repeats alternate between the runs so that load
changes on a shared machine hit all alike, and ratios of medians are reported, with the bytes of optimiser state
(IVON: ``h`` and ``g_bar`` per parameter; AdamW: two moments).

    OMP_NUM_THREADS=1 python benchmarks/ivon_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.models import LeNet5
from lightning_bayes.modules import MAP
from lightning_bayes.modules.ivon import IVONModule
from lightning_bayes.optim import IVON

from step_timer import StepTimer  # benchmarks/step_timer.py
from arguments import positive_int  # benchmarks/arguments.py


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def build(name: str, samples: int, size: int) -> LightningModule:
    torch.manual_seed(0)
    if name == "adamw":
        return MAP(LeNet5(num_classes=10))
    return IVONModule(LeNet5(num_classes=10), dataset_size=size,
                      optimizer=lambda params, ess: IVON(params, ess, lr=0.1, mc_samples=samples))


def run(module: LightningModule, loader: DataLoader, steps: int, folder: str) -> tuple[list[float], int]:
    timer = StepTimer()
    trainer = Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], default_root_dir=folder,
    )
    trainer.fit(module, loader)
    return timer.seconds[steps // 10 :], state_bytes(trainer.optimizers[0])  # the first steps warm up caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=200, help="training steps per run")
    parser.add_argument("--repeats", type=positive_int, default=3, help="alternating runs")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--mc-samples", type=positive_int, nargs="+", default=[1, 2], help="IVON runs, one per value")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    size = args.batch_size * 16
    data = TensorDataset(torch.randn(size, 1, 28, 28, generator=generator),
                         torch.randint(0, 10, (size,), generator=generator))
    loader = DataLoader(data, batch_size=args.batch_size)
    runs = [("adamw", 1)] + [("ivon", s) for s in args.mc_samples]
    times: dict[tuple[str, int], list[float]] = {r: [] for r in runs}
    memory: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for name, samples in runs:
                seconds, memory[name, samples] = run(build(name, samples, size), loader, args.steps, folder)
                times[name, samples] += seconds
    medians = {r: statistics.median(v) for r, v in times.items()}
    base = medians["adamw", 1]
    print(f"LeNet-5, batch {args.batch_size}, {args.threads} thread(s), {args.repeats} x {args.steps} steps each")
    for (name, samples), median in medians.items():
        label = "AdamW MAP" if name == "adamw" else f"IVON S={samples}"
        print(f"  {label:10s} step: median {1e3 * median:.2f} ms ({median / base:.3f} x AdamW), "
              f"optimiser state {memory[name, samples] / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
