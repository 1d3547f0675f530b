"""The epoch hooks Lightning skips when a fit resumes from a checkpoint written on an epoch's last training batch.

Such a checkpoint (``ModelCheckpoint(every_n_train_steps=k)`` with ``k`` dividing the epoch, or a job killed right
after one) is counted as a finished epoch whose end never runs (no ``on_train_epoch_end``, no end-of-epoch
validation), and the next epoch then starts without ``on_train_epoch_start`` (Lightning 2.5 and later,
``FitLoop.reset``; checked on 2.6.6). Epoch-level posterior work (a SWA snapshot, the learning rate SWASubspace
schedules, VIKING's sweep, BLoB's epoch schedulers) replays its own share at ``on_train_start``, where the weights
are those the skipped hooks would have seen, so that resuming gives what not stopping gives.
"""

from __future__ import annotations

from lightning.pytorch import Trainer


def epoch_hooks_skipped(trainer: Trainer) -> bool:
    """Whether this fit, at its ``on_train_start``, resumed on an epoch's last training batch: the epoch
    ``trainer.current_epoch - 1`` ended without ``on_train_epoch_end`` and ``trainer.current_epoch`` starts without
    ``on_train_epoch_start`` (the condition under which ``FitLoop.reset`` marks the epoch finished)."""
    loop = trainer.fit_loop  # Lightning before 2.5 has none of these stages (and no such skip): False
    return bool(
        getattr(loop, "restarted_mid_epoch", False)
        and getattr(loop.epoch_loop, "restarted_on_train_batch_end", False)
        and loop.epoch_loop.batch_progress.is_last_batch
    )
