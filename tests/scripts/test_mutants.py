"""``scripts/mutants.py``: which mutants it makes, what it leaves alone, and that it restores the source."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import mutants

SOURCE = '''\
def f(x, eps: float = 1e-6, dim=-1):
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D; got {x.ndim + 0}")
    y = -(x * 0.5 + x ** 2) / x.sum(-1)
    return y @ x.T - 3
'''


def apply(mutant: mutants.Mutant) -> str:
    return SOURCE[: mutant.start] + mutant.replacement + SOURCE[mutant.end :]


def test_mutants_swap_operators_drop_signs_and_change_literals_outside_checks_and_defaults() -> None:
    made = {(m.line, m.change) for m in mutants.mutants(SOURCE)}
    assert made == {
        (4, "drop unary -"), (4, "* -> /"), (4, "0.5 -> 1.0"), (4, "+ -> -"), (4, "** -> *"), (4, "2 -> 3"),
        (4, "/ -> *"), (5, "@ -> *"), (5, "- -> +"), (5, "3 -> 4"),
    }  # fmt: skip
    changed = {m.change: apply(m).splitlines()[m.line - 1] for m in mutants.mutants(SOURCE)}
    assert changed["** -> *"] == "    y = -(x * 0.5 + x * 2) / x.sum(-1)"
    assert changed["drop unary -"] == "    y = (x * 0.5 + x ** 2) / x.sum(-1)"
    assert changed["@ -> *"] == "    return y * x.T - 3"


def test_every_mapped_file_and_test_exists_and_parses() -> None:
    for source, tests in mutants.TESTS.items():
        assert mutants.mutants((ROOT / source).read_text()), source
        assert all((ROOT / t).exists() for t in tests), tests


def test_run_restores_the_source_and_reports_a_survivor(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(mutants, "ROOT", tmp_path)
    (tmp_path / "m.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "test_m.py").write_text("from m import double\n\ndef test_double():\n    assert double(0) == 0\n")
    results = mutants.run("m.py", ["test_m.py"], per_file=0, seed=0, timeout=60)
    assert (tmp_path / "m.py").read_text() == "def double(x):\n    return 2 * x\n"
    assert {(r["change"], r["status"]) for r in results} == {("* -> /", "killed"), ("2 -> 3", "survived")}
