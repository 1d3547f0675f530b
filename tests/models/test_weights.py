"""Which file a checkpoint argument names, and what the error says when it names none."""

import os
import re
import time
from pathlib import Path

import pytest

from lightning_bayes.models.weights import resolve_checkpoint_path


def test_a_pattern_takes_the_newest_match(tmp_path: Path):
    older, newer = tmp_path / "version_0" / "last.ckpt", tmp_path / "version_1" / "last.ckpt"
    for path in (newer, older):  # written in this order; the modification times below decide
        path.parent.mkdir()
        path.write_bytes(b"")
    now = time.time()
    os.utime(older, (now - 60, now - 60))
    os.utime(newer, (now, now))
    assert resolve_checkpoint_path(str(tmp_path / "version_*" / "last.ckpt")) == newer
    assert resolve_checkpoint_path(str(older)) == older


def test_a_relative_argument_that_names_nothing_says_where_it_was_looked_for(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = re.escape(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"'runs/map/version_\*/last.ckpt' matches no file \(relative to the "
                       rf"working folder {folder}\); train the model first"):
        resolve_checkpoint_path("runs/map/version_*/last.ckpt")
    with pytest.raises(FileNotFoundError, match=rf"'map.ckpt' is not a file \(relative to the working folder {folder}\)"):
        resolve_checkpoint_path("map.ckpt")
    with pytest.raises(FileNotFoundError, match=rf"^checkpoint='{folder}/map.ckpt' is not a file; train the model first$"):
        resolve_checkpoint_path(str(tmp_path / "map.ckpt"))
