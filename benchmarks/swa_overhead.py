"""Training-time overhead of SWA/SWAG collection: MAP LeNet-5 on MNIST with and without ``SWASubspace``.

Each run is a ``Trainer.fit`` of ``MAP(LeNet5())`` (AdamW, batch 128, no validation, no logging) over the
same batches; ``with`` runs add ``SWASubspace(params="all", start_epoch=0, every_n_steps=n, max_rank=20)``
(moments on the CPU), i.e. collection during the whole run, the costliest schedule. Runs are interleaved
(baseline, callback, baseline, ...) so that load on a shared machine hits both alike, and the ratio of the
median times is printed for each ``n``: ``--every-n-steps 215`` is configs/mnist/swag.yaml's schedule (two
snapshots per epoch), ``1`` a snapshot after every optimiser step (the worst case).

    OMP_NUM_THREADS=1 python benchmarks/swa_overhead.py --epochs 2 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import cast

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_bayes.callbacks.swa_subspace import SWASubspace
from lightning_bayes.datamodules import MNISTDataModule
from lightning_bayes.models import LeNet5
from lightning_bayes.modules import MAP
from arguments import positive_int  # benchmarks/arguments.py


def timed_fit(data: MNISTDataModule, epochs: int, callbacks: list[Callback]) -> float:
    """Seconds of one ``fit`` (model built before the clock starts)."""
    seed_everything(0, verbose=False)
    module = MAP(LeNet5(num_classes=10), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2))
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=2, help="epochs per fit (430 steps each)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="fits per setting (interleaved)")
    parser.add_argument("--every-n-steps", type=positive_int, nargs="+", default=[215, 1], help="collection intervals")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per fit is noise here
    data = MNISTDataModule(batch_size=128, seed=0)
    timed_fit(data, 1, [])  # warm-up: data loading into memory, first-call allocations
    times: dict[str, list[float]] = cast("dict[str, list[float]]", {"baseline": []}) | {
        f"every {n}": [] for n in args.every_n_steps
    }
    for _ in range(args.repeats):
        times["baseline"].append(timed_fit(data, args.epochs, []))
        for n in args.every_n_steps:
            callback = SWASubspace(params="all", start_epoch=0, every_n_steps=n, max_rank=20)
            times[f"every {n}"].append(timed_fit(data, args.epochs, [callback]))
    baseline = statistics.median(times["baseline"])
    print(f"MAP LeNet-5, {args.epochs} epochs x 430 steps, {args.repeats} interleaved fits, {args.threads} thread(s)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>10}: median {median:7.2f} s  (runs {', '.join(f'{v:.2f}' for v in values)})  "
              f"ratio {median / baseline:.3f}")


if __name__ == "__main__":
    main()
