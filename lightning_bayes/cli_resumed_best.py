"""The best checkpoint of a fit resumed by the command line, which logs it under a new version folder.

Lightning's ``ModelCheckpoint.load_state_dict`` restores only ``best_model_path`` when the checkpoint folder changed
(it warns that the scores "won't be reloaded"): the resumed fit's first validation then counted as the best whatever
its score, saved ``best.ckpt`` in the new folder and the fit's test ran on the best epoch after the resume (a MAP
resumed at epoch 25 tested epoch 28's val NLL 0.1231 where the unstopped fit tested epoch 22's 0.1202), as did the
post-hoc configs that take the newest ``version_*/checkpoints/best.ckpt``. Here the scores come back too, so a
resumed fit writes a new best only when it beats the earlier one; Lightning never deletes a checkpoint outside the
callback's own folder, so the earlier run's files stay.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

_KEPT = ("best_model_score", "kth_best_model_path", "kth_value", "best_k_models")


def keep_best_across_folders(checkpoint: ModelCheckpoint) -> None:
    """Make ``checkpoint`` restore its best scores from a checkpoint of another folder (``checkpoint.load_state_dict``
    is wrapped on this instance)."""
    load = checkpoint.load_state_dict

    def load_state_dict(state: dict[str, Any]) -> None:
        with warnings.catch_warnings():  # "The dirpath has changed ... won't be reloaded": they are, below
            warnings.filterwarnings("ignore", "The dirpath has changed", UserWarning)
            load(state)
        if state.get("dirpath", checkpoint.dirpath) != checkpoint.dirpath:
            for name in _KEPT:
                if name in state:
                    setattr(checkpoint, name, state[name])

    checkpoint.load_state_dict = load_state_dict  # type: ignore[method-assign,assignment]
