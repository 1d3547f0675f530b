"""Cost of a VIKING training epoch relative to a MAP epoch of the same network, data and batches, in one process.

Both run through the Lightning ``Trainer`` on the first ``--batches`` MNIST training batches (LeNet-5, all
44,426 weights): MAP with Adam, VIKING in its full-ELBO phase (epoch-start sweep over the same batches,
then one projected sample per step). An epoch is timed from ``on_train_epoch_start`` (before the module's
sweep) to ``on_train_epoch_end``; the epochs alternate MAP / VIKING ``--repeats`` times and the medians are
compared, so load changes on a shared machine hit both alike. Each sweep projects the carried noise and
``--num-samples`` posterior samples (configs/mnist/viking.yaml's 100: they share the sweep's Jacobians but add
their projections). Two VIKING rows: with the reference's sweep at every epoch start, and with
``sweep_every_n_epochs=0`` (no sweep during training); and the cost of one sweep alone over the same batches. ``--compile`` adds the rows again with ``compile_jacobian=True`` (the
per-example Jacobians and their backward under ``torch.compile``; compiled before the timed epochs).

    python benchmarks/viking_overhead.py --batches 100 --threads 2 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_bayes.datamodules import MNISTDataModule
from lightning_bayes.models import LeNet5
from lightning_bayes.modules import MAP
from lightning_bayes.modules.viking import VIKING
from arguments import positive_int  # benchmarks/arguments.py


class EpochTimer(Callback):
    """Wall-clock seconds of every training epoch (callback hooks run before the module's own)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _synchronize(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; a CPU has nothing queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(module: LightningModule, data: MNISTDataModule, batches: int, accelerator: str) -> float:
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as root:
        Trainer(
            max_epochs=1, limit_train_batches=batches, limit_val_batches=0, accelerator=accelerator, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
            default_root_dir=root,
        ).fit(module, datamodule=data)
    return timer.seconds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=positive_int, default=100, help="training batches per epoch")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--constraint", default="loss", choices=["loss", "output"])
    parser.add_argument("--solver", default="dense", choices=["dense", "cg"])
    parser.add_argument("--gamma", type=float, default=0.2, help="1: the epoch-start split, no per-step projection")
    parser.add_argument("--num-samples", type=positive_int, default=100,
                        help="posterior samples every sweep projects (configs/mnist/viking.yaml: 100)")
    parser.add_argument("--compile", action="store_true", help="also time VIKING with compile_jacobian=True")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = MNISTDataModule(batch_size=args.batch_size, shuffle=False)

    def map_module() -> MAP:
        return MAP(LeNet5(), optimizer=torch.optim.Adam)

    def viking_module(sweep_every_n_epochs: int = 1, compile_jacobian: bool = False) -> VIKING:
        return VIKING(
            LeNet5(), constraint=args.constraint, solver=args.solver, phase_epochs=(0, 0, 1), num_samples=args.num_samples,
            gamma=args.gamma, sweep_every_n_epochs=sweep_every_n_epochs, optimizer=torch.optim.Adam,
            compile_jacobian=compile_jacobian,
        )

    variants = [False]
    if args.compile:  # compile the per-example Jacobians (with and without their graph) before the timed epochs
        try:
            epoch_seconds(viking_module(1, True), data, 2, args.accelerator)
            variants.append(True)
        except RuntimeError as error:  # e.g. no C++ compiler or Triton: the eager rows still get measured
            print(f"compile_jacobian failed, eager rows only: {error}")
    times: dict[str, list[float]] = {"map": []}
    for _ in range(args.repeats):
        times["map"].append(epoch_seconds(map_module(), data, args.batches, args.accelerator))
        for compiled in variants:
            times.setdefault(f"viking {compiled}", []).append(
                epoch_seconds(viking_module(1, compiled), data, args.batches, args.accelerator)
            )
            if args.gamma < 1:  # gamma = 1 needs the sweep
                times.setdefault(f"no_sweep {compiled}", []).append(
                    epoch_seconds(viking_module(0, compiled), data, args.batches, args.accelerator)
                )
    for compiled in variants:
        sweep = viking_module(1, compiled).to(args.accelerator)
        for _ in range(args.repeats):
            start = time.perf_counter()
            sweep.sweep(data.train_dataloader(), args.batches)
            _synchronize(sweep.device)
            times.setdefault(f"sweep {compiled}", []).append(time.perf_counter() - start)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    map_s = medians["map"]
    hardware = torch.cuda.get_device_name() if args.accelerator == "cuda" else f"{args.threads} thread(s)"
    print(f"LeNet-5 on MNIST, {args.batches} batches of {args.batch_size}, {hardware}, "
          f"constraint={args.constraint}, solver={args.solver}, gamma={args.gamma}, "
          f"num_samples={args.num_samples}, medians of {args.repeats}")
    print(f"{'':42}{'seconds':>10}{'x MAP':>8}")
    print(f"{'MAP epoch':42}{map_s:10.2f}{1.0:8.2f}")
    for compiled in variants:
        suffix = ", compile_jacobian" if compiled else ""
        rows = (("viking", "VIKING epoch"), ("no_sweep", "VIKING epoch, no sweep"), ("sweep", "one sweep alone"))
        for key, label in rows:
            if f"{key} {compiled}" in medians:
                seconds = medians[f"{key} {compiled}"]
                print(f"{label + suffix:42}{seconds:10.2f}{seconds / map_s:8.2f}")
            elif key == "no_sweep":
                print(f"{label + suffix:42}{'(gamma = 1 needs the sweep: not run)':>18}")


if __name__ == "__main__":
    main()
