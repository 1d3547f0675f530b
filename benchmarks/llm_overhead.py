"""Per-step time and peak memory of each Bayesian LoRA method against plain (Q)LoRA, measured in one run.

Every method is its config in ``configs/text/`` (plain LoRA is MAP-LoRA, ``text/map_lora_smollm2.yaml``; with
``--four-bit`` every config gets the NF4 overlay ``text/nf4.yaml`` and the baseline is plain QLoRA), instantiated
through the CLI (``lightning_bayes.cli.run(..., subcommand=False)``) in a fresh process of its own, then trained
``--warmup`` + ``--steps`` steps on the same batches by a Trainer with the config's precision and gradient
clipping and the callbacks its method needs. Reported: the median step time after warm-up and the peak memory
from before the model is built
to the end of training (weights, activations, optimiser and posterior state: CUDA ``max_memory_allocated``; CPU
the resident high-water mark above the interpreter's), each as a ratio to the baseline's.
The LoRA ensemble (M adapters, M forward passes) and the curve (three LoRA control points) are reported apart,
as the acceptance criterion does; TFB and the null-space Laplace are post hoc and have no training step.

    python benchmarks/llm_overhead.py --four-bit --steps 5              # a CUDA device: the QLoRA table
    python benchmarks/llm_overhead.py --four-bit --steps 3 --threads 2  # CPU: bitsandbytes' CPU backend
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from arguments import non_negative_int, positive_int  # benchmarks/arguments.py

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "MAP-LoRA"
METHODS = {  # name -> (config, reported apart from the criterion)
    BASELINE: ("text/map_lora_smollm2.yaml", False),
    "BLoB": ("text/blob_smollm2.yaml", False),
    "IVON-LoRA": ("text/ivon_lora_smollm2.yaml", False),
    "LoRA ensemble (5)": ("text/deep_ensemble_lora_smollm2.yaml", True),
    "LoRA curve": ("text/lora_curve.yaml", True),
}


def measure(spec: dict[str, Any]) -> dict[str, float]:
    """One method in this process: instantiate its config, train, return ``{"step_s", "peak_mb"}``."""
    import torch
    from lightning.pytorch import Trainer
    from peak_memory import PeakMemory
    from step_timer import StepTimer

    from lightning_bayes.callbacks import CurveTraining
    from lightning_bayes.cli import run

    torch.set_num_threads(spec["threads"])
    overlay = ["--config", str(ROOT / "configs/text/nf4.yaml")] if spec["four_bit"] else []
    data = [f"--data.init_args.batch_size={spec['batch_size']}", "--trainer.logger=false"]
    if spec["data_dir"] is not None:
        data.append(f"--data.init_args.data_dir={spec['data_dir']}")
    with tempfile.TemporaryDirectory() as folder:
        # every method first builds the baseline and lets it go: the curve needs its LoRA as both ends (the step's
        # cost does not depend on where they are), and on the CPU, whose measure is resident memory above the start,
        # what that build loads (libraries, allocator pools) would otherwise count for every method but the curve
        base = run(["--config", str(ROOT / "configs" / METHODS[BASELINE][0]), *overlay, *data], subcommand=False)
        end = Path(folder) / "end.ckpt"
        torch.save({"state_dict": base.model.state_dict()}, end)
        del base
        gc.collect()
        extra = [f"--trainer.callbacks.init_args.{side}={end}" for side in ("start", "end")] if spec["name"] == (
            "LoRA curve"
        ) else []
        memory = PeakMemory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        memory.start()  # from before the model: its weights count, the interpreter's libraries do not
        cli = run(["--config", str(ROOT / "configs" / spec["config"]), *overlay, *data, *extra], subcommand=False)
        device = cli.trainer.strategy.root_device
        timer = StepTimer(stop_after=spec["warmup"] + spec["steps"])
        configured = cli.trainer.callbacks  # type: ignore[attr-defined]  # not declared; set by Lightning's connector
        callbacks = [timer, *(c for c in configured if isinstance(c, CurveTraining))]
        configured_trainer = cli.trainer
        trainer = Trainer(
            max_epochs=-1, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
            precision=configured_trainer.precision, accelerator=device.type, devices=1, default_root_dir=folder,
            gradient_clip_val=configured_trainer.gradient_clip_val,  # a step's cost as the config trains it
            gradient_clip_algorithm=configured_trainer.gradient_clip_algorithm,
        )  # fmt: skip
        trainer.fit(cli.model, datamodule=cli.datamodule)
        return {"step_s": statistics.median(timer.seconds[spec["warmup"] :]), "peak_mb": memory.peak()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--four-bit", action="store_true", help="NF4 base (the overlay text/nf4.yaml)")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed training steps per method")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads per method")
    parser.add_argument(
        "--data-dir", type=Path, help="folder with rotten_tomatoes_corpus_full.csv.bz2 (default: the packaged copy)"
    )
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS), help="these methods (and the baseline)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one method, in its own process
        print(json.dumps(measure(json.loads(args.worker))))
        return
    names = [n for n in METHODS if args.only is None or n in args.only or n == BASELINE]
    results: dict[str, dict[str, float] | str] = {}
    print(_header(args), flush=True)  # then a row per method as it ends (the baseline first): a cut run keeps them
    for name in names:
        spec = {"name": name, "config": METHODS[name][0], "four_bit": args.four_bit, "steps": args.steps,
                "warmup": args.warmup, "batch_size": args.batch_size, "threads": args.threads,
                "data_dir": None if args.data_dir is None else str(args.data_dir.resolve())}  # fmt: skip
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = done.stdout.strip().splitlines()
        results[name] = json.loads(lines[-1]) if done.returncode == 0 and lines else _failure(done.stderr)
        print(f"{name}: {results[name]}", file=sys.stderr)
        if isinstance(results[name], str):  # the worker's traceback, for the reader of a run on another machine
            print("\n".join(done.stderr.strip().splitlines()[-25:]), file=sys.stderr)
        print(_row(name, results[name], results[BASELINE]), flush=True)


def _failure(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"failed: {lines[-1][:120]}" if lines else "failed"


def _header(args: argparse.Namespace) -> str:
    label = "QLoRA" if args.four_bit else "LoRA"
    return "\n".join([
        (
            f"SmolLM2-135M, {'NF4' if args.four_bit else 'float32'} base, LoRA r=4 on q/v, batch {args.batch_size}, "
            f"median of {args.steps} steps after {args.warmup}"
        ),
        f"| method | ms / step | x plain {label} | throughput x | peak MB | x plain {label} |",
        "|---|---:|---:|---:|---:|---:|",
    ])


def _row(name: str, result: dict[str, float] | str, base: dict[str, float] | str) -> str:
    if isinstance(result, str) or isinstance(base, str):
        return f"| {name} | {result if isinstance(result, str) else 'baseline failed'} | | | | |"
    apart = " (apart)" if METHODS[name][1] else ""
    time_ratio, memory_ratio = result["step_s"] / base["step_s"], result["peak_mb"] / base["peak_mb"]
    return (
        f"| {name}{apart} | {1000 * result['step_s']:.0f} | {time_ratio:.2f} | {1 / time_ratio:.2f} | "
        f"{result['peak_mb']:.0f} | {memory_ratio:.2f} |"
    )


if __name__ == "__main__":
    main()
