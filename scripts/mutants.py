"""Mutation check of the core maths: do the tests fail when a formula is wrong?

For each source file it makes small arithmetic mutants (``+``/``-``, ``*``/``/``, ``**``/``@`` -> ``*``, a dropped
unary minus on an expression, a numeric literal changed: ints + 1, floats x 2), runs the file's tests on each
(``pytest -x -m "not slow"``) and reports the mutants no test kills. Argument defaults, integer call arguments
(dims, indices), ``raise``/``assert`` statements, validation ``if``s and f-strings are left alone. A surviving
mutant is either a missing test or an equivalent program (e.g. ``mu - sigma z`` for ``mu + sigma z`` with
symmetric ``z``); read each one. The source file is restored after every mutant, also on Ctrl-C.

    python scripts/mutants.py --per-file 12 --seed 0                  # every mapped file, 12 random mutants each
    python scripts/mutants.py lightning_bayes/inference/viking.py --per-file 0   # all mutants of one file
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[1]
_INFERENCE = {  # inference/<module>.py -> the tests/inference/test_<name>.py files that exercise it directly
    "viking": ["viking"], "kernel_projection": ["kernel_projection"],
    "linalg": ["linalg", "nullspace", "kernel_projection"],
    "nullspace": ["nullspace"], "vbll": ["vbll"], "swag": ["swag", "subspace"], "subspace": ["subspace"],
    "mean_field_gaussian": ["mean_field_gaussian", "bernstein"], "bernstein": ["bernstein", "bernstein_autoregressive"],
    "bernstein_autoregressive": ["bernstein_autoregressive"], "conjugate_gradient": ["conjugate_gradient"],
    "curves": ["curves"], "curve_parametrization": ["curves"], "elliptical_slice": ["elliptical_slice"],
    "jensen_shannon": ["curves"], "likelihoods": ["likelihoods"], "lora_gauge": ["lora_gauge"],
    "reparameterised_vi": ["bernstein"], "sparse_gaussian": ["ssvi"], "ssvi_scores": ["ssvi"],
    "ssvi_topology": ["ssvi"],
    "ssvi_flops": ["ssvi"], "training_free_bayes": ["tfb_canonical_form"],
    "variational_layers": ["variational_layers", "blob_lora_noise"], "batchnorm": ["batchnorm"],
}  # fmt: skip
_MODULES = {  # modules/<module>.py -> tests/modules/test_<name>.py
    "viking": ["viking_module", "viking_ddp"], "blob": ["blob_module", "blob_ddp"],
    "training_free_bayes": ["tfb_search", "tfb_ddp"], "variational_inference": ["variational_inference"],
    "ssvi": ["ssvi_module", "ssvi_ddp"], "nullspace_laplace": ["nullspace_laplace", "nullspace_laplace_ddp"],
    "subspace_inference": ["subspace_inference", "subspace_inference_ddp"],
    "ensemble": ["baselines", "lora_ensemble", "ensemble_members"],
    "ensemble_members": ["ensemble_members", "baselines"],
}  # fmt: skip
_CALLBACKS = {  # callbacks/<module>.py -> tests/callbacks/test_<name>.py
    "curve_training": ["curve_training", "curve_training_ddp"], "swa_subspace": ["swa_subspace", "swa_subspace_ddp"],
    "calibration": ["calibration_callback"], "coefficient_posterior": ["coefficient_posterior"],
    "prediction_writer": ["prediction_writer"],
}  # fmt: skip
TESTS: dict[str, list[str]] = {  # source file -> the tests that exercise it directly
    **{f"lightning_bayes/{package}/{m}.py": [f"tests/{package}/test_{t}.py" for t in tests]
       for package, table in (("inference", _INFERENCE), ("modules", _MODULES), ("callbacks", _CALLBACKS))
       for m, tests in table.items()},
    "lightning_bayes/inference/kl_cycle.py": ["tests/modules/test_blob_module.py"],
    **{f"lightning_bayes/metrics/{m}.py": ["tests/metrics"] for m in ("classification", "ood", "regression")},
    "lightning_bayes/optim/ivon.py": ["tests/optim"],
    "lightning_bayes/predictive.py": ["tests/test_predictive.py", "tests/metrics"],
    "lightning_bayes/models/timm_images.py": ["tests/models/test_timm_images.py"],
    "lightning_bayes/models/feature_cache.py": ["tests/models/test_frozen_cache.py",
                                                "tests/models/test_timm_images.py"],
    "lightning_bayes/models/frozen.py": ["tests/models/test_frozen_base.py", "tests/models/test_frozen_cache.py"],
    "lightning_bayes/modules/vbll.py": ["tests/modules/test_vbll_module.py"],
    "lightning_bayes/modules/mc_dropout.py": ["tests/modules/test_baselines.py"],
    "lightning_bayes/modules/ivon.py": ["tests/modules/test_ivon_module.py", "tests/modules/test_baselines.py"],
    "lightning_bayes/modules/base.py": ["tests/test_bad_input.py", "tests/modules/test_baselines.py",
                                       "tests/modules/test_num_samples_contract.py",
                                       "tests/modules/test_subspace_inference.py"],
    "lightning_bayes/modules/fit_length.py": ["tests/modules/test_fit_length.py",
                                              "tests/modules/test_variational_inference.py",
                                              "tests/modules/test_subspace_inference.py"],
    "lightning_bayes/datamodules/epoch_shuffle.py": ["tests/datamodules/test_epoch_shuffle.py",
                                                     "tests/datamodules/test_sampler_padding.py"],
    "lightning_bayes/datamodules/sampler_padding.py": ["tests/datamodules/test_sampler_padding.py"],
    "lightning_bayes/datamodules/regression.py": ["tests/datamodules/test_regression.py"],
    "lightning_bayes/heap.py": ["tests/test_heap.py"],
    "lightning_bayes/metrics/legacy.py": ["tests/metrics", "tests/callbacks/test_calibration_callback.py"],
    "lightning_bayes/metrics/_inputs.py": ["tests/metrics", "tests/test_bad_input.py"],
    "lightning_bayes/plots/reliability.py": ["tests/plots/test_reliability_plot.py",
                                             "tests/callbacks/test_calibration_callback.py"],
    "lightning_bayes/plots/regression.py": ["tests/plots/test_regression_plot.py"],
    "lightning_bayes/plots/curve.py": ["tests/plots/test_curve_plot.py"],
    "lightning_bayes/plots/coefficients.py": ["tests/plots/test_coefficient_plot.py",
                                              "tests/callbacks/test_coefficient_posterior.py"],
    "lightning_bayes/params.py": ["tests/test_params.py", "tests/test_bad_input.py"],
    "lightning_bayes/checks.py": ["tests/test_bad_input.py", "tests/metrics"],
    "lightning_bayes/callbacks/run_files.py": ["tests/callbacks/test_run_files.py"],
    "lightning_bayes/models/semi_structured.py": ["tests/models/test_semi_structured.py",
                                                  "tests/callbacks/test_coefficient_posterior.py"],
    **{f"lightning_bayes/models/{m}.py": ["tests/models/test_backbones.py", "tests/models/test_probe.py"]
       for m in ("lenet", "mlp")},
    "lightning_bayes/models/weights.py": ["tests/models/test_weights.py", "tests/models/test_frozen_base.py"],
    "lightning_bayes/models/identity.py": ["tests/models/test_frozen_base.py", "tests/models/test_frozen_cache.py",
                                           "tests/models/test_timm_images.py"],
    "lightning_bayes/datamodules/base.py": ["tests/test_bad_input.py", "tests/datamodules/test_digits.py",
                                            "tests/datamodules/test_regression.py"],
    "lightning_bayes/datamodules/idx.py": ["tests/datamodules/test_idx.py", "tests/datamodules/test_mnist.py"],
    "lightning_bayes/datamodules/text.py": ["tests/datamodules/test_text.py"],
}
_SWAP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"), ast.Pow: ("**", "*"),
         ast.MatMult: ("@", "*"), ast.FloorDiv: ("//", "*")}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    line: int
    column: int
    change: str
    start: int
    end: int
    replacement: str


def _left_alone(tree: ast.Module) -> set[int]:
    """Ids of nodes whose subtrees are not mutated: argument defaults, integer call arguments, messages, checks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)):
            skipped.add(id(node))
        elif isinstance(node, ast.If) and all(isinstance(s, ast.Raise) for s in node.body):
            skipped.add(id(node.test))
        elif isinstance(node, ast.arguments):
            skipped.update(id(d) for d in node.defaults + [d for d in node.kw_defaults if d is not None])
        elif isinstance(node, ast.Call):
            for arg in node.args + [k.value for k in node.keywords]:
                literal = arg.operand if isinstance(arg, ast.UnaryOp) else arg
                if isinstance(literal, ast.Constant) and type(literal.value) is int:
                    skipped.add(id(arg))
    return skipped


def mutants(source: str) -> list[Mutant]:
    """Every mutant of ``source`` (positions are character offsets)."""
    tree = ast.parse(source)
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(line: int, column: int) -> int:  # ast columns count UTF-8 bytes
        text = source[line_starts[line - 1] : line_starts[line]]
        return line_starts[line - 1] + len(text.encode()[:column].decode())

    skipped, found = _left_alone(tree), []

    def visit(node: ast.AST) -> None:
        if id(node) in skipped:
            return
        def add(change: str, start: int, end: int, replacement: str) -> None:
            at_node = cast(ast.expr, node)  # add() is called only from the BinOp, UnaryOp and Constant branches
            found.append(Mutant(at_node.lineno, at_node.col_offset, change, start, end, replacement))

        if isinstance(node, ast.BinOp) and type(node.op) in _SWAP:
            symbol, replacement = _SWAP[type(node.op)]
            assert node.left.end_lineno is not None and node.left.end_col_offset is not None  # set by ast.parse
            gap_start = offset(node.left.end_lineno, node.left.end_col_offset)
            at = source.find(symbol, gap_start, offset(node.right.lineno, node.right.col_offset))
            if at >= 0 and not (symbol == "*" and source.startswith("**", at)):
                add(f"{symbol} -> {replacement}", at, at + len(symbol), replacement)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and type(node.operand) is not ast.Constant:
            at = offset(node.lineno, node.col_offset)
            add("drop unary -", at, at + 1, "")
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = cast("int | float", node.value)  # by the type() check above
            replacement = repr(value + 1) if isinstance(value, int) else repr(2 * value if value else 1.0)
            assert node.end_lineno is not None and node.end_col_offset is not None  # set by ast.parse
            start, end = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
            add(f"{source[start:end]} -> {replacement}", start, end, replacement)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def run(file: str, tests: list[str], per_file: int, seed: int, timeout: float) -> list[dict]:
    path = ROOT / file
    source = path.read_text()
    chosen = mutants(source)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:per_file] if per_file else chosen
    results = []
    try:
        for mutant in chosen:
            path.write_text(source[: mutant.start] + mutant.replacement + source[mutant.end :])
            began = time.perf_counter()
            command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
            try:
                finished = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, timeout=timeout)
                status = "killed" if finished.returncode != 0 else "survived"
            except subprocess.TimeoutExpired:
                status = "timeout"
            seconds = round(time.perf_counter() - began, 1)
            code = source.splitlines()[mutant.line - 1].strip()
            results.append({"file": file, **asdict(mutant), "status": status, "seconds": seconds, "code": code})
            print(json.dumps(results[-1]), flush=True)
    finally:
        path.write_text(source)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help=f"source files (default: all {len(TESTS)} mapped ones)")
    parser.add_argument("--per-file", type=int, default=12, help="random mutants per file (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per mutant; a timeout counts as killed")
    args = parser.parse_args()
    unknown = [f for f in args.files if f not in TESTS]
    if unknown:
        parser.error(f"no tests mapped for {unknown}; mapped files: {sorted(TESTS)}")
    results = [r for f in args.files or TESTS for r in run(f, TESTS[f], args.per_file, args.seed, args.timeout)]
    survivors = [r for r in results if r["status"] == "survived"]
    print(f"\n{len(results)} mutants, {len(results) - len(survivors)} killed, {len(survivors)} survived:")
    for r in survivors:
        print(f"  {r['file']}:{r['line']}:{r['column']}  {r['change']:>16}  {r['code']}")


if __name__ == "__main__":
    main()
