"""``PredictionWriter``: what ``trainer.predict`` (``lightning-bayes predict``) returns, one CSV row per example.

Every batch's :class:`~lightning_bayes.predictive.Predictive` becomes rows of ``predictions.csv`` in the run's log
folder (``predictions-rank<r>.csv`` per process under DDP; a taken name gets ``-1``, ``-2``, ...: nothing is
overwritten), written as the batches come, so nothing is held in memory:

* classification: ``index, target, predicted, confidence, entropy, mutual_information, prob_0, ..., prob_<C-1>``
  (the model average ``p = 1/S sum_s p_s``, its arg max and max, the total entropy ``H[p]`` and the mutual
  information ``H[p] - 1/S sum_s H[p_s]``, in nats);
* regression: ``index, target, mean, std, epistemic_std, aleatoric_std`` (each ``_<d>`` per output when there
  are several): the mixture's mean and total standard deviation ``sqrt(aleatoric + epistemic variance)``, in the
  data's original units when the datamodule standardised the targets (``target_mean + target_std * y``). The
  epistemic part is the spread of the samples' means plus a closed-form predictive's weight variance (a VBLL
  regressor's ``phi^T S phi``); a point estimate (MAP, one sample) has none.

``index`` is the example's position in the predict dataset (Lightning tracks it for map-style loaders; otherwise a
count of this process's rows); ``target`` appears when batches are ``(x, y)``. Several predict loaders get a file
each, ``predictions_dataloader_idx_<k>.csv`` (their columns and indices are their own).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import IO, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..batches import BatchLayout
from ..predictive import CategoricalPredictive, GaussianPredictive
from .run_files import first_free_index, loader_suffixes, numbered, run_folder


def _columns(name: str, width: int) -> list[str]:
    return [name] if width == 1 else [f"{name}_{d}" for d in range(width)]


class PredictionWriter(BasePredictionWriter):
    """Writes ``trainer.predict``'s predictives to ``predictions.csv`` in the run folder (see the module docstring).

    Args:
        filename: the file's stem (``predictions`` -> ``predictions.csv``).
        target_key: for dict batches, the target's key (e.g. ``"label"``): its ``target`` column; without it (or
            without that key in a batch) a dict batch has no target. The module's ``predict_step`` reads the input.
    """

    def __init__(self, filename: str = "predictions", target_key: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.layout = BatchLayout(target_key)
        plain = isinstance(filename, str) and filename not in ("", ".", "..") and Path(filename).name == filename
        if not plain or filename.endswith(".csv"):
            raise ValueError(f"filename must be a plain file stem such as 'predictions'; got {filename!r}")
        self.filename = filename
        self.paths: list[Path] = []  # one per predict loader
        self._files: dict[int, IO[str]] = {}
        self._writers: dict[int, Any] = {}
        self._counts: dict[int, int] = {}

    @property
    def path(self) -> Path | None:
        """The (first) predict loader's file; ``None`` under ``fast_dev_run``."""
        return self.paths[0] if self.paths else None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Forget the last run's files: Lightning skips ``on_predict_start`` when every predict loader is empty, and
        ``path`` named the previous run's file."""
        if stage == "predict":
            self.paths = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = run_folder(trainer)  # a collective call: every rank asks
        self.paths, self._counts = [], {}
        if folder is None:  # fast_dev_run: no file
            return
        suffixes = [s.replace("/", "_") for s in loader_suffixes(getattr(trainer, "predict_dataloaders", None))]
        stems = [self._stem(trainer.world_size, rank) for rank in range(trainer.world_size)]
        # one number for every loader's and every rank's file of this run (rank 0's choice: the others may already
        # be writing theirs), so that they read as one run's
        index = first_free_index(folder, [(stem + suffix, ".csv") for stem in stems for suffix in suffixes])
        strategy = getattr(trainer, "strategy", None)
        index = strategy.broadcast(index) if strategy is not None else index
        folder.mkdir(parents=True, exist_ok=True)
        own = self._stem(trainer.world_size, trainer.global_rank)
        self.paths = [numbered(folder, own + suffix, index, ".csv") for suffix in suffixes]

    def _stem(self, world_size: int, rank: int) -> str:
        return self.filename if world_size == 1 else f"{self.filename}-rank{rank}"

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: Any, batch_indices: Any, batch: Any,
        batch_idx: int, dataloader_idx: int,
    ) -> None:
        target = self.layout.target(batch)
        header, values = self._table(trainer, prediction, target)  # checked under fast_dev_run too
        if not self.paths:  # fast_dev_run: no file
            return
        size, count = len(values[0]), self._counts.get(dataloader_idx, 0)
        tracked = list(batch_indices or ())  # Lightning gives [] where it cannot track them (iterable datasets)
        indices = tracked if len(tracked) == size else range(count, count + size)
        self._counts[dataloader_idx] = count + size
        if dataloader_idx not in self._writers:
            # open across batches, closed at predict end or on an exception; "x": never overwrite
            self._files[dataloader_idx] = open(self.paths[dataloader_idx], "x", newline="")  # noqa: SIM115
            self._writers[dataloader_idx] = csv.writer(self._files[dataloader_idx])
            self._writers[dataloader_idx].writerow(["index", *header])
        self._writers[dataloader_idx].writerows([index, *row] for index, row in zip(indices, zip(*values)))

    def _table(self, trainer: Trainer, prediction: Any, target: Tensor | None) -> tuple[list[str], list[list]]:
        """Column names and one list of per-example values per column."""
        if isinstance(prediction, CategoricalPredictive):
            probs = prediction.probs
            header = ["predicted", "confidence", "entropy", "mutual_information"]
            parts = [probs.argmax(-1), prediction.max_prob, prediction.entropy, prediction.mutual_information, probs]
            header += [f"prob_{c}" for c in range(probs.shape[-1])]
        elif isinstance(prediction, GaussianPredictive):
            mean, std = prediction.mean, prediction.variance.sqrt()
            epistemic, aleatoric = prediction.epistemic_variance.sqrt(), prediction.aleatoric_variance.sqrt()
            shift, scale = self._target_units(trainer, mean)
            mean, std, epistemic, aleatoric = mean * scale + shift, std * scale, epistemic * scale, aleatoric * scale
            header = [c for name in ("mean", "std", "epistemic_std", "aleatoric_std")
                      for c in _columns(name, mean.shape[-1])]
            parts = [mean, std, epistemic, aleatoric]
            if target is not None:
                target = target.reshape(mean.shape) * scale + shift
        else:
            raise TypeError(
                f"PredictionWriter needs predict_step to return a CategoricalPredictive or GaussianPredictive; "
                f"got {type(prediction).__name__}"
            )
        if target is not None:
            header = [*_columns("target", target.shape[-1] if target.ndim > 1 else 1), *header]
            parts = [target, *parts]
        columns: list[list] = []
        for part in parts:
            part = part.detach().cpu()
            part = part.double() if part.is_floating_point() else part  # float32 values written exactly
            columns += [part.tolist()] if part.ndim == 1 else part.T.tolist()
        return header, columns

    @staticmethod
    def _target_units(trainer: Trainer, mean: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(target_mean, target_std)`` of a datamodule that standardised the targets, else ``(0, 1)``."""
        datamodule = getattr(trainer, "datamodule", None)
        shift, scale = getattr(datamodule, "target_mean", None), getattr(datamodule, "target_std", None)
        if isinstance(shift, Tensor) and isinstance(scale, Tensor):
            return shift.to(mean), scale.to(mean)
        return 0.0, 1.0

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        written = sorted(self._files)
        self._close()
        for idx in written:  # the files' names, or under DDP rank 0's (the others' differ only in their rank)
            rank_zero_info(f"PredictionWriter: wrote {self.paths[idx]}")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files, self._writers = {}, {}
