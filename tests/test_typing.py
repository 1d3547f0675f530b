"""The package, benchmarks and scripts type-check: plain ``mypy`` with the project's configuration (``[tool.mypy]``
in ``pyproject.toml``) reports no error. mypy runs in the repository root, since it resolves the config's relative
``files`` against its working directory, so the test checks exactly what the config lists from any directory, with
its cache in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a minute from a fresh cache: a whole-package check, run by CI with the end-to-end runs
def test_mypy_reports_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(tmp_path / "mypy_cache"),
    ])
    assert status == 0, f"mypy reports errors (exit status {status}):\n{stdout}{stderr}"
