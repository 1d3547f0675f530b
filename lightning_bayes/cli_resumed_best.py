"""The best checkpoint of a fit resumed by the command line, which logs it under a new version folder.

Lightning's ``ModelCheckpoint.load_state_dict`` restores only ``best_model_path`` when the checkpoint folder changed
(it warns that the scores "won't be reloaded"): the resumed fit's first validation then counted as the best whatever
its score, saved ``best.ckpt`` in the new folder and the fit's test ran on the best epoch after the resume (a MAP
resumed at epoch 25 tested epoch 28's val NLL 0.1231 where the unstopped fit tested epoch 22's 0.1202), as did the
post-hoc configs that take the newest ``version_*/checkpoints/best.ckpt``. Here the scores come back too, so a
resumed fit writes a new best only when it beats the earlier one; Lightning deletes no local checkpoint outside the
callback's own folder, so the earlier run's files stay (on a remote file system, e.g. ``s3://``, Lightning deletes a
beaten top-k file wherever it is).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

_KEPT = ("best_model_score", "kth_best_model_path", "kth_value", "best_k_models")


def keep_best_across_folders(checkpoint: ModelCheckpoint) -> None:
    """Make ``checkpoint`` restore its best scores from a checkpoint of another folder: its ``load_state_dict`` becomes
    :func:`_load_keeping_best` bound to it (a partial of a module-level function: the callback still pickles, as
    ``ddp_spawn`` needs, and a deep copy binds the copy)."""
    checkpoint.load_state_dict = functools.partial(_load_keeping_best, checkpoint)  # type: ignore[method-assign]


def _load_keeping_best(checkpoint: ModelCheckpoint, state: dict[str, Any]) -> None:
    with warnings.catch_warnings():  # "The dirpath has changed ... won't be reloaded": they are, below
        warnings.filterwarnings("ignore", "The dirpath has changed", UserWarning)
        type(checkpoint).load_state_dict(checkpoint, state)
    if state.get("dirpath", checkpoint.dirpath) != checkpoint.dirpath:
        for name in _KEPT:
            if name in state:
                setattr(checkpoint, name, state[name])
