"""The files of a leaderboard's output folders that a later run needs to resume it (``checks.sh leaderboard``: a
lease is too short for the full MNIST leaderboard, so each lease runs a share and returns this state): every file
but the checkpoints that no row starts from, which hold most of the bytes (a lease returns at most 64 MiB).

    python benchmarks/device/leaderboard_state.py ROOT TASK   # paths relative to ROOT, one per line
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the leaderboard's modules
from leaderboard_tasks import task_entries


def resumable_files(root: Path, task: str) -> list[Path]:
    """The files under ``root`` but the checkpoints of ``root/task``'s runs that no later row starts from."""
    needed = {name for entry in task_entries(task) for name in entry.needs}
    starts = set()
    for path in (root / task / "logs").glob("*.result.json"):
        result = json.loads(path.read_text())
        if result.get("run", {}).get("entry") in needed and result.get("checkpoint"):
            starts.add(Path(result["checkpoint"]).resolve())
    files = (path for path in sorted(root.rglob("*")) if path.is_file())
    return [path.relative_to(root) for path in files if path.suffix != ".ckpt" or path.resolve() in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the folder holding the task's output folder")
    parser.add_argument("task", help="the leaderboard task, e.g. mnist (its output folder is ROOT/TASK)")
    args = parser.parse_args()
    print("\n".join(str(path) for path in resumable_files(args.root, args.task)))


if __name__ == "__main__":
    main()
