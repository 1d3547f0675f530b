"""The 8x8 digits datamodule: stratified seeded split, scaling, and the pooled Fashion-MNIST OOD set."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DistributedSampler

from lightning_bayes.datamodules import DigitsDataModule
from lightning_bayes.datamodules.locate import FASHION_MNIST
from lightning_bayes.datamodules.mnist import load_idx_split


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    data = DigitsDataModule(batch_size=32, seed=0)
    data.setup("fit")
    return data


def _adaptive_average(image: np.ndarray, out: int) -> np.ndarray:
    """Adaptive average pooling by its definition: output cell i averages rows floor(i n / out) to
    ceil((i + 1) n / out) - 1 (the same for columns)."""
    n = image.shape[0]
    bounds = [(math.floor(i * n / out), math.ceil((i + 1) * n / out)) for i in range(out)]
    return np.array([[image[r0:r1, c0:c1].mean() for c0, c1 in bounds] for r0, r1 in bounds])


def test_sizes_are_a_stratified_60_20_20_split(digits: DigitsDataModule):
    assert (digits.task, digits.num_classes) == ("classification", 10)
    assert [len(s) for s in (digits.train_set, digits.val_set, digits.test_set)] == [1077, 360, 360]
    assert digits.num_train == 1077
    class_sizes = torch.bincount(torch.as_tensor(load_digits().target), minlength=10).double()
    for part in (digits.val_set, digits.test_set):
        counts = torch.bincount(part.tensors[1], minlength=10).double()
        assert (counts - 0.2 * class_sizes).abs().max() < 1  # each class gets the floor or ceiling of its share


def test_inputs_are_the_scaled_pixels(digits: DigitsDataModule):
    reference = load_digits()
    x, y = next(iter(digits.test_dataloader()))
    assert x.shape == (32, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    all_x = torch.cat([s.tensors[0] for s in (digits.train_set, digits.val_set, digits.test_set)])
    expected = torch.tensor(reference.data / 16.0, dtype=torch.float32)
    assert all_x.min() == 0 and all_x.max() == 1
    assert torch.equal(all_x.sum(1).sort().values, expected.sum(1).sort().values)


def test_ood_is_fashion_mnist_average_pooled_to_8x8(digits: DigitsDataModule):
    fashion, _ = load_idx_split(FASHION_MNIST, "test")
    ood = digits.ood_set.tensors[0]
    assert ood.shape == (10000, 64) and 0 <= ood.min() and ood.max() <= 1
    for i in (0, 1, 9999):
        expected = _adaptive_average(fashion[i].numpy() / 255.0, 8).reshape(64)
        np.testing.assert_allclose(ood[i].numpy(), expected, rtol=0, atol=1e-6)
    x, _ = next(iter(digits.ood_dataloader()))
    assert x.shape == (32, 64)


def test_image_shape_option():
    data = DigitsDataModule(batch_size=8, flatten=False)
    data.setup()
    assert next(iter(data.train_dataloader()))[0].shape == (8, 1, 8, 8)
    assert next(iter(data.ood_dataloader()))[0].shape == (8, 1, 8, 8)


def test_split_is_deterministic_by_seed(digits: DigitsDataModule):
    def test_inputs(seed: int) -> torch.Tensor:
        data = DigitsDataModule(seed=seed)
        data.setup()
        return data.test_set.tensors[0]

    assert torch.equal(test_inputs(0), digits.test_set.tensors[0])
    assert not torch.equal(test_inputs(1), digits.test_set.tensors[0])


@pytest.mark.parametrize("val_fraction, test_fraction", [(0.0, 0.2), (0.5, 0.5), (0.2, -0.1)])
def test_bad_split_fractions_are_named(val_fraction: float, test_fraction: float):
    with pytest.raises(ValueError, match="val_fraction and test_fraction must be > 0 and sum below 1"):
        DigitsDataModule(val_fraction=val_fraction, test_fraction=test_fraction)


def test_drop_last_leaves_out_a_smaller_last_training_batch_and_is_a_bool():
    """1,077 training images in batches of 2 end with a batch of one, on which a BatchNorm backbone in training
    mode fails ("Expected more than 1 value per channel"); there was no way to drop it."""
    from lightning.pytorch import Trainer

    from lightning_bayes.modules import MAP

    kept, dropped = DigitsDataModule(batch_size=2), DigitsDataModule(batch_size=2, drop_last=True)
    for data in (kept, dropped):
        data.setup("fit")
    assert (len(kept.train_dataloader()), len(dropped.train_dataloader())) == (539, 538)
    assert all(len(y) == 2 for _, y in dropped.train_dataloader())
    normalised = MAP(torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 10)))
    trainer = Trainer(max_epochs=1, limit_val_batches=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(normalised, datamodule=dropped)
    assert trainer.global_step == 538
    with pytest.raises(ValueError, match="drop_last must be True or False; got 1"):
        DigitsDataModule(drop_last=1)
    with pytest.raises(ValueError, match=r"data_dir must be a folder path or None; got 3"):
        DigitsDataModule(data_dir=3)  # type: ignore[arg-type]  # Path(3) failed in setup


def test_a_loader_with_workers_keeps_them_between_epochs():
    """``num_workers >= 1`` (one included): persistent workers, not a respawn per epoch; 0: none to keep."""
    with_worker, without = DigitsDataModule(num_workers=1), DigitsDataModule()
    for data in (with_worker, without):
        data.setup("fit")
    assert with_worker.train_dataloader().persistent_workers and with_worker.val_dataloader().persistent_workers
    assert not without.train_dataloader().persistent_workers and not without.val_dataloader().persistent_workers


def test_shuffle_false_under_ddp_shards_the_fit_loops_loader_only() -> None:
    """The loader Lightning asks for in a fit gets an unshuffled DistributedSampler (rank 1 of 2: examples 1, 3, ...);
    one asked for directly outside the fit loop (a sweep before test, BatchNorm statistics) holds all the data."""
    data = DigitsDataModule(batch_size=16, shuffle=False)
    data.setup("fit")
    connector = SimpleNamespace(use_distributed_sampler=True)
    sharding = {"num_replicas": 2, "rank": 1}
    data.trainer = SimpleNamespace(training=True, world_size=2, distributed_sampler_kwargs=sharding,
                                   _accelerator_connector=connector)  # fmt: skip
    sampler = data.train_dataloader().sampler
    assert isinstance(sampler, DistributedSampler) and not sampler.shuffle
    assert list(sampler)[:3] == [1, 3, 5]
    data.trainer.training = False
    assert list(data.train_dataloader().sampler) == list(range(data.num_train))
    data.trainer.training, connector.use_distributed_sampler = True, False  # the user brings the samplers
    assert list(data.train_dataloader().sampler) == list(range(data.num_train))
