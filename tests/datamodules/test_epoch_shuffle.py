"""The training shuffle depends on the seed and the epoch only, and its position inside an epoch is checkpoint
state: a run resumed at an epoch boundary or inside an epoch trains on the unstopped run's batches and ends with
the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_bayes.datamodules import DigitsDataModule, EpochLoader, EpochShuffle, side_pass, training_pass_epoch
from lightning_bayes.models import MLP
from lightning_bayes.modules import MAP


def test_each_epochs_order_is_a_function_of_seed_and_epoch() -> None:
    data = range(50)
    sampler = EpochShuffle(data, seed=7)
    first, second = list(sampler), list(sampler)  # without set_epoch: epochs 0 and 1
    assert sorted(first) == list(data) and first != second
    for epoch in (3, 1, 0):  # any order of epochs, whatever was drawn before
        sampler.set_epoch(epoch)
        expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 + 1_000_003 * epoch)).tolist()
        assert list(sampler) == expected
    assert list(EpochShuffle(data, seed=8)) != first


def test_its_state_resumes_a_pass_where_it_stopped() -> None:
    sampler = EpochShuffle(range(50), seed=7, epoch=4)
    assert sampler.state_dict() == {"epoch": 4, "yielded": 0}  # before any pass: the next one's
    passing = iter(sampler)
    taken = [next(passing) for _ in range(20)]
    state = sampler.state_dict()
    assert state == {"epoch": 4, "yielded": 20}
    rest = list(passing)
    resumed = EpochShuffle(range(50), seed=7)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and sorted(taken + rest) == list(range(50))
    assert list(resumed) == list(EpochShuffle(range(50), seed=7, epoch=5))  # the next pass is whole


class _StopsInsideEpoch1(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 4:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _fit(
    epochs: int, root: Path, callbacks: list[Callback], num_workers: int, ckpt_path: Path | None = None,
    limit: int | None = None, max_steps: int = -1, val_batches: int = 0,
) -> MAP:  # fmt: skip
    torch.manual_seed(0)
    module = MAP(MLP(64, 10, hidden=[16]))
    Trainer(
        max_epochs=epochs, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks, limit_val_batches=val_batches, limit_train_batches=limit,
    ).fit(module, datamodule=DigitsDataModule(batch_size=64, num_workers=num_workers), ckpt_path=ckpt_path,
          weights_only=False)  # fmt: skip
    return module


@pytest.mark.parametrize("num_workers", [0, 1])  # a worker draws indices before Lightning calls set_epoch
@pytest.mark.parametrize("inside_epoch", [False, True])  # the loader's position is checkpoint state
def test_a_resumed_fit_ends_with_the_unstopped_weights(tmp_path: Path, inside_epoch: bool, num_workers: int) -> None:
    straight = _fit(3, tmp_path / "straight", [], num_workers)
    if inside_epoch:
        ckpt = tmp_path / "inside.ckpt"
        _fit(3, tmp_path / "stopped", [_StopsInsideEpoch1(ckpt)], num_workers)
    else:
        ckpt = tmp_path / "last.ckpt"
        _fit(1, tmp_path / "stopped", [ModelCheckpoint(tmp_path, save_last=True)], num_workers)
    resumed = _fit(3, tmp_path / "resumed", [], num_workers, ckpt_path=ckpt)  # must not replay epoch 0
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), name


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("limit", [None, 6])
def test_a_checkpoint_on_an_epochs_last_step_resumes_into_the_next_epoch(
    tmp_path: Path, num_workers: int, limit: int | None
) -> None:
    """``ModelCheckpoint(every_n_train_steps=17)`` saves after epoch 0's last batch (1,077 images in batches of 64),
    with the loader's state saying "all of the pass handed out": torchdata applied it to the next pass, so the
    resumed epoch 1 trained on nothing (global step 34 instead of 51). Under ``limit_train_batches=6`` the state
    after batch 6 of 17 was taken for one inside the pass: the resumed epoch 1 began at its 7th batch."""
    batches = limit or 17
    straight = _fit(3, tmp_path / "straight", [], num_workers, limit=limit)
    every = ModelCheckpoint(tmp_path / "steps", every_n_train_steps=batches, save_top_k=-1)
    _fit(1, tmp_path / "stopped", [every], num_workers, limit=limit)
    steps: list[int] = []

    class Steps(Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            steps.append(trainer.global_step)

    last_step = tmp_path / "steps" / f"epoch=0-step={batches}.ckpt"
    resumed = _fit(3, tmp_path / "resumed", [Steps()], num_workers, ckpt_path=last_step, limit=limit)
    assert steps == [3 * batches]
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), name


@pytest.mark.parametrize(("stop", "limit"), [(22, None), (9, 6)])  # inside epoch 1 (17 or 6 batches an epoch)
def test_a_fit_counted_in_steps_resumes_with_the_unstopped_order(tmp_path: Path, stop: int, limit: int | None) -> None:
    """``max_steps`` stopping inside an epoch still runs its end hooks (``processed`` one ahead of ``completed``) and
    the resumed fit goes on with that epoch: its rest, and every later epoch, took the next epoch's order (Lightning
    hands ``processed`` to ``set_epoch``, after the resumed iterator is made)."""
    straight = _fit(10, tmp_path / "straight", [], 0, limit=limit, max_steps=45)
    checkpoint = ModelCheckpoint(tmp_path, filename="last", save_on_train_epoch_end=True)
    _fit(10, tmp_path / "stopped", [checkpoint], 0, limit=limit, max_steps=stop)
    resumed = _fit(10, tmp_path / "resumed", [], 0, ckpt_path=tmp_path / "last.ckpt", limit=limit, max_steps=45)
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), name


def test_a_fit_counted_in_steps_and_resumed_twice_keeps_the_unstopped_order(tmp_path: Path) -> None:
    """Under max_steps Lightning never sets ``completed`` to ``processed``, so the two are two apart by the second
    resume (from a checkpoint at epoch 2's end, step 51). With a validation batch: without one, Lightning resumes a
    fit counted in steps from an epoch's end with one more batch of that epoch (a plain DataLoader's too), which no
    batch order can match."""
    straight = _fit(10, tmp_path / "straight", [], 0, max_steps=60, val_batches=1)
    first, second = tmp_path / "first", tmp_path / "second"
    _fit(10, first, [ModelCheckpoint(first, filename="last", save_on_train_epoch_end=True)], 0, max_steps=22,
         val_batches=1)  # fmt: skip
    _fit(10, second, [ModelCheckpoint(second, filename="last", save_on_train_epoch_end=True)], 0,
         ckpt_path=first / "last.ckpt", max_steps=51, val_batches=1)  # fmt: skip
    resumed = _fit(10, tmp_path / "resumed", [], 0, ckpt_path=second / "last.ckpt", max_steps=60, val_batches=1)
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), name


def _fit_own_loader(epochs: int, root: Path, callbacks: list[Callback], ckpt_path: Path | None = None) -> MAP:
    """The README's recipe for a user's own loader, with a worker: ``EpochLoader`` with ``training_pass_epoch``."""
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    torch.manual_seed(0)
    module = MAP(MLP(64, 10, hidden=[16]))
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks, limit_val_batches=0,
    )  # fmt: skip
    loader = EpochLoader(data.train_set, batch_size=64, sampler=EpochShuffle(data.train_set, seed=3), num_workers=1,
                         epoch=lambda: training_pass_epoch(trainer))  # fmt: skip
    trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=False)
    return module


def test_an_own_epoch_loader_with_a_worker_resumes_at_an_epoch_boundary(tmp_path: Path) -> None:
    straight = _fit_own_loader(3, tmp_path / "straight", [])
    _fit_own_loader(1, tmp_path / "stopped", [ModelCheckpoint(tmp_path, save_last=True)])
    resumed = _fit_own_loader(3, tmp_path / "resumed", [], ckpt_path=tmp_path / "last.ckpt")
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), name


@pytest.mark.parametrize(
    "make",
    [
        lambda data: StatefulDataLoader(data, batch_size=4, shuffle=True),  # torchdata's sampler and generator
        lambda data: EpochLoader(data, batch_size=4, sampler=EpochShuffle(data, seed=2, epoch=3), epoch=lambda: None),
        lambda data: DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), 4, drop_last=True)),
    ],
)
def test_a_side_pass_gives_the_next_passs_batches_and_moves_nothing(make) -> None:
    data = TensorDataset(torch.arange(18))
    torch.manual_seed(0)
    loader = make(data)
    side = [batch[0].tolist() for batch in side_pass(loader)]
    torch.manual_seed(0)
    assert side == [batch[0].tolist() for batch in loader]  # the loader's own pass, after the side pass


def test_a_finished_pass_saves_the_next_epoch_and_nothing_yielded():
    sampler = EpochShuffle(range(5), seed=0)
    list(sampler)
    assert sampler.state_dict() == {"epoch": 1, "yielded": 0}
    fresh = EpochShuffle(range(5), seed=0)
    fresh.load_state_dict(sampler.state_dict())
    assert list(fresh) == list(EpochShuffle(range(5), seed=0, epoch=1))


def test_a_side_pass_keeps_drop_last_and_takes_the_given_epochs_order():
    data = TensorDataset(torch.arange(18))
    loader = EpochLoader(data, batch_size=4, sampler=EpochShuffle(data, seed=2), drop_last=True, epoch=lambda: None)
    assert len(list(side_pass(loader))) == 4  # 18 examples, batches of 4, the partial one dropped as in the fit
    order = list(EpochShuffle(data, seed=2, epoch=3))
    assert [batch[0].tolist() for batch in side_pass(loader, epoch=3)] == [order[i : i + 4] for i in range(0, 16, 4)]


def test_a_worker_state_saved_after_the_last_batch_counts_as_a_finished_pass():
    """Steps since the last worker snapshot count: 4 at the snapshot and 2 since make the 6 batches of the pass."""
    from lightning_bayes.datamodules.epoch_loader import _pass_finished

    assert _pass_finished({"_snapshot": {"_snapshot_step": 4}, "_steps_since_snapshot": 2}, 6)
    assert not _pass_finished({"_snapshot": {"_snapshot_step": 4}, "_steps_since_snapshot": 1}, 6)


@pytest.mark.parametrize("limit", [1.0, 0.55, 0.5, 0.0, 3, 30, 0])
def test_a_training_limit_counts_the_batches_as_lightning_does(limit: float) -> None:
    """``limited_batches`` (a sweep over "what a training epoch covers") against Lightning's own count; it rounded
    a fraction up (0.55 of 10: 6 batches against Lightning's 5) and swept one batch under a limit of 0."""
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage

    from lightning_bayes.datamodules.epoch_loader import limited_batches

    assert limited_batches(10, limit) == _parse_num_batches(RunningStage.TRAINING, 10, limit)
