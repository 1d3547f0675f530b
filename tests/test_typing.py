"""The package type-checks: mypy with the project's configuration (``[tool.mypy]`` in ``pyproject.toml``) reports no
error. Paths are absolute, so the test runs from any directory, and mypy's cache goes to ``tmp_path``, not the repo."""

from __future__ import annotations

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_reports_no_error(tmp_path: Path) -> None:
    stdout, stderr, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(tmp_path / "mypy_cache"),
        str(ROOT / "lightning_bayes"),
    ])
    assert status == 0, f"mypy reports errors (exit status {status}):\n{stdout}{stderr}"
