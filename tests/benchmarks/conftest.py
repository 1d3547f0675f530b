"""The leaderboard's modules live in ``benchmarks/`` (run as scripts): make them importable here, with the
calibration toys of ``tests/callbacks``."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for folder in (ROOT / "benchmarks", ROOT / "tests" / "callbacks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
