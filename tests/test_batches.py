"""BatchLayout: where tuple and dict batches keep their input and target."""

import pytest
import torch

from lightning_bayes.batches import BatchLayout

X, Y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])


def test_tuple_batches_are_x_then_y_whatever_the_keys() -> None:
    for layout in (BatchLayout(), BatchLayout("label", "image")):
        x, y = layout.split((X, Y, "extra"), "owner")
        assert x is X and y is Y
        assert layout.input([X, Y]) is X and layout.target([X, Y]) is Y
        assert layout.target((X,)) is None and layout.input(X) is X


def test_dict_batches_by_their_keys() -> None:
    batch = {"image": X, "label": Y, "mask": X > 0}
    x, y = BatchLayout("label", "image").split(batch, "owner")
    assert x is X and y is Y
    x, y = BatchLayout("label").split(batch, "owner")  # the input: every other entry
    assert y is Y and set(x) == {"image", "mask"} and x["image"] is X
    assert BatchLayout().input(batch) is batch and BatchLayout().target(batch) is None  # an input-only dict
    assert BatchLayout("label").target(batch) is Y


def test_missing_keys_and_bad_batches_are_named() -> None:
    batch = {"image": X, "label": Y}
    with pytest.raises(ValueError, match=r"CalibrationMetrics got a dict batch \(keys \['image', 'label'\]\); give "
                       "target_key"):
        BatchLayout().split(batch, "CalibrationMetrics")
    with pytest.raises(ValueError, match=r"target_key='y' is not a key of the batch; its keys are "
                       r"\['image', 'label'\]"):
        BatchLayout("y").split(batch, "owner")
    with pytest.raises(ValueError, match=r"input_key='x' is not a key of the batch"):
        BatchLayout("label", "x").input(batch)
    with pytest.raises(ValueError, match=r"owner expects batches \(x, y, ...\) or dicts with target_key; got Tensor"):
        BatchLayout().split(X, "owner")
    with pytest.raises(ValueError, match="target_key must be a dict batch's key"):
        BatchLayout(target_key=1)  # type: ignore[arg-type]
