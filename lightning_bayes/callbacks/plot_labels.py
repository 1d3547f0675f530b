"""What the callbacks' figures say: the run they come from, and the data in the units a user knows."""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor


def figure_title(trainer: Trainer, pl_module: LightningModule) -> str:
    """``"<method> on <data>"``: the module's class and the datamodule's ``dataset`` name (its class without
    ``DataModule`` when it has none)."""
    datamodule = getattr(trainer, "datamodule", None)
    name = getattr(datamodule, "dataset", None)
    if not isinstance(name, str):
        name = type(datamodule).__name__.removesuffix("DataModule") if datamodule is not None else "its data"
    return f"{type(pl_module).__name__} on {name}"


@dataclass(frozen=True)
class PlotUnits:
    """``x = x_shift + x_scale x'`` and ``y = y_shift + y_scale y'`` from the standardised ``x'``, ``y'`` the network
    sees, with the axis labels."""

    x_shift: float = 0.0
    x_scale: float = 1.0
    y_shift: float = 0.0
    y_scale: float = 1.0
    x_label: str = "x"
    y_label: str = "y"

    def x(self, values: Tensor) -> Tensor:
        return values * self.x_scale + self.x_shift

    def y(self, values: Tensor) -> Tensor:
        return values * self.y_scale + self.y_shift


def plot_units(datamodule: object) -> PlotUnits:
    """The original units of a 1-D regression whose datamodule standardised it (``input_mean`` / ``input_std``,
    ``target_mean`` / ``target_std``, ``feature_names``, ``target_name``, as
    :class:`~lightning_bayes.datamodules.UCIRegressionDataModule` holds them); the network's units otherwise."""
    statistics = [getattr(datamodule, name, None) for name in ("input_mean", "input_std", "target_mean", "target_std")]
    if not all(isinstance(value, Tensor) and value.numel() == 1 for value in statistics):
        return PlotUnits()
    x_shift, x_scale, y_shift, y_scale = (float(value) for value in statistics)  # type: ignore[arg-type]
    features = getattr(datamodule, "feature_names", None) or ["x"]
    return PlotUnits(x_shift, x_scale, y_shift, y_scale, str(features[0]), str(getattr(datamodule, "target_name", "y")))
