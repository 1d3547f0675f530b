"""Where one VIKING training step's time goes, against a MAP step of the same network and batch, in one process.

LeNet-5 (all 44,426 weights) on the first MNIST training batch, loss constraint, dense solver. Each part is timed
``--repeats`` times, the parts interleaved so that load changes on a shared machine hit all alike; medians:

* ``MAP step``: forward, backward and a fused Adam step of the plain network (the baseline);
* ``J_b, no graph``: the per-example loss Jacobian, as a sweep builds it for each batch;
* ``J_b with its graph``: the same, kept for the projection's parameter gradient (a step builds this one);
* ``adjoint: backward through J_b``: that gradient, ``grad_theta sum_k l_k^T J_b(theta) r_k`` for the step's two
  pairs, by one backward through the kept graph (:meth:`DenseSystem.bilinear_gradient`, what a step runs);
* ``adjoint: reverse over forward``: the same gradient matrix-free (:meth:`ParameterFunction.bilinear_gradient`);
* ``sampled forward/backward``: the loss at the sampled weights and its backward;
* ``VIKING step``: the whole step (projection, sample, loss, backward through all of it), no optimiser.

The exact step costs at least the three parts it runs (J_b with its graph, its backward, the sampled pass), which
``benchmarks/viking_overhead.py`` sets against whole epochs.

    python benchmarks/viking_step_parts.py --threads 2 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_bayes.datamodules import MNISTDataModule
from lightning_bayes.inference.kernel_projection import build_system, project_to_kernel
from lightning_bayes.models import LeNet5
from lightning_bayes.modules.viking import VIKING
from arguments import positive_int  # benchmarks/arguments.py


def median_ms(parts: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each part over ``repeats`` interleaved rounds (after one untimed round)."""
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for round_ in range(repeats + 1):
        for name, part in parts.items():
            start = time.perf_counter()
            part()
            if round_:
                seconds[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="J_b and its backward under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = MNISTDataModule(batch_size=args.batch_size, shuffle=False)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    network = LeNet5()
    module = VIKING(network, phase_epochs=(0, 0, 1), num_samples=1, compile_jacobian=args.compile)
    function, optimizer = module.function, torch.optim.Adam(network.parameters(), fused=True)
    theta = function.theta()
    system = build_system(function, x, y, theta, "dense", differentiable=True)
    left, right = torch.randn(2, len(y)), torch.randn(2, function.size)

    def map_step() -> None:
        optimizer.zero_grad()
        module.likelihood.loss(network(x), y).backward()
        optimizer.step()

    def sampled_pass() -> None:
        theta_hat = module.theta_hat()
        module.likelihood.loss(function.outputs(theta_hat + 0.01 * right[0], x), y).backward()

    def viking_step() -> None:
        theta_hat = module.theta_hat()
        noise = torch.randn(1, function.size)
        kernel = project_to_kernel(theta_hat, noise, function, x, y, "dense")
        sample = module.family.sample(theta_hat, noise, kernel)[0]
        module.likelihood.loss(function.outputs(sample, x), y).backward()

    parts: dict[str, Callable[[], object]] = {
        "MAP step": map_step,
        "J_b, no graph": lambda: build_system(function, x, y, theta, "dense"),
        "J_b with its graph": lambda: build_system(function, x, y, theta, "dense", differentiable=True),
        "adjoint: backward through J_b": lambda: system.bilinear_gradient(left, right),
        "adjoint: reverse over forward": lambda: function.bilinear_gradient(x, y, left, right, theta),
        "sampled forward/backward": sampled_pass,
        "VIKING step": viking_step,
    }
    times = median_ms(parts, args.repeats)
    baseline = times["MAP step"]
    print(f"LeNet-5 on one MNIST batch of {args.batch_size}, {args.threads} thread(s)"
          f"{', compile_jacobian' if args.compile else ''}, medians of {args.repeats}")
    print(f"{'':34}{'ms':>9}{'x MAP':>8}")
    for name, milliseconds in times.items():
        print(f"{name:34}{milliseconds:9.2f}{milliseconds / baseline:8.2f}")
    floor = sum(times[name] for name in ("J_b with its graph", "adjoint: backward through J_b",
                                         "sampled forward/backward"))
    print(f"{'exact step floor (the three parts)':34}{floor:9.2f}{floor / baseline:8.2f}")


if __name__ == "__main__":
    main()
