"""Where lightning_bayes keeps installed data and converted models on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def lightning_bayes_home() -> Path:
    """``$LIGHTNING_BAYES_HOME`` (when set and not empty) or ``~/.cache/lightning_bayes``."""
    return Path(os.environ.get("LIGHTNING_BAYES_HOME") or Path.home() / ".cache" / "lightning_bayes").expanduser()
