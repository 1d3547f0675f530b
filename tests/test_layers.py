"""The package's layers import one way (design.md): core <- edges <- orchestration <- command line.

Every ``import`` of every module under ``lightning_bayes/`` is read with ``ast`` (nothing is imported), so a
function-level import counts as much as a module-level one.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_bayes"

# the first component under lightning_bayes (a sub-package or a top-level module) -> its layer
LAYERS = {
    # core: plain torch maths and the contract every method returns
    "inference": 0, "optim": 0, "predictive": 0, "params": 0, "generator": 0, "paths": 0, "heap": 0, "compilation": 0,
    "checks": 0, "torch_func_state": 0, "batches": 0, "extras": 0, "modes": 0, "__init__": 0,
    # edges: metrics and plots consume Predictives, models build backbones, datamodules load data
    "metrics": 1, "plots": 1, "models": 1, "datamodules": 1,
    # orchestration: LightningModules and callbacks wiring the core into the Trainer
    "modules": 2, "callbacks": 2, "skipped_epoch_hooks": 2,
    # the command line
    "cli": 3, "cli_order": 3, "cli_parser": 3, "cli_resumed_best": 3, "bundled_configs": 3, "__main__": 3,
}
CORE_WITHOUT_LIGHTNING = {
    "inference", "optim", "predictive", "params", "generator", "paths", "heap", "compilation", "checks",
    "torch_func_state", "batches", "extras", "modes",
}


def _component(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``; relative imports resolved."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [f"{module}.{alias.name}" for alias in node.names] if not node.module else [module]
            found += [(node.lineno, name) for name in names]
    return found


def _target_component(module: str) -> str | None:
    """The first component under lightning_bayes of an imported module name; None outside the package."""
    parts = module.split(".")
    if parts[0] != "lightning_bayes":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_component_has_a_layer():
    assert {_component(path) for path in SOURCES} == set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_go_down_the_layers_only(path: Path):
    source = _component(path)
    upward = [
        f"line {line}: {module} (layer {LAYERS[target]} > {LAYERS[source]})"
        for line, module in _imports(path)
        if (target := _target_component(module)) is not None and LAYERS[target] > LAYERS[source]
    ]
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {LAYERS[source]}) imports upwards: {upward}"


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if _component(p) in CORE_WITHOUT_LIGHTNING], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_the_core_does_not_import_lightning(path: Path):
    lightning = [(line, module) for line, module in _imports(path) if module.split(".")[0] in {"lightning", "pytorch_lightning"}]
    assert not lightning, f"{path.relative_to(PACKAGE)} imports Lightning: {lightning}"


def test_relative_imports_are_resolved_against_the_importing_package():
    # a guard on the reader itself: callbacks/calibration.py's "from ..metrics import ..." names lightning_bayes.metrics
    imported = {module for _, module in _imports(PACKAGE / "callbacks" / "calibration.py")}
    assert "lightning_bayes.metrics" in imported and "lightning_bayes.predictive" in imported
    own = {module for _, module in _imports(PACKAGE / "__main__.py") if module.startswith("lightning_bayes")}
    assert own == {"lightning_bayes.cli"}  # "from .cli import main" in the package's top folder
