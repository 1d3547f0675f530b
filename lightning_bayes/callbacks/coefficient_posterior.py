"""``CoefficientPosterior``: after testing, summarise and plot the posterior of an interpretable variational layer.

For the :class:`~lightning_bayes.inference.variational_layers.VariationalLayer` at ``layer`` (by default the
linear part of a :class:`~lightning_bayes.models.SemiStructured` backbone) it draws ``num_samples`` weights
from ``q`` and writes ``coefficients.json`` (per coefficient: mean, standard deviation, 5/50/95% quantiles and
``P(beta > 0)``) and, with ``plots=True``, ``coefficients.png`` into the run's log folder, never overwriting.
Names come from ``names``, else from the datamodule's ``feature_names`` at the backbone's
``structured_features``, else ``beta[i]``. Works with any LightningModule that holds such a layer.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ..checks import check_flags, check_seed, is_int
from ..inference.variational_layers import VariationalLayer
from ..plots.coefficients import coefficient_posterior
from .run_files import run_folder, unique_path, write_json


class CoefficientPosterior(Callback):
    """Posterior summary of the weights of one variational layer after ``trainer.test``.

    Args:
        layer: the layer's name in the LightningModule (``pl_module.get_submodule(layer)``).
        names: one name per weight (row-major), or ``None`` to derive them.
        num_samples: posterior draws.
        plots: also write the PNG.
        seed: seed of the draws.
    """

    def __init__(
        self, layer: str = "backbone.linear", names: list[str] | None = None, num_samples: int = 10_000,
        plots: bool = True, seed: int = 0,
    ) -> None:
        if not is_int(num_samples) or num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2; got {num_samples!r}")
        check_seed(seed)
        check_flags(plots=plots)
        if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"names must be None or a list of str, one per weight; got {names!r}")  # "abc": 3 names
        self.layer, self.names, self.num_samples, self.plots, self.seed = layer, names, num_samples, plots, seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Checks ``layer`` before the fit and test run (it was found only in ``on_test_end``)."""
        self._layer(pl_module)

    def _layer(self, pl_module: LightningModule) -> VariationalLayer:
        try:
            found = pl_module.get_submodule(self.layer)
        except AttributeError as error:
            raise ValueError(f"layer={self.layer!r} is not a submodule of {type(pl_module).__name__}") from error
        if not isinstance(found, VariationalLayer):
            raise ValueError(f"layer={self.layer!r} is a {type(found).__name__}; expected a VariationalLayer")
        return found

    def _names(self, trainer: Trainer, pl_module: LightningModule, count: int) -> list[str]:
        if self.names is not None:
            if len(self.names) != count:
                raise ValueError(f"names must have one entry per weight ({count}); got {self.names!r}")
            return list(self.names)
        parent = pl_module.get_submodule(self.layer.rpartition(".")[0])
        columns = getattr(getattr(trainer, "datamodule", None), "feature_names", None)
        chosen = getattr(parent, "structured_features", None)
        if columns and chosen is not None and len(chosen) == count:
            return [columns[i] for i in chosen]
        return [f"beta[{i}]" for i in range(count)]

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layer = self._layer(pl_module)
        folder = run_folder(trainer)
        if folder is None or not trainer.is_global_zero:
            return
        # torch.manual_seed reseeds every CUDA generator too: fork them all (when CUDA is in use) with the CPU's
        cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():  # the draws leave the global generators untouched
            torch.manual_seed(self.seed)
            samples, _ = layer.weight.sample(self.num_samples)
        samples = samples.reshape(self.num_samples, -1).double().cpu()
        names = self._names(trainer, pl_module, samples.shape[1])
        quantiles = torch.quantile(samples, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=0)
        summary = {
            name: {
                "mean": float(samples[:, i].mean()), "std": float(samples[:, i].std()),
                "q05": float(quantiles[0, i]), "q50": float(quantiles[1, i]), "q95": float(quantiles[2, i]),
                "prob_positive": float((samples[:, i] > 0).double().mean()),
            }
            for i, name in enumerate(names)
        }
        png = unique_path(folder, "coefficients", ".png", ".json")  # a pair under one free stem
        rank_zero_info(f"CoefficientPosterior: wrote {write_json(folder, png.stem, summary)}")
        if self.plots:
            rank_zero_info(f"CoefficientPosterior: wrote {coefficient_posterior(samples, names, png)}")
