"""MNIST, Fashion-MNIST and digits against their known counts and statistics."""

import gzip
from pathlib import Path

import pytest
import torch

from lightning_bayes.datamodules import DigitsDataModule, MNISTDataModule
from lightning_bayes.datamodules.idx import read_idx
from lightning_bayes.datamodules.mnist import MNIST_MEAN, MNIST_STD, load_mnist_arrays

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist() -> MNISTDataModule:
    data = MNISTDataModule(batch_size=256, val_size=5000, seed=0)
    data.setup("fit")
    return data


def test_mnist_sizes_shapes_and_canonical_test_counts(mnist: MNISTDataModule):
    assert (len(mnist.train_set), len(mnist.val_set), len(mnist.test_set), len(mnist.ood_set)) == (55000, 5000, 10000, 10000)
    assert mnist.num_train == 55000
    x, y = next(iter(mnist.test_dataloader()))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(mnist.test_set.tensors[1], minlength=10).tolist() == MNIST_TEST_COUNTS


def test_mnist_normalisation_matches_the_published_statistics(mnist: MNISTDataModule):
    images, _ = load_mnist_arrays("train")
    pixels = images.double() / 255
    assert abs(pixels.mean().item() - MNIST_MEAN) < 1e-4 and abs(pixels.std().item() - MNIST_STD) < 1e-4
    restored = mnist.test_set.tensors[0] * MNIST_STD + MNIST_MEAN
    assert restored.min() > -1e-5 and restored.max() < 1 + 1e-5


def test_fashion_mnist_has_the_published_pixel_statistics():
    images, labels = load_mnist_arrays("train", fashion=True)
    pixels = images.double() / 255
    assert images.shape == (60000, 28, 28) and torch.bincount(labels).tolist() == [6000] * 10
    assert abs(pixels.mean().item() - 0.2860) < 1e-3 and abs(pixels.std().item() - 0.3530) < 1e-3


def test_split_is_deterministic_by_seed():
    def val_labels(seed: int) -> torch.Tensor:
        data = MNISTDataModule(val_size=5000, seed=seed)
        data.setup("fit")
        return data.val_set.tensors[1]

    assert torch.equal(val_labels(0), val_labels(0))
    assert not torch.equal(val_labels(0), val_labels(1))


def test_train_loader_shuffles_reproducibly(mnist: MNISTDataModule):
    first = next(iter(mnist.train_dataloader()))[1]
    again = next(iter(mnist.train_dataloader()))[1]
    assert torch.equal(first, again)


def test_missing_files_name_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LIGHTNING_BAYES_HOME", str(tmp_path))
    monkeypatch.delenv("LIGHTNING_BAYES_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lightning_bayes.datamodules.locate._npm_global_root", lambda: None)
    with pytest.raises(FileNotFoundError, match="npm install --ignore-scripts"):
        MNISTDataModule().setup("fit")
    with pytest.raises(FileNotFoundError, match="data_dir="):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")


def test_idx_reader_checks_the_header(tmp_path: Path):
    good = tmp_path / "ok-idx1-ubyte.gz"
    good.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])))
    assert read_idx(good).tolist() == [7, 8, 9]
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 7]))
    with pytest.raises(ValueError, match="header promises shape"):
        read_idx(short)
    zipped = tmp_path / "archive"
    zipped.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(zipped)


def test_digits_split_ood_and_shapes():
    data = DigitsDataModule(batch_size=32, seed=0)
    data.setup("fit")
    sizes = [len(s) for s in (data.train_set, data.val_set, data.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == pytest.approx(0.2 * 1797, abs=10)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, 64) and 0 <= x.min() and x.max() <= 1
    # stratified: every class keeps its share (within rounding) in the test split
    counts = torch.bincount(data.test_set.tensors[1], minlength=10)
    assert (counts - 0.2 * torch.bincount(torch.cat([s.tensors[1] for s in (data.train_set, data.val_set, data.test_set)]))).abs().max() <= 1
    ood_x, _ = next(iter(data.ood_dataloader()))
    assert ood_x.shape == (32, 64) and 0 <= ood_x.min() and ood_x.max() <= 1
    image = DigitsDataModule(flatten=False)
    image.setup("fit")
    assert next(iter(image.ood_dataloader()))[0].shape[1:] == (1, 8, 8)
