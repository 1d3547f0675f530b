"""``lightning-bayes``: the LightningCLI entry point.

``lightning-bayes fit --config configs/mnist/map.yaml`` trains, then (unless ``--test_after_fit false``)
runs the test stage on the best checkpoint in the same command; ``CalibrationMetrics`` is always
attached (configure it under ``metrics:``) and prints/writes the metrics table at test end; ``predict`` writes
``predictions.csv`` into the run folder (:class:`PredictionWriter`, under ``predictions:``). With
``--ckpt_path`` the model is built from the checkpoint's hyperparameters (as in LightningCLI), but a
``--model.…`` argument given on the command line wins over them, e.g.
``lightning-bayes test --config ... --ckpt_path last.ckpt --model.init_args.num_samples 100``. A ``--config``
that is not a file may name a config shipped with the package (``--config mnist/map``); ``lightning-bayes configs``
lists them.
"""

from __future__ import annotations

import csv
import glob
import inspect
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .bundled_configs import describe_bundled_configs, prerequisite_command, with_bundled_configs
from .callbacks import CalibrationMetrics, PredictionWriter
from .cli_order import options_a_later_config_replaces
from .cli_parser import BayesArgumentParser, imported_class
from .cli_resumed_best import keep_best_across_folders
from .checks import held
from .models.weights import load_torch_file, relative_to_note
from .modules.base import BayesianModule


DESCRIPTION = (
    "lightning_bayes: Bayesian deep learning methods as Lightning modules and callbacks. Run a config with "
    "`lightning-bayes fit --config quickstart` (a file, or the name of a shipped config); `lightning-bayes configs` "
    "lists the shipped configs."
)


class RunConfigSaver(SaveConfigCallback):
    """Lightning's ``config.yaml`` writer, whose refusal to overwrite an earlier run's config says what to do on the
    command line (Lightning's points at ``LightningCLI(...)`` arguments, which a command-line user cannot pass).
    A run that fails before its first loop starts (a method refusing the Trainer's settings in ``setup`` or
    ``on_fit_start``) with nothing else in its folder takes its ``config.yaml`` back, and the logger's then empty
    version folder (and the run name's folder when it held nothing else), so that the next run does not find a
    version folder holding only a config (and take the next version number)."""

    _written: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir if self.save_to_log_dir and not self.already_saved else None  # every rank asks
        folder = Path(log_dir) if log_dir is not None and trainer.is_global_zero else None  # rank 0 writes
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as error:
            if "to NOT exist" not in str(error):
                raise
            raise RuntimeError(
                f"{trainer.log_dir}/{self.config_filename} is there from an earlier run, and lightning-bayes does not "
                "overwrite a run's files: without a logger every run writes to the same folder, so give this one its "
                "own --trainer.default_root_dir (or keep the logger: each run then gets a new version folder)"
            ) from None
        if folder is not None and (folder / self.config_filename).is_file():
            self._written = folder / self.config_filename

    def _keep(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A loop started: from here on the config is the run's record."""
        self._written = None

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = on_predict_start = _keep

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        written, self._written = self._written, None
        logger = trainer.logger
        version = Path(logger.log_dir) if logger is not None and logger.log_dir is not None else None
        if written is not None and written.is_file() and all(p == written for p in written.parent.iterdir()):
            written.unlink()
        # the logger's version folder, which Lightning made for this run at its setup, left empty (by the unlink, or
        # by a refusal before the config was written: a callback's setup not finding its checkpoint)
        if version is not None and trainer.is_global_zero and version.is_dir() and not any(version.iterdir()):
            version.rmdir()
            # and the run name's folder above it when that held only this version (a first run that failed)
            named, save_dir = version.parent, getattr(logger, "save_dir", None)
            if save_dir is not None and named.resolve() != Path(save_dir).resolve() and not any(named.iterdir()):
                named.rmdir()


class BayesCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with the shared metrics callback."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, its ``--config`` help naming the shipped configs too."""
        parser = super().init_parser(**kwargs)
        for action in parser._actions:
            if action.dest == "config":
                action.help = (
                    "Path to a configuration file in json or yaml format, or the name of a config shipped with "
                    "lightning_bayes (quickstart, mnist/map, ...; `lightning-bayes configs` lists them)."
                )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CalibrationMetrics, "metrics")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """Every subcommand knows ``--test_after_fit``: only ``fit`` acts on it, the others accept it so that the
        ``config.yaml`` a fit saves next to its logs drives ``test``/``validate``/``predict`` as it is. ``predict``
        returns nothing by default (``--return_predictions false``; Lightning's default keeps every predictive)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # the PredictionWriter writes every batch's rows: none held in memory as well
            parser.set_defaults(return_predictions=False)
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit: run the test stage (best checkpoint if one is monitored) right after fitting; "
            "other subcommands ignore it.",
        )
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args
        replaced = options_a_later_config_replaces([str(a) for a in given]) if isinstance(given, (list, tuple)) else []
        if replaced:
            options = ", ".join(dict.fromkeys(option for option, _ in replaced))
            raise ValueError(
                f"{options} comes before --config {replaced[0][1]}, which sets it too and so replaces it (the command "
                "line applies in order): give it after --config"
            )
        self._given_model_args = _model_arguments(given)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's hyperparameters, then the ``--model.…`` arguments given explicitly (LightningCLI alone
        lets the checkpoint's values replace them silently). A path that is not a file, a file that is not a
        checkpoint, and a checkpoint of another method than the config's are refused before anything is written
        (LightningCLI would build the checkpoint's method and file its results under the config's run name)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return super()._parse_ckpt_path()
        if ckpt_path in _RUN_CHECKPOINTS:  # Lightning looks in this run's own (new, empty) folder only
            ckpt_path = self.config[subcommand].ckpt_path = self._run_checkpoint(subcommand, ckpt_path)
            if ckpt_path is None:  # a first fit of a job that resumes when it can
                return super()._parse_ckpt_path()
        _check_local_checkpoint(ckpt_path)
        configured = _class_path(self.config[subcommand].get("model"))
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as error:
            unsupported = re.search(r"Unsupported global: [^\n]*", str(error))
            if unsupported is None:  # not a pickle of torch.save's, or not one at all
                raise ValueError(f"--ckpt_path {ckpt_path!r} is not a Lightning checkpoint (torch.load found no "
                                 "checkpoint in it)") from None
            reason = unsupported.group(0)
            raise ValueError(
                f"--ckpt_path {ckpt_path!r} holds Python objects that a weights-only torch.load refuses ({reason}): a "
                "checkpoint saved outside this command line whose hyperparameters hold classes or functions; load it "
                "in Python (weights_only=False, only for a file from a trusted source)"
            ) from None
        saved = _class_path(self.config[subcommand].get("model"))
        if configured and saved and (imported_class(configured) or configured) != (imported_class(saved) or saved):
            raise ValueError(
                f"--ckpt_path {ckpt_path!r} is a checkpoint of {saved}, but the config's model is {configured}: pass "
                "the config it was trained with (its run folder's config.yaml) or a checkpoint of the config's method"
            )
        if self._given_model_args:
            model = _as_subclass_values(_nested_values(self._given_model_args), self.config[subcommand].model)
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _run_checkpoint(self, subcommand: str, kind: str) -> str | None:
        """:func:`run_checkpoint` for ``--ckpt_path best|last``: the file it names, said; none is refused, but for
        ``fit``, which starts afresh with a warning (a job script that always resumes when it can)."""
        found, patterns = run_checkpoint(kind, self.config[subcommand])
        if found is not None:
            rank_zero_info(f"--ckpt_path {kind}: {found}")
            return found
        named = [pattern for pattern in patterns if pattern.endswith(f"{kind}.ckpt")]
        searched = f"{', '.join(named)}: no file{relative_to_note(named[0]) if named else ''}"
        if subcommand == "fit":
            rank_zero_warn(f"--ckpt_path {kind}: no earlier run of this config has one ({searched}); the fit starts "
                           "afresh")
            return None
        raise FileNotFoundError(
            f"--ckpt_path {kind}: no earlier run of this config has one ({searched}); fit first, or give the "
            "checkpoint's file"
        )

    def _warn_untrained(self, subcommand: str) -> None:
        """``test``/``validate``/``predict`` without ``--ckpt_path`` score the model as built, which is untrained
        unless a ``checkpoint`` argument of the method loaded trained weights: say so; a method that cannot score as
        built (:meth:`~lightning_bayes.modules.base.BayesianModule.unfitted_refusal`) is refused before the run's
        folder is made."""
        if self.config[subcommand].get("ckpt_path") or getattr(self.model, "hparams", {}).get("checkpoint"):
            return
        refusal = self.model.unfitted_refusal() if isinstance(self.model, BayesianModule) else None
        if refusal is not None:
            raise RuntimeError(f"`lightning-bayes {subcommand}` without --ckpt_path: {refusal}")
        rank_zero_warn(
            f"`lightning-bayes {subcommand}` without --ckpt_path scores {type(self.model).__name__} as built, with the "
            "weights it was initialised with; pass --ckpt_path <run>/checkpoints/last.ckpt to score a trained model"
        )

    def before_fit(self) -> None:
        _refuse_an_earlier_runs_folder(self.trainer)
        _refuse_trainer_steps_of_manual_optimisation(self.trainer, self.model)

    def before_test(self) -> None:
        _refuse_an_earlier_runs_folder(self.trainer)
        self._warn_untrained("test")

    def before_validate(self) -> None:
        _refuse_an_earlier_runs_folder(self.trainer)
        self._warn_untrained("validate")

    def before_predict(self) -> None:
        _refuse_an_earlier_runs_folder(self.trainer)
        self._warn_untrained("predict")

    def instantiate_classes(self) -> None:
        """jsonargparse reports an error a constructor raised (``num_samples must be a positive integer; got 0``)
        inside its union-validation message, after a dump of the whole namespace; raise the constructor's own
        exception instead, so that the last line of the traceback says what was wrong."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            cause: BaseException = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is error:
                raise
            raise cause from None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Show a Rich progress bar unless the user turned bars off or chose another one. Under ``fast_dev_run``
        no checkpoint is written: Lightning skips every save then but ``save_last``'s at the end of training,
        which would leave ``checkpoints/last-v<n>.ckpt`` in the working folder on every debug run."""
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, RichProgressBar(leave=True)]
        trainer = super()._instantiate_trainer(config, callbacks)
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint):
                keep_best_across_folders(checkpoint)  # a resumed fit logs under a new version folder
                if trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning
                    checkpoint.save_last = False
        return trainer

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.trainer.interrupted:
            return
        if self.trainer.num_training_batches == 0:  # Lightning only says "No training batches" and returns
            raise ValueError(
                "the fit ran no training batch (its training loader gave none: e.g. a batch_size larger than the "
                "training set with drop_last=True, or --trainer.limit_train_batches 0), so there is nothing fitted to "
                "test; lightning-bayes test --ckpt_path ... scores a checkpoint without training"
            )
        test_fitted(self.trainer, self.model, self.datamodule)


_LIGHTNING_CKPT_PATHS = ("best", "last", "hpc")  # resolved by the Trainer, not files
_RUN_CHECKPOINTS = ("best", "last")  # resolved here: the newest of the config's earlier runs


def run_checkpoint(kind: str, config: Any) -> tuple[str | None, list[str]]:
    """``--ckpt_path best`` / ``last``: the run's ``<kind>.ckpt`` when ``--config`` is a run folder's ``config.yaml``,
    else the newest ``<kind>.ckpt`` (or ``<kind>-v<n>.ckpt``) of the config's earlier runs: in the ``dirpath`` of a
    configured ``ModelCheckpoint``, under each logger's ``<save_dir>/<name>/version_*/checkpoints/``
    (``<default_root_dir>/lightning_logs/...`` for Lightning's default logger, ``<default_root_dir>/checkpoints/``
    without one). Also the patterns searched, for the message when none matches. Lightning would look in the new
    run's folder only, find nothing, and score the model as built (``last``) or refuse with a hint about
    ``ModelCheckpoint`` (``best``)."""
    for given in config.get("config") or []:  # files; an inline YAML config has no folder
        own = Path(os.fspath(given)).parent / "checkpoints" / f"{kind}.ckpt" if isinstance(given, os.PathLike) else None
        if own is not None and own.is_file():
            return str(own), [str(own)]
    trainer = config.get("trainer") or {}
    root = Path(trainer.get("default_root_dir") or ".")
    folders = [Path(c["init_args"]["dirpath"]) for c in _listed(trainer.get("callbacks"))
               if hasattr(c, "get") and (c.get("init_args") or {}).get("dirpath")]
    loggers = trainer.get("logger")
    if loggers is False:  # ModelCheckpoint's folder without a logger
        folders.append(root / "checkpoints")
    for logger in _listed({"init_args": {}} if loggers in (None, True) else loggers if loggers is not False else None):
        arguments = getattr(logger, "get", lambda key: None)("init_args") or {}  # a class_path/init_args pair
        runs = Path(arguments.get("save_dir") or root) / (arguments.get("name", "lightning_logs") or "")
        version = arguments.get("version")
        folders.append(runs / ("version_*" if version is None else _version_folder(version)) / "checkpoints")
    patterns = [str(folder / name) for folder in folders for name in (f"{kind}.ckpt", f"{kind}-v*.ckpt")]
    found = sorted({match for pattern in patterns for match in glob.glob(pattern)}, key=os.path.getmtime)
    return (found[-1] if found else None), patterns


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def _version_folder(version: Any) -> str:
    """Lightning's folder for a logger's ``version``: ``version_<n>`` for an int, the string itself otherwise."""
    return f"version_{version}" if isinstance(version, int) else str(version)


def _refuse_an_earlier_runs_folder(trainer: Trainer) -> None:
    """A logger whose folder (a fixed ``version``) holds an earlier run's files: refused before the Trainer runs, which
    would set the logger up first (Lightning's CSVLogger then deletes the earlier ``metrics.csv``). Asked by the main
    process only (rank 0, before it launches the others)."""
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        folder = Path(log_dir) if log_dir else None
        if folder is not None and folder.is_dir() and any(folder.iterdir()):
            files = sorted(path.name for path in folder.iterdir())
            raise RuntimeError(
                f"{folder} holds an earlier run's files ({', '.join(files)}), and lightning-bayes does not overwrite a "
                "run's files: give this run another --trainer.logger.init_args.version (or none: each run then gets a "
                "new version folder)"
            )


def _refuse_trainer_steps_of_manual_optimisation(trainer: Trainer, model: LightningModule) -> None:
    """A method that steps its optimisers itself (BLoB's two) or takes no step (a sweep, a sampler, a search) is out
    of reach of the Trainer's gradient clipping and accumulation; Lightning refuses both, asking to "switch to
    automatic optimization", which the method cannot: say what to do instead."""
    if model.automatic_optimization:
        return
    name, clip, accumulate = type(model).__name__, trainer.gradient_clip_val, trainer.accumulate_grad_batches
    steps = not isinstance(model, BayesianModule) or model.takes_optimizer_steps()
    does = "steps its optimisers itself" if steps else "takes no optimiser step"
    if clip is not None and float(clip) > 0:
        own = "gradient_clip_val" in inspect.signature(type(model)).parameters
        instead = "clip with --model.init_args.gradient_clip_val" if own else "leave --trainer.gradient_clip_val unset"
        raise ValueError(f"{name} {does}, which the Trainer's gradient_clip_val={clip} does not reach: {instead}")
    if accumulate != 1:
        instead = "give a larger batch (--data.init_args.batch_size)" if steps else "leave it at 1"
        raise ValueError(
            f"{name} {does}, which the Trainer's accumulate_grad_batches={accumulate} does not reach: {instead}"
        )


def _check_local_checkpoint(ckpt_path: str) -> None:
    """A ``--ckpt_path`` that names a local file (not ``best``/``last``/``hpc``, a registry or a URL) must exist and be
    a Lightning checkpoint (an empty file, text or a plain state dict failed deep inside the run, after its folder)."""
    if ckpt_path in _LIGHTNING_CKPT_PATHS or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} is not a file{relative_to_note(ckpt_path)}")
    checkpoint = load_torch_file(ckpt_path, f"--ckpt_path {ckpt_path!r}", "a Lightning checkpoint")
    if checkpoint is None:
        return  # a checkpoint holding classes a weights-only load refuses: explained where Lightning meets it
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise ValueError(
            f"--ckpt_path {ckpt_path!r} is not a Lightning checkpoint (a torch.save file without Lightning's keys; it "
            f"holds {held(checkpoint)}); a state dict loads through the method's own checkpoint argument, where it "
            "has one"
        )


def _class_path(model: Any) -> str | None:
    return model.get("class_path") if hasattr(model, "get") else None


def _model_arguments(args: Any) -> list[tuple[str, str]]:
    """The ``--model.<key>[=| ]value`` items of a command line as ``(key, value)`` pairs (the parser has already
    refused an item without a value)."""
    if not isinstance(args, (list, tuple)):
        return []
    found: list[tuple[str, str]] = []
    for index, arg in enumerate(args):
        if isinstance(arg, str) and arg.startswith("--model."):
            key, equals, value = arg[len("--model.") :].partition("=")
            if not equals:
                value = str(args[index + 1]) if index + 1 < len(args) else ""
            found.append((key, value))
    return found


def _nested_values(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``[("init_args.num_samples", "5")]`` -> ``{"init_args": {"num_samples": 5}}``; values are read as YAML,
    as jsonargparse reads command-line values."""
    nested: dict[str, Any] = {}
    for key, value in pairs:
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    return nested


_SUBCLASS_KEYS = ("class_path", "init_args", "dict_kwargs")


def _as_subclass_values(given: dict[str, Any], current: Any) -> dict[str, Any]:
    """``given`` (nested values) in the form ``parse_object`` takes for the subclass ``current`` (a parsed namespace):
    at every class, its ``class_path`` added and jsonargparse's shorthand ``x`` read as ``init_args.x``."""
    if not hasattr(current, "get"):
        return given
    if not current.get("class_path"):
        return {key: _as_subclass_values(value, current.get(key)) if isinstance(value, dict) else value
                for key, value in given.items()}
    init_args = {**given.get("init_args", {}), **{k: v for k, v in given.items() if k not in _SUBCLASS_KEYS}}
    resolved = {"class_path": current.class_path, **{k: v for k, v in given.items() if k in _SUBCLASS_KEYS}}
    resolved["init_args"] = _as_subclass_values(init_args, current.get("init_args"))
    return resolved


def trained_checkpoint(trainer: Trainer) -> str | None:
    """The checkpoint a fit leaves for the runs that start from it: the best one a monitoring ``ModelCheckpoint``
    saved, else the newest file any saved; ``None`` when none was written."""
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    best = [c.best_model_path for c in checkpoints if c.monitor is not None and c.best_model_path]
    if best:
        return best[0]
    written = [p for c in checkpoints for p in (c.last_model_path, c.best_model_path) if p and os.path.isfile(p)]
    return max(written, key=os.path.getmtime, default=None)


def test_fitted(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule) -> None:
    """Test after ``trainer.fit``: the best checkpoint when one is monitored, else the model as it is (with a warning
    when a monitored checkpoint never saw its metric). A best
    checkpoint named relative to another working folder (a fit resumed from elsewhere restores the path as saved) is
    not there: the model is tested as it is, with a warning, rather than failing after the fit."""
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    monitored = getattr(checkpoint, "monitor", None)
    use_best = bool(best) and monitored is not None
    if monitored is not None and not best and not getattr(trainer, "fast_dev_run", False):  # writes no checkpoint
        rank_zero_warn(
            f"no checkpoint was chosen by {monitored!r} (no validation ran: check_val_every_n_epoch, "
            "limit_val_batches, or max_steps ending the fit first): testing the model as the fit left it"
        )
    if use_best and not trainer.strategy.broadcast(Path(best).is_file()):
        rank_zero_warn(
            f"the best checkpoint {best!r} is not there (relative to {os.getcwd()}; a fit resumed from another folder "
            "keeps the path it was saved under): testing the model as the fit left it"
        )
        use_best = False
    continue_the_fits_records(trainer)
    # the path "best" stands for, given as it is: "best" warns whenever the trainer has several ModelCheckpoints
    trainer.test(model, datamodule=datamodule, ckpt_path=best if use_best else None)


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer for a folder whose ``metrics.csv`` a fit of this run wrote: its rows are kept and the
    new ones appended (Lightning's writer deletes the file it finds), under the header widened to the new keys."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])


def continue_the_fits_records(trainer: Trainer) -> None:
    """Before the test after a fit that ran in processes now gone (``ddp_spawn``): this process's config saver never
    saved and its CSV logger never wrote, so the test's would refuse the ``config.yaml`` the fit wrote and delete
    its ``metrics.csv``; they carry on the fit's records instead. After a fit in this process nothing changes on rank
    0 (under ``ddp`` the other ranks' loggers, which write nothing, get the appending writer too). The writer relies
    on Lightning 2.6's ``ExperimentWriter._check_log_dir_exists`` and ``CSVLogger._experiment``
    (``tests/test_cli_ddp.py`` runs it)."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # Lightning sets it in its connector
        if isinstance(callback, SaveConfigCallback):
            callback.already_saved = True
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or logger._experiment is not None or logger.log_dir is None:
            continue  # another logger, or one that wrote in this process
        if os.path.isfile(os.path.join(logger.log_dir, ExperimentWriter.NAME_METRICS_FILE)):
            logger._experiment = AppendingExperimentWriter(logger.log_dir)


def run(args: Any = None, *, subcommand: bool = True) -> BayesCLI:
    """Run the CLI on ``args`` (a list like ``["fit", "--config", ...]``; None: the command line); a ``--config``
    value may name a shipped config (:func:`~lightning_bayes.bundled_configs.resolve_config`).

    With ``subcommand=False``, ``args`` holds no subcommand (``["--config", ...]``): model, data and trainer
    are instantiated and nothing runs (``cli.model``, ``cli.datamodule``, ``cli.trainer``, ``cli.config``).
    """
    if isinstance(args, (list, tuple)):
        args = with_bundled_configs(list(args))
    # Lightning's own pytree code builds a LeafSpec, which this torch deprecates: twice a run, nothing to act on
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    try:
        return BayesCLI(
            BayesianModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": False},
            args=args,
            run=subcommand,
            auto_configure_optimizers=False,
            parser_kwargs={"description": DESCRIPTION},
            parser_class=BayesArgumentParser,
        )
    except FileNotFoundError as error:
        _name_the_prerequisite(error, args)
        raise


def _name_the_prerequisite(error: FileNotFoundError, args: Any) -> None:
    """A method's (or a curve's) ``checkpoint='runs/<name>/...'`` not there (a post-hoc method's MAP): the message gains
    the command of the shipped config that trains it; under ``test``, ``validate`` or ``predict --ckpt_path``, whose
    checkpoint holds the weights, the flag that does without it."""
    if len(error.args) != 1 or not isinstance(error.args[0], str) or not error.args[0].startswith("checkpoint="):
        return
    given = sys.argv[1:] if args is None else [str(a) for a in args]
    if given[:1] in (["test"], ["validate"], ["predict"]) and any(a.startswith("--ckpt_path") for a in given):
        hint = "or, as --ckpt_path holds the fitted weights, add --model.init_args.checkpoint null"
        error.args = (f"{error.args[0]}; {hint}",)
        return
    match = re.match(r"checkpoint='(?:\./)?runs/(\w+)/version_", error.args[0])  # models.weights' "matches no file"
    command = prerequisite_command(match[1]) if match else None
    if command is not None:
        error.args = (f"{error.args[0]}; the shipped config that writes it: {command}",)


def main() -> None:
    """Console-script entry point ``lightning-bayes``; ``lightning-bayes configs`` lists the shipped configs."""
    if sys.argv[1:2] == ["configs"]:
        extra = sys.argv[2:]
        program = sys.argv[0] if sys.argv[0].startswith("python -m") else "lightning-bayes"  # see __main__.py
        if extra and extra not in (["-h"], ["--help"]):
            print(f"{program}: error: `configs` takes no arguments; got {' '.join(extra)}", file=sys.stderr)
            sys.exit(2)
        if extra:
            print(f"usage: {program} configs\n\nLists the configs shipped with lightning_bayes; run one with "
                  f"`{program} fit --config <name>`.\n")
        try:
            print(describe_bundled_configs(), flush=True)
        except BrokenPipeError:  # `lightning-bayes configs | head`: the reader left; no traceback (Python's docs)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        return
    try:
        sys.argv[1:] = with_bundled_configs(sys.argv[1:])
    except FileNotFoundError as error:
        print(f"lightning-bayes: error: {error}", file=sys.stderr)
        sys.exit(2)  # as the parser exits on a bad argument
    run()
