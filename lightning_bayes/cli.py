"""``lightning-bayes``: the LightningCLI entry point.

``lightning-bayes fit --config configs/mnist/map.yaml`` trains, then (unless ``--test_after_fit false``)
runs the test stage on the best checkpoint in the same command; ``CalibrationMetrics`` is always
attached (configure it under ``metrics:``) and prints/writes the metrics table at test end.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callbacks import CalibrationMetrics
from .modules.base import BayesianModule


class BayesCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with the shared metrics callback."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CalibrationMetrics, "metrics")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="Run the test stage (best checkpoint if one is monitored) right after fitting.",
            )
        return parser

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Show a Rich progress bar unless the user turned bars off or chose another one."""
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, RichProgressBar(leave=True)]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.trainer.interrupted:
            return
        test_fitted(self.trainer, self.model, self.datamodule)


def test_fitted(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule) -> None:
    """Test after ``trainer.fit``: the best checkpoint when one is monitored, else the model as it is."""
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
    use_best = bool(best) and getattr(checkpoint, "monitor", None) is not None
    trainer.test(model, datamodule=datamodule, ckpt_path="best" if use_best else None)


def run(args: Any = None, *, subcommand: bool = True) -> BayesCLI:
    """Run the CLI on ``args`` (a list like ``["fit", "--config", ...]``; None: the command line).

    With ``subcommand=False``, ``args`` holds no subcommand (``["--config", ...]``): model, data and trainer
    are instantiated and nothing runs (``cli.model``, ``cli.datamodule``, ``cli.trainer``, ``cli.config``).
    """
    return BayesCLI(
        BayesianModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": False},
        args=args,
        run=subcommand,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Console-script entry point ``lightning-bayes``."""
    run()


if __name__ == "__main__":
    main()
