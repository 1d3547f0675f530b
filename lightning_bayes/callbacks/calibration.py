"""``CalibrationMetrics``: the shared evaluation of any LightningModule that has ``predictive(x, num_samples)``.

At every validation and test batch it takes the batch's Predictive (the ``validation_step`` /
``test_step`` output when it is one, else ``pl_module.predictive(x, num_samples)``) and updates
torchmetrics metrics; at epoch end it logs them as

* ``{stage}/cal/{acc,nll,brier,ece,mce,aece,entropy,mi}`` for classification (``legacy=True`` adds the reference
  code's ``legacy_nll``, ``legacy_ece``, ``legacy_mce``),
* ``{stage}/ood/{auroc,fpr95}`` when ``trainer.datamodule`` has an ``ood_dataloader()`` (at ``ood_stages``),
* ``{stage}/reg/{nll,rmse,crps,coverage90}`` for regression,

with ``stage`` = ``val`` or ``test``. After testing it writes ``metrics.json`` (flat keys such as ``acc``,
``ece``, ``ood_auroc``; never overwriting: ``metrics-1.json``, ... follow) and, with ``plots=True``, a
reliability diagram (classification; its bins in ``reliability.json``) or a predictive band (1-D regression) into the run's log folder.
Several validation or test loaders are scored apart: loader ``k``'s names end in ``/dataloader_idx_k`` (as Lightning
names a step's logs when there are several loaders), in ``metrics.json`` too, and its plots are
``reliability_dataloader_idx_k.png``, ....
Metric states are torchmetrics sums and concatenations, so every value is the pooled one under DDP.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
from torchmetrics import MetricCollection
from torchmetrics.aggregation import CatMetric
from torchmetrics.utilities.data import dim_zero_cat

from ..batches import BatchLayout
from ..checks import check_flags, is_int
from ..datamodules.epoch_loader import step_batch
from ..datamodules.sampler_padding import distributed_sampler, real_examples, stage_loaders, without_sampler_padding
from ..metrics import (
    OOD_SCORES,
    ExpectedCalibrationError,
    OODScore,
    classification_metrics,
    ood_metrics,
    regression_metrics,
)
from ..plots import predictive_band, reliability_diagram
from ..predictive import CategoricalPredictive, GaussianPredictive, Predictive
from .plot_labels import PlotUnits, figure_title, plot_units
from .run_files import loader_suffixes, run_folder, unique_path, write_json

Task = Literal["auto", "classification", "regression"]
_TASKS = ("auto", "classification", "regression")
Stage = Literal["val", "test"]
_STAGES: tuple[Stage, ...] = ("val", "test")
_BAND_GRID_POINTS = 200
_SPREAD_SCORES = ("mutual_information", "max_class_variance")  # 0 for a one-sample predictive


@dataclass
class _EpochMetrics:
    """What one validation or test epoch accumulates."""

    task: str
    metrics: MetricCollection
    ood: MetricCollection | None = None
    band_x: CatMetric | None = None  # inputs and targets of a 1-D regression, for the band plot
    band_y: CatMetric | None = None
    band_input_shape: tuple[int, ...] = field(default_factory=tuple)


def _is_predictive(value: object) -> bool:
    return isinstance(value, (CategoricalPredictive, GaussianPredictive))


def _flat_key(name: str) -> str:
    """``test/cal/ece`` -> ``ece``, ``test/ood/auroc`` -> ``ood_auroc``, ``test/reg/rmse`` -> ``rmse``;
    ``test/cal/ece/dataloader_idx_1`` -> ``ece/dataloader_idx_1``."""
    _, group, metric, *loader = name.split("/")
    return "/".join([f"ood_{metric}" if group == "ood" else metric, *loader])


def _loader_suffix(trainer: Trainer, stage: str, dataloader_idx: int) -> str:
    return loader_suffixes(stage_loaders(trainer, stage))[dataloader_idx]


class CalibrationMetrics(Callback):
    """Logs calibration, OOD and regression metrics of the module's Predictive at validation and test.

    Args:
        num_samples: predictive samples per example; ``None`` uses ``pl_module.num_samples`` (and then the
            Predictive returned by ``validation_step`` / ``test_step`` is reused as it is), or, for a module
            without that attribute, calls ``predictive(x, None)``: the module's own default.
        task: ``"classification"``, ``"regression"`` or ``"auto"`` (from the Predictive's type).
        ood_score: OOD-ness score for AUROC / FPR95: ``"entropy"``, ``"mutual_information"``, ``"max_prob"`` or
            ``"max_class_variance"`` (see :mod:`lightning_bayes.metrics.ood`); the two that measure the samples'
            disagreement are 0 for a one-sample predictive (a warning says so).
        plots: write ``reliability.png`` (classification) or ``predictive_band.png`` (1-D inputs and
            targets) next to ``metrics.json`` after testing.
        ood_stages: the stages that score the OOD data: test only by default (as torch-uncertainty and
            lightning-uq-box do); ``["val", "test"]`` also scores it at every validation, running as many predictive
            batches again as the validation itself (19 to 31% of a fit of the sampling methods on digits).
        legacy: also log the VIKING / null-space Laplace reference code's ``legacy_nll``, ``legacy_ece`` and
            ``legacy_mce`` (per-sample NLL averaged over samples; 100 bins, predictions at confidence 0.99 or more
            dropped: :mod:`lightning_bayes.metrics.legacy`), only to set results beside that paper's tables.
        target_key: for dict batches (validation, test and OOD loaders), the target's key (e.g. ``"label"``);
            without it a dict batch is refused.
        input_key: for dict batches, the input's key; without it every entry but the target, as a dict (a
            tokenizer's ``input_ids``, ``attention_mask``, ...).

    The OOD data come from ``trainer.datamodule.ood_dataloader()`` (a map-style ``DataLoader`` of ``(x, y)``
    or ``x`` batches; sharded with a ``DistributedSampler`` under DDP), limited at validation to as many batches as
    the in-distribution loader ran (a balanced monitor every epoch), and at test only when
    ``limit_test_batches`` limits the test set.
    ``last_metrics`` holds the last logged value of every metric by its logged name.
    """

    def __init__(
        self,
        num_samples: int | None = None,
        task: Task = "auto",
        ood_score: OODScore = "entropy",
        plots: bool = True,
        ood_stages: Sequence[Stage] = ("test",),
        legacy: bool = False,
        target_key: str | None = None,
        input_key: str | None = None,
    ) -> None:
        super().__init__()
        self.layout = BatchLayout(target_key, input_key)
        if num_samples is not None and (
            not is_int(num_samples) or num_samples < 1
        ):
            raise ValueError(f"num_samples must be a positive integer or None; got {num_samples!r}")
        if task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}; got {task!r}")
        if ood_score not in OOD_SCORES:
            raise ValueError(f"ood_score must be one of {OOD_SCORES}; got {ood_score!r}")
        check_flags(plots=plots, legacy=legacy)
        if isinstance(ood_stages, str) or not set(ood_stages) <= set(_STAGES):
            raise ValueError(f"ood_stages must be a list of stages from {_STAGES}; got {ood_stages!r}")
        self.num_samples = num_samples
        self.task = task
        self.ood_score = ood_score
        self.ood_stages = tuple(ood_stages)
        self.plots = plots
        self.legacy = legacy
        self.last_metrics: dict[str, float] = {}
        self._epochs: dict[tuple[str, int], _EpochMetrics] = {}  # by stage and dataloader index

    # ---- Lightning hooks -------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        count = sum(isinstance(c, CalibrationMetrics) for c in getattr(trainer, "callbacks", []))  # Lightning sets them
        if count > 1:
            raise ValueError(
                f"the Trainer has {count} CalibrationMetrics callbacks; they log the same names (val/cal/nll, "
                "test/ood/auroc, ...), which Lightning would average into one value: keep one (to compare OOD scores, "
                "run trainer.test once per ood_score)"
            )

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_epochs("val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_epochs("test")

    def _drop_epochs(self, stage: str) -> list[tuple[int, _EpochMetrics]]:
        """This stage's epoch metrics, removed, by dataloader index."""
        return [(idx, self._epochs.pop((s, idx))) for s, idx in sorted(self._epochs) if s == stage]

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, outputs, batch, "val", batch_idx, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, pl_module, outputs, batch, "test", batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    # ---- per batch -------------------------------------------------------------------------------

    def _update(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, stage: str, batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        x, y = self.layout.split(batch, "CalibrationMetrics")
        reuse = (  # not when a callback bound the module's predictive (CurveTraining: the curve ensemble)
            _is_predictive(outputs) and self.num_samples in (None, getattr(pl_module, "num_samples", None))
            and "predictive" not in vars(pl_module)
        )
        predictive = outputs.detach() if reuse else self._predict(trainer, pl_module, x, stage)
        loader = stage_loaders(trainer, stage)[dataloader_idx]
        x, y = without_sampler_padding((x, y), batch_idx, loader)  # a DistributedSampler's repeats count once
        predictive = predictive.first_examples(len(y)) if len(y) < predictive.num_examples else predictive
        epoch = self._epochs.get((stage, dataloader_idx))
        if epoch is None:
            epoch = self._epochs[stage, dataloader_idx] = self._start_epoch(trainer, pl_module, predictive, x, stage)
        epoch.metrics.update(predictive, y)
        if epoch.ood is not None:
            epoch.ood.update(predictive, False)
        if epoch.band_x is not None and epoch.band_y is not None:
            epoch.band_x.update(x.reshape(-1).float())
            epoch.band_y.update(y.reshape(-1).float())

    def _predict(self, trainer: Trainer, pl_module: LightningModule, x: Any, stage: str) -> Predictive:
        predictive_fn = getattr(pl_module, "predictive", None)
        if not callable(predictive_fn):
            raise TypeError(
                f"CalibrationMetrics needs {type(pl_module).__name__} to return a Predictive from "
                f"validation_step/test_step or to define predictive(x, num_samples); it does neither"
            )
        precision = trainer.precision_plugin
        context = precision.val_step_context() if stage == "val" else precision.test_step_context()
        with torch.no_grad(), context:  # x as a step gets it: the band's grid is made here, in float32
            predictive = predictive_fn(precision.convert_input(x), self._num_samples(pl_module))
        if not _is_predictive(predictive):
            raise TypeError(
                f"{type(pl_module).__name__}.predictive must return a CategoricalPredictive or GaussianPredictive; "
                f"got {type(predictive).__name__}"
            )
        return predictive.detach()

    def _num_samples(self, pl_module: LightningModule) -> int | None:
        if self.num_samples is not None or not hasattr(pl_module, "num_samples"):
            return self.num_samples
        value = pl_module.num_samples
        if not is_int(value) or value < 1:
            raise ValueError(
                f"CalibrationMetrics(num_samples=None) uses pl_module.num_samples, but "
                f"{type(pl_module).__name__}.num_samples is {value!r}; expected a positive int (or pass num_samples)"
            )
        return value

    def _start_epoch(
        self, trainer: Trainer, pl_module: LightningModule, predictive: Predictive, x: Any, stage: str
    ) -> _EpochMetrics:
        task = "classification" if isinstance(predictive, CategoricalPredictive) else "regression"
        if self.task not in ("auto", task):
            raise TypeError(
                f"CalibrationMetrics(task={self.task!r}) got a {type(predictive).__name__} "
                f"from {type(pl_module).__name__}"
            )
        device = pl_module.device
        if task == "classification":
            scores_ood = stage in self.ood_stages and self._has_ood_data(trainer)
            one_sample = cast(CategoricalPredictive, predictive).num_samples == 1
            if scores_ood and self.ood_score in _SPREAD_SCORES and one_sample:
                rank_zero_warn(
                    f"CalibrationMetrics(ood_score={self.ood_score!r}) measures how {type(pl_module).__name__}'s "
                    "predictive samples disagree, but its predictive has one sample: every score is 0 and the OOD "
                    "AUROC 0.5; use 'entropy' or 'max_prob' (or more samples)"
                )
            ood = ood_metrics(f"{stage}/ood/", self.ood_score).to(device) if scores_ood else None
            return _EpochMetrics(task, classification_metrics(f"{stage}/cal/", legacy=self.legacy).to(device), ood=ood)
        epoch = _EpochMetrics(task, regression_metrics(f"{stage}/reg/").to(device))
        one_dimensional = (
            isinstance(x, Tensor) and x.is_floating_point() and (x.ndim == 1 or (x.ndim == 2 and x.shape[1] == 1))
        )
        regression = cast(GaussianPredictive, predictive)  # not categorical, so Gaussian
        if stage == "test" and self.plots and one_dimensional and regression.mean_samples.shape[-1] == 1:
            epoch.band_x = CatMetric(nan_strategy="disable").to(device)
            epoch.band_y = CatMetric(nan_strategy="disable").to(device)
            epoch.band_input_shape = tuple(x.shape[1:])
        elif stage == "test" and self.plots:
            shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else type(x).__name__
            rank_zero_info(
                f"CalibrationMetrics: no predictive band (it needs one input and one output per example; got inputs "
                f"{shape} and {regression.mean_samples.shape[-1]} outputs)"
            )
        return epoch

    # ---- per epoch -------------------------------------------------------------------------------

    @staticmethod
    def _has_ood_data(trainer: Trainer) -> bool:
        return callable(
            getattr(trainer.datamodule, "ood_dataloader", None)  # type: ignore[attr-defined]  # set by Lightning
        )

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        epochs = self._drop_epochs(stage)
        oods = [(idx, epoch.ood) for idx, epoch in epochs if epoch.ood is not None]
        if oods:  # scored once, against each in-distribution loader
            self._score_ood_data(trainer, pl_module, oods, stage)
        computed: dict[str, float] = {}
        for idx, epoch in epochs:
            values = epoch.metrics.compute()
            if epoch.task == "regression":
                values.update(in_original_units(values, getattr(trainer, "datamodule", None)))
            if epoch.ood is not None:
                values.update(epoch.ood.compute())
            suffix = _loader_suffix(trainer, stage, idx)
            for name, value in values.items():
                pl_module.log(name + suffix, value, sync_dist=True, add_dataloader_idx=False)
            computed.update({name + suffix: float(value) for name, value in values.items()})
        self.last_metrics.update(computed)
        if stage == "test" and epochs:
            self._write_test_outputs(trainer, pl_module, epochs, computed)

    def _score_ood_data(
        self, trainer: Trainer, pl_module: LightningModule, oods: list[tuple[int, MetricCollection]], stage: str
    ) -> None:
        """One pass over the OOD data for every in-distribution loader's metrics, loader ``k``'s limited to its own
        batch count (:func:`_ood_batch_limit`)."""
        loader = trainer.datamodule.ood_dataloader()  # type: ignore[attr-defined]  # set by Lightning
        if not isinstance(loader, DataLoader):
            raise TypeError(f"datamodule.ood_dataloader() must return a torch DataLoader; got {type(loader).__name__}")
        if trainer.world_size > 1 and _sharded_in_distribution(trainer, stage):  # the OOD data alike
            loader = _sharded(loader, trainer.world_size, trainer.global_rank)
        limits = [_ood_batch_limit(trainer, stage, idx) for idx, _ in oods]
        longest = None if None in limits else max(cast(list[int], limits))
        for batch_idx, batch in enumerate(itertools.islice(loader, longest)):
            batch = step_batch(trainer, batch, pl_module.device)
            x = self.layout.input(batch)
            predictive = self._predict(trainer, pl_module, x, stage)
            keep = real_examples(batch_idx, predictive.num_examples, loader)
            for (_, ood), limit in zip(oods, limits):
                if limit is None or batch_idx < limit:
                    ood.update(predictive.first_examples(keep), True)

    def _write_test_outputs(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        epochs: list[tuple[int, _EpochMetrics]],
        computed: dict[str, float],
    ) -> None:
        folder = run_folder(trainer)
        if folder is None:
            return
        plots = [  # gathered on every rank (a collective), drawn on rank 0
            (
                _loader_suffix(trainer, "test", idx).replace("/", "_"),
                self._reliability_data(epoch) if self.plots and epoch.task == "classification" else None,
                self._band_data(trainer, pl_module, epoch),
            )
            for idx, epoch in epochs
        ]
        if not trainer.is_global_zero:
            return
        metrics_path = write_json(folder, "metrics", {_flat_key(name): value for name, value in computed.items()})
        rank_zero_info(f"CalibrationMetrics: wrote {metrics_path}")
        for suffix, reliability, band in plots:
            title = f"{figure_title(trainer, pl_module)}{suffix}"
            if reliability is not None:
                png = unique_path(folder, f"reliability{suffix}", ".png", ".json")
                write_json(folder, png.stem, reliability_diagram(*reliability, path=png, title=title).to_dict())
            if band is not None:
                xs, ys, predictive, grid, units = band
                predictive_band(xs, ys, predictive, grid, path=unique_path(folder, f"predictive_band{suffix}", ".png"),
                                title=title, xlabel=units.x_label, ylabel=units.y_label)  # fmt: skip

    @staticmethod
    def _reliability_data(epoch: _EpochMetrics) -> tuple[Tensor, Tensor]:
        ece = cast(ExpectedCalibrationError, epoch.metrics["ece"])  # classification_metrics' "ece"
        with ece.sync_context():  # gathers every rank's (confidence, correct) pairs
            return dim_zero_cat(ece.confidences).cpu(), dim_zero_cat(ece.accuracies).cpu()

    def _band_data(
        self, trainer: Trainer, pl_module: LightningModule, epoch: _EpochMetrics
    ) -> tuple[Tensor, Tensor, GaussianPredictive, Tensor, PlotUnits] | None:
        """The test data, the grid and the predictive on it, in the data's original units where the datamodule
        standardised them (:func:`plot_units`)."""
        if epoch.band_x is None or epoch.band_y is None:
            return None
        xs, ys = epoch.band_x.compute(), epoch.band_y.compute()
        span = float(xs.max() - xs.min())
        margin = 0.05 * span if span > 0 else 1.0  # one x value: a band one unit either side
        grid = torch.linspace(
            float(xs.min()) - margin, float(xs.max()) + margin, _BAND_GRID_POINTS, device=pl_module.device
        )
        predictive = self._predict(trainer, pl_module, grid.reshape(-1, *epoch.band_input_shape), "test")
        if not isinstance(predictive, GaussianPredictive):
            raise TypeError(f"expected a GaussianPredictive on the plotting grid; got {type(predictive).__name__}")
        units = plot_units(getattr(trainer, "datamodule", None))
        original = predictive.detach().to("cpu").affine(units.y_shift, units.y_scale)
        return units.x(xs.cpu()), units.y(ys.cpu()), original, units.x(grid.cpu()), units


def in_original_units(values: dict[str, Tensor], datamodule: object) -> dict[str, Tensor]:
    """For a datamodule that standardised the targets (``target_std`` ``s``, as
    :class:`~lightning_bayes.datamodules.UCIRegressionDataModule`): the NLL in the data's own units, ``nll + sum_d
    log s_d``, and with one output RMSE and CRPS times ``s``, as ``<name>_original`` (comparable with published
    results; the others stay in the standardised units the network is trained in)."""
    scale = getattr(datamodule, "target_std", None)
    if not isinstance(scale, Tensor):
        return {}
    converted = {}
    for name, value in values.items():
        kind = name.rsplit("/", 1)[-1]
        if kind == "nll":
            converted[f"{name}_original"] = value + scale.log().sum().to(value)
        elif kind in ("rmse", "crps") and scale.numel() == 1:
            converted[f"{name}_original"] = value * scale.reshape(()).to(value)
    return converted


def _sharded_in_distribution(trainer: Trainer, stage: str) -> bool:
    """Whether this stage's in-distribution loaders deal their examples out to the processes (Lightning's
    ``DistributedSampler``); with ``use_distributed_sampler=False`` every process sees all of them."""
    return any(distributed_sampler(loader) is not None for loader in stage_loaders(trainer, stage))


def _sharded(loader: DataLoader, world_size: int, rank: int) -> DataLoader:
    """The same loader over this rank's shard of the data (padded to equal shards by ``DistributedSampler``)."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise ValueError(
            "datamodule.ood_dataloader() must be a map-style DataLoader built with batch_size to be sharded "
            f"across {world_size} processes; got dataset {type(loader.dataset).__name__}, "
            f"batch_size={loader.batch_size}"
        )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=False),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def _ood_batch_limit(trainer: Trainer, stage: str, dataloader_idx: int) -> int | None:
    """How many OOD batches to score against in-distribution loader ``dataloader_idx``: at validation as many as that
    loader ran (a balanced, cheap monitor every epoch); at test all of them unless ``limit_test_batches`` limits the
    test set."""
    limit = trainer.limit_val_batches if stage == "val" else trainer.limit_test_batches
    if stage == "test" and isinstance(limit, float) and limit == 1.0:
        return None
    batches = (trainer.num_val_batches if stage == "val" else trainer.num_test_batches)[dataloader_idx]
    return None if math.isinf(batches) else int(batches)
