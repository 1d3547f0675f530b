"""What every datamodule shares: data held in memory, seeded splits and shuffling, ``(x, y)`` batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from ..checks import check_flags, check_folders, is_finite, is_int
from .epoch_loader import EpochLoader, training_pass_batches, training_pass_epoch
from .epoch_shuffle import EpochShuffle
from .gathered import GatheredTensorDataset, gathered_batch


def seeded_permutation(n: int, seed: int) -> Tensor:
    """A permutation of ``range(n)`` that depends only on ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def check_split_fractions(val_fraction: float, test_fraction: float) -> tuple[float, float]:
    """Validate the held-out fractions of a random split: both > 0 and summing below 1."""
    numbers = is_finite(val_fraction) and is_finite(test_fraction)
    if not (numbers and 0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction and test_fraction must be > 0 and sum below 1; got {val_fraction} and {test_fraction}"
        )
    return val_fraction, test_fraction


def train_val_test_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int, stratify: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted indices of a random train / val / test split of ``range(n)`` by ``seed``.

    scikit-learn's ``train_test_split`` twice: the test part first (``ceil(test_fraction * n)``), then
    the validation part as ``val_fraction / (1 - test_fraction)`` of the rest. With ``stratify`` (labels)
    every class keeps its share in each part.
    """
    from sklearn.model_selection import train_test_split  # here: scikit-learn takes 0.4 s to import

    check_split_fractions(val_fraction, test_fraction)
    labels = None if stratify is None else stratify.numpy()
    try:
        rest, test = train_test_split(range(n), test_size=test_fraction, random_state=seed, stratify=labels)
        rest_labels = None if labels is None else labels[rest]
        train, val = train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=rest_labels
        )
    except ValueError as error:  # scikit-learn's message names its own arguments (test_size, n_samples)
        stratified = "" if labels is None else f", every part holding each of its {len(set(labels.tolist()))} classes"
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} cannot split {n} examples into non-empty "
            f"train / val / test parts{stratified} (scikit-learn: {error})"
        ) from None
    return tuple(torch.tensor(sorted(part), dtype=torch.long) for part in (train, val, test))  # type: ignore[return-value]


class InMemoryDataModule(LightningDataModule):
    """A datamodule whose sets are small enough to hold in memory; ``setup`` fills them once.

    Subclasses set ``task``, and ``num_classes`` (classification) or ``output_dim`` (regression) as class
    attributes, so configs and modules can read them before ``setup``; their ``setup`` fills
    ``train_set``, ``val_set`` and ``test_set``. The training loader shuffles by ``seed`` and the epoch
    (:class:`EpochShuffle`), so two runs with the same seed see the same batches, and so does a resumed run,
    at an epoch's end or inside one, on one process or under DDP, with or without workers (:class:`EpochLoader`:
    Lightning keeps its position in checkpoints). Under DDP Lightning replaces the shuffle by its
    ``DistributedSampler``, whose order follows ``seed_everything`` (the shipped configs set it), not ``seed``;
    ``shuffle=False`` keeps one fixed order there too (each rank every ``world_size``-th example).
    ``predict`` runs on the test split.
    ``num_train`` is the training-set size N (the KL weight of variational methods is 1/N).

    Args:
        batch_size: examples per batch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: seeds the splits and the training-set shuffling.
        shuffle: shuffle the training loader; ``False`` keeps the batches in one fixed order every epoch
            (post-hoc sweeps such as :class:`~lightning_bayes.modules.NullSpaceLaplace` need that).
        drop_last: leave out the training loader's last batch when it is smaller (a BatchNorm backbone in training
            mode fails on a last batch of one example); the sweep of the null-space Laplace needs every example.
        data_dir: a folder holding the user's own copy of the data files (see each subclass);
            ``None`` uses the packaged copies.
    """

    task: ClassVar[Literal["classification", "regression"]] = "classification"

    def __init__(
        self, batch_size: int, num_workers: int = 0, seed: int = 0, data_dir: str | None = None, shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        if not is_int(num_workers) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0; got {num_workers!r}")
        if not is_int(seed):
            raise TypeError(f"seed must be an int in [0, 2**32); got {seed!r}")
        if not 0 <= seed < 2**32:  # scikit-learn's splits take no other (digits, regression)
            raise ValueError(f"seed must be an int in [0, 2**32); got {seed!r}")
        check_flags(shuffle=shuffle, drop_last=drop_last)
        check_folders(data_dir=data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.data_dir = data_dir
        self.shuffle, self.drop_last = shuffle, drop_last
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_train(self) -> int:
        """Training-set size N (runs ``setup`` if it has not run yet)."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return len(self.train_set)  # type: ignore[arg-type]

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """How a list of examples becomes a batch; ``None`` is torch's default (stacking tensors)."""
        return None

    def _loader(self, dataset: Dataset | None, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are used")
        collate: Callable[[Any], Any] | None = self.collate_fn()
        if collate is None and type(dataset) is TensorDataset:  # batches gathered whole, not example by example
            dataset, collate = GatheredTensorDataset(*dataset.tensors), gathered_batch
        options: dict[str, Any] = {
            "batch_size": self.batch_size,
            "collate_fn": collate,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        if not train:
            return DataLoader(dataset, **options)
        if self.shuffle:
            order: Sampler | None = EpochShuffle(dataset, self.seed)  # type: ignore[arg-type]
        else:
            order = self._unshuffled_shard(dataset)
        options["drop_last"] = self.drop_last
        return EpochLoader(dataset, sampler=order, epoch=self._fit_epoch, pass_batches=self._fit_pass_batches, **options)

    def _unshuffled_shard(self, dataset: Dataset) -> DistributedSampler | None:
        """Under DDP, this rank's share in one fixed order: Lightning puts a shuffling ``DistributedSampler`` in every
        training loader (it takes any training loader for a shuffled one) unless the loader has a
        ``DistributedSampler`` already, so ``shuffle=False`` gives it an unshuffled one. ``None`` on one process,
        where the Trainer leaves samplers to the user (``use_distributed_sampler=False``), and outside the fit loop:
        a loader asked for directly (a sweep before test, BatchNorm statistics) holds all the data, shuffled or not."""
        trainer = self.trainer
        if trainer is None or not trainer.training or trainer.world_size <= 1 or not trainer.distributed_sampler_kwargs:
            return None
        if not getattr(trainer._accelerator_connector, "use_distributed_sampler", True):
            return None
        return DistributedSampler(dataset, shuffle=False, **trainer.distributed_sampler_kwargs)

    def _fit_epoch(self) -> int | None:
        return training_pass_epoch(self.trainer)

    def _fit_pass_batches(self) -> float | None:
        return None if self.trainer is None else training_pass_batches(self.trainer)

    def load_split(self, split: Literal["train", "val", "test"]) -> None:
        """Load ``split`` if ``setup`` left it for later (a datamodule that loads by stage); nothing here."""

    def train_dataloader(self) -> DataLoader:
        self.load_split("train")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.load_split("val")
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        self.load_split("test")
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order (``lightning-bayes predict``)."""
        self.load_split("test")
        return self._loader(self.test_set)
