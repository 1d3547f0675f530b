"""SWASubspace in a real Trainer with a plain LightningModule: the collected moments equal the closed-form
moments of the recorded iterates on the schedule, a run killed in the middle of collection and resumed from
its checkpoint ends bitwise equal to an uninterrupted one, and the swa()/sample() contexts write and restore."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.callbacks.swa_subspace import SWASubspace

pytestmark = pytest.mark.usefixtures("single_thread")


class Regression(LightningModule):
    """Any LightningModule: a float64 MLP (with BatchNorm) trained by SGD with momentum on a squared error."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Recorder(Callback):
    """The flat parameters after every optimiser step and at every epoch end."""

    def __init__(self) -> None:
        self.steps: dict[int, torch.Tensor] = {}
        self.epochs: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs[trainer.current_epoch] = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, dtype=torch.float64, generator=generator)
    y = torch.sin(x.sum(1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=4)  # 6 steps per epoch, fixed order


def fit(epochs: int, callbacks: list[Callback], root: Path | None = None, ckpt_path: str | None = None) -> Regression:
    module = Regression()
    Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=root is not None, default_root_dir=root, callbacks=callbacks,
    ).fit(module, loader(), ckpt_path=ckpt_path)
    return module


def closed_form(snapshots: list[torch.Tensor], max_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    thetas = torch.stack(snapshots)
    deviations = torch.stack([thetas[i] - thetas[: i + 1].mean(0) for i in range(len(thetas))])[-max_rank:]
    return thetas.mean(0), thetas.square().mean(0), deviations


def assert_moments_are_the_closed_form(swa: SWASubspace, snapshots: list[torch.Tensor], max_rank: int) -> None:
    """``swa``'s mean, second moment and deviation rows are those of ``snapshots`` (float64 rounding)."""
    mean, sq_mean, deviations = closed_form(snapshots, max_rank)
    torch.testing.assert_close(swa.moments.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(swa.moments.sq_mean, sq_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(swa.moments.deviation_rows(), deviations, rtol=0, atol=1e-12)


class BatchSnapshots(Callback):
    """The flat parameters after every training batch, in order."""

    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append(torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()]))


@pytest.mark.parametrize(
    ("schedule", "steps"),
    [({"start_epoch": 1, "every_n_steps": 2}, list(range(8, 19, 2))),  # after step 6 (one epoch), every 2nd step
     ({"start_epoch": 1, "every_n_steps": 5}, [11, 16]),
     ({"start_fraction": 0.5, "every_n_steps": 4}, [13, 17])],  # after step floor(0.5 * 18) = 9
)
def test_per_step_collection_equals_the_moments_of_the_scheduled_iterates(schedule: dict, steps: list[int]) -> None:
    swa, recorder = SWASubspace(params="all", max_rank=4, **schedule), Recorder()
    fit(3, [swa, recorder])
    snapshots = [recorder.steps[step] for step in steps]
    assert swa.moments.count.item() == len(steps) and swa.last_step == steps[-1]
    assert_moments_are_the_closed_form(swa, snapshots, 4)
    assert swa.moments.mean.dtype == torch.float64 and swa.moments.mean.device.type == "cpu"


@pytest.mark.parametrize(("precision", "dtype"), [("64-true", torch.float64), ("bf16-true", torch.float32)])
def test_the_moments_of_a_float32_module_follow_the_precisions_cast(precision: str, dtype: torch.dtype) -> None:
    """The callback's set-up runs before Lightning casts the module: under 64-true the moments were float32; under
    bf16-true they stay float32 (never narrower)."""
    swa, module = SWASubspace(params="all", start_epoch=1), Regression().float()
    Trainer(max_epochs=2, precision=precision, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, callbacks=[swa]).fit(module, loader())
    assert swa.moments.mean.dtype == dtype
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    assert torch.equal(swa.moments.mean, flat.to(dtype))


@pytest.mark.parametrize(
    ("schedule", "epochs"),
    [({"start_fraction": 0.5}, [3, 4, 5]), ({}, [3, 4, 5]),  # the default: the second half of the run
     ({"start_fraction": 0.25}, [1, 2, 3, 4, 5]), ({"start_epoch": 1, "every_n_epochs": 3}, [1, 4])],
)
def test_per_epoch_collection_of_the_last_layer_on_the_schedule(schedule: dict, epochs: list[int]) -> None:
    swa, recorder = SWASubspace(params="last_layer", **schedule), Recorder()
    module = fit(6, [swa, recorder])
    assert swa.names == ["net.3.weight", "net.3.bias"] and swa.moments.count.item() == len(epochs)
    last = slice(sum(p.numel() for p in module.parameters()) - 6, None)  # 5 weights and 1 bias, registered last
    assert_moments_are_the_closed_form(swa, [recorder.epochs[e][last] for e in epochs], 20)


def test_kill_and_resume_in_the_middle_of_collection_reproduces_the_uninterrupted_state(tmp_path: Path) -> None:
    def callback() -> SWASubspace:
        return SWASubspace(params="all", start_epoch=1, every_n_steps=2, max_rank=3)

    straight = callback()
    straight_module = fit(4, [straight])
    first = callback()
    fit(2, [first, ModelCheckpoint(dirpath=tmp_path, save_last=True)], root=tmp_path)  # killed after epoch 2
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved = checkpoint["callbacks"][first.state_key]
    assert saved["moments"]["count"].item() == 3 and saved["names"] == straight.names
    checkpoint["callbacks"] = {"SWASubspace": saved}  # as an earlier version keyed it: the only collector takes it
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    for path in ("last.ckpt", "earlier.ckpt"):
        resumed = callback()
        resumed_module = fit(4, [resumed], ckpt_path=str(tmp_path / path))
        assert resumed.moments.count.item() == 9
        for name, value in straight.state_dict()["moments"].items():
            assert torch.equal(value, resumed.state_dict()["moments"][name]), name
        assert resumed.last_step == straight.last_step
    for a, b in zip(straight_module.parameters(), resumed_module.parameters()):
        assert torch.equal(a, b)


class LearningRates(Callback):
    """The optimiser's learning rate at each epoch's first step."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.setdefault(trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"])


def test_the_reference_learning_rate_schedule_is_applied_and_resumes(tmp_path: Path) -> None:
    """``swa_lr_ratio`` r = 0.2 from lr 0.05 with collection from epoch 10: the factor is 1 for epoch / 10 <= 0.5,
    falls linearly to r at 0.9 (epochs 6 to 9: 0.8, 0.6, 0.4, 0.2) and stays r; a fit stopped after epoch 7 and
    resumed sets the same rates and ends with the same moments and weights."""

    def callback() -> SWASubspace:
        return SWASubspace(params="all", start_epoch=10, max_rank=2, swa_lr_ratio=0.2)

    straight, rates = callback(), LearningRates()
    straight_module = fit(12, [straight, rates])
    expected = [0.05] * 6 + [0.04, 0.03, 0.02, 0.01, 0.01, 0.01]
    assert [rates.rates[e] for e in range(12)] == pytest.approx(expected, rel=1e-12)
    assert straight.moments.count.item() == 2
    fit(8, [callback(), ModelCheckpoint(dirpath=tmp_path, save_last=True)], root=tmp_path)
    resumed, resumed_rates = callback(), LearningRates()
    resumed_module = fit(12, [resumed, resumed_rates], ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed_rates.rates == {e: rates.rates[e] for e in range(8, 12)}
    for name, value in straight.state_dict()["moments"].items():
        assert torch.equal(value, resumed.state_dict()["moments"][name]), name
    for a, b in zip(straight_module.parameters(), resumed_module.parameters()):
        assert torch.equal(a, b)


def test_the_learning_rate_schedule_refuses_a_second_scheduler() -> None:
    class Scheduled(Regression):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}

    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      callbacks=[SWASubspace(start_epoch=1, swa_lr_ratio=0.5)])
    with pytest.raises(ValueError, match=r"sets the learning rate itself, but the module also has a learning-rate "
                       r"scheduler \(StepLR\): remove one of them"):
        trainer.fit(Scheduled(), loader())


def test_swa_and_sample_contexts_write_the_selected_parameters_and_restore_everything() -> None:
    swa = SWASubspace(params="all", start_epoch=0, every_n_steps=1, max_rank=5)
    module = fit(2, [swa])
    before = {n: t.clone() for n, t in module.state_dict().items()}
    batches = list(loader())
    with swa.swa(module, batches):
        flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        assert torch.equal(flat, swa.moments.mean)
        assert not torch.equal(module.net[1].running_mean, before["net.1.running_mean"])  # refreshed
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name
    expected = swa.moments.sample(0.5, generator=torch.Generator().manual_seed(3))
    with swa.sample(module, scale=0.5, generator=torch.Generator().manual_seed(3)):
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in module.parameters()]), expected)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_checkpoint_of_another_selection_is_refused(tmp_path: Path) -> None:
    fit(1, [SWASubspace(params="all", start_epoch=0), ModelCheckpoint(dirpath=tmp_path, save_last=True)], root=tmp_path)
    with pytest.raises(ValueError, match=r"covers 6 tensors; this callback selects 2 \(params='last_layer'\): "
                       "expected the same selection"):
        fit(2, [SWASubspace(params="last_layer", start_epoch=0)], ckpt_path=str(tmp_path / "last.ckpt"))
    with pytest.raises(ValueError, match="keeps max_rank=20 deviations; this callback has max_rank=3: expected the "
                       "same"):  # the same selection: only the rank named
        fit(2, [SWASubspace(params="all", start_epoch=0, max_rank=3)], ckpt_path=str(tmp_path / "last.ckpt"))


def test_a_start_after_the_last_epoch_is_said_before_training_and_an_absent_device_is_named() -> None:
    """Both were found only after the whole fit (or in torch's words: "Found no NVIDIA driver")."""
    message = ("SWASubspace collects from epoch 2 on (start_epoch), but the Trainer stops after max_epochs=2: this fit "
               "collects no snapshot (lower start_epoch or raise max_epochs)")
    said_at_the_first_step: list[bool] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class FirstStep(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if trainer.global_step == 0:
                    said_at_the_first_step.append(any(str(w.message) == message for w in caught))

        fit(2, [FirstStep(), SWASubspace(params="all", start_epoch=2)])
    assert said_at_the_first_step == [True]
    with pytest.raises(ValueError, match=r"^SWASubspace\(device='cuda:97'\): that device is not available here"):
        fit(1, [SWASubspace(params="all", start_epoch=0, device="cuda:97")])


def test_contexts_before_any_snapshot_are_an_error_and_the_fit_says_why() -> None:
    swa = SWASubspace(params="all", start_epoch=5)
    with pytest.warns(UserWarning, match=r"^SWASubspace collected no snapshot: training ended after 1 epochs, and the "
                      r"first is taken at the end of epoch 5 \(0-based\) \(start_epoch=5, start_fraction=None\)"):
        module = fit(1, [swa])
    with pytest.raises(ValueError, match="collected no snapshot yet"), swa.swa(module):
        pass
    steps = SWASubspace(params="all", start_fraction=0.5, every_n_steps=10)  # after step floor(0.5 * 12) = 6
    with pytest.warns(UserWarning, match=r"training ended at step 12, and the first is taken after step 6 "):
        fit(2, [steps])


def test_one_snapshot_with_a_low_rank_part_is_refused_and_swag_diag_draws_at_scale_one() -> None:
    swa = SWASubspace(params="all", start_epoch=0, max_rank=20)
    module = fit(1, [swa])
    assert int(swa.moments.count) == 1
    refused = pytest.raises(ValueError, match=r"needs at least 2 snapshots; the run collected 1 .* max_rank=0 \(diag")
    with refused, swa.sample(module):
        pass
    with swa.sample(module, scale=0.0):  # SWA: the mean, which one snapshot gives
        torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in module.parameters()]), swa.moments.mean)
    diagonal = SWASubspace(params="all", start_epoch=0, max_rank=0)
    module = fit(3, [diagonal])
    with pytest.warns(UserWarning, match="SWASubspace: without batches the BatchNorm layers keep the statistics of "
                      "the last training iterate"), diagonal.sample(module, generator=torch.Generator().manual_seed(3)):
        pass
    norm = module.net[1]
    kept = norm.running_mean, norm.running_var
    norm.track_running_stats, norm.running_mean, norm.running_var = False, None, None  # batch statistics: none kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with diagonal.sample(module, generator=torch.Generator().manual_seed(3)):
            pass
    norm.track_running_stats, (norm.running_mean, norm.running_var) = True, kept
    with diagonal.sample(module, generator=torch.Generator().manual_seed(3)):  # SWAG-diag: s = 1 by default
        drawn = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    expected = diagonal.moments.sample(1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)


def test_start_fraction_per_step_on_an_unbounded_fit_is_named() -> None:
    swa = SWASubspace(params="all", start_fraction=0.5, every_n_steps=2)
    with pytest.raises(ValueError, match=r"start_fraction=0.5\) with every_n_steps needs a bounded fit"):
        Trainer(max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, callbacks=[swa], max_time={"seconds": 30}).fit(Regression(), loader())


def test_two_collectors_share_a_trainer_and_each_resumes_its_own_moments(tmp_path: Path) -> None:
    """SWA of the last layer every epoch and SWAG of all weights every second step in one Trainer (refused by
    Lightning as two callbacks of one state key): each collects what it would alone, and a fit stopped after epoch 2
    resumes both."""

    def callbacks() -> list[SWASubspace]:
        return [SWASubspace(params="net.3.*", start_epoch=1, max_rank=0),
                SWASubspace(params="all", start_epoch=1, every_n_steps=2, max_rank=3)]

    alone = [callbacks()[i] for i in range(2)]
    for callback in alone:
        fit(4, [callback])
    together = callbacks()
    fit(4, together)
    fit(2, [*callbacks(), ModelCheckpoint(dirpath=tmp_path, save_last=True)], root=tmp_path)
    resumed = callbacks()
    fit(4, resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    for single, joint, restarted in zip(alone, together, resumed):
        assert single.moments.count.item() in (3, 9)
        for name, value in single.state_dict()["moments"].items():
            assert torch.equal(joint.state_dict()["moments"][name], value), name
            assert torch.equal(restarted.state_dict()["moments"][name], value), name


def test_a_start_fraction_under_manual_optimisation_bounded_by_max_steps_is_refused_before_training() -> None:
    """Manual optimisation with two optimisers counts two steps a batch in max_steps, one in the schedule: the
    second half of max_steps=40 (batch 10 of 20) was read as batch 20, and nothing was collected."""
    module = TwoOptimisers()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"counts training batches under manual optimisation, but max_steps=40 counts "
                       r"every optimiser's step\(\) \(2 optimisers here, .*give start_epoch, or bound the fit by "
                       r"max_epochs"):
        Trainer(max_steps=40, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False,
                callbacks=[SWASubspace(start_fraction=0.5, every_n_steps=2)]).fit(module, loader())
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), before))


def test_the_learning_rate_schedule_without_max_epochs_is_named() -> None:
    """Per-step collection bounded by max_steps: the epoch schedule of ``swa_lr_ratio`` has no end to take a
    fraction of (the message spoke of per-epoch collection)."""
    with pytest.raises(ValueError, match=r"swa_lr_ratio=0.5\) schedules the learning rate by epoch, .* max_epochs=-1: "
                       r"give start_epoch or a finite max_epochs"):
        Trainer(max_steps=30, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False,
                callbacks=[SWASubspace(every_n_steps=2, swa_lr_ratio=0.5)]).fit(Regression(), loader())


def test_start_fraction_per_epoch_without_max_epochs_is_refused_before_training() -> None:
    """Trainer(max_steps=...) leaves max_epochs unset: refused at setup (the module untrained), naming the ways out."""
    module = Regression()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"needs a finite trainer max_epochs; got -1 \(or give start_epoch, or collect "
                       r"every_n_steps"):
        Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, callbacks=[SWASubspace()]).fit(module, loader())
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_one_instance_collects_for_one_module(tmp_path: Path) -> None:
    """A second fit of the same module collects on; another module (a loop over seeds reusing the callback) starts
    afresh with a warning instead of averaging two networks' iterates; another module object resumed in the same
    process from a checkpoint takes the checkpoint's moments (Lightning sets callbacks up before it restores them)."""
    swa = SWASubspace(params="all", start_epoch=1)
    module = Regression()

    def fit_again(model: Regression, epochs: int, root: Path | None = None, **kwargs) -> None:
        callbacks: list[Callback] = [swa] if root is None else [swa, ModelCheckpoint(dirpath=root, save_last=True)]
        Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=root is not None, default_root_dir=root,
                callbacks=callbacks).fit(model, loader(), **kwargs)

    fit_again(module, 2, root=tmp_path)
    saved = {name: value.clone() for name, value in swa.moments.state_dict().items()}
    fit_again(module, 3)  # the same module: epochs 1 and 2 of the new Trainer
    assert int(swa.moments.count) == 3
    with pytest.warns(UserWarning, match="SWASubspace: this Regression is not the module its 3 snapshots came from; "
                      "they are dropped and this fit collects afresh"):
        fit_again(Regression(), 2)
    assert int(swa.moments.count) == 1  # its own epoch 1 alone
    with pytest.warns(UserWarning, match="is not the module its 1 snapshots came from"):
        fit_again(Regression(), 2, ckpt_path=str(tmp_path / "last.ckpt"))  # resumed at its end: nothing collected
    for name, value in saved.items():
        assert torch.equal(swa.moments.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_epoch": 1, "start_fraction": 0.5}, "give start_epoch or start_fraction, not both"),
        ({"every_n_epochs": 1, "every_n_steps": 10}, "give every_n_epochs or every_n_steps, not both"),
        ({"start_fraction": 1.0}, r"start_fraction must be a number in \[0, 1\)"),
        ({"start_epoch": -1}, "start_epoch must be an int >= 0"),
        ({"every_n_steps": 0}, "every_n_steps must be a positive int"),
        ({"max_rank": -2}, "max_rank must be an int >= 0"),
        ({"device": "gpu"}, r"device must be a device name such as 'cpu' or 'cuda:0', or None; got 'gpu'"),
        ({"device": 0}, r"device must be a device name .*; got 0"),
        ({"swa_lr_ratio": 0}, r"swa_lr_ratio must be None or a number in \(0, 1\]; got 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SWASubspace(**kwargs)


def test_a_selector_matching_nothing_is_named() -> None:
    with pytest.raises(ValueError, match="matched no parameter"):
        fit(1, [SWASubspace(params="nothing*")])


class TwoOptimisers(Regression):
    """Manual optimisation with two optimisers (as BLoB): Lightning's global_step counts both steps, two a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.manual_backward(loss)
        first.step()
        second.step()
        first.zero_grad()
        second.zero_grad()

    def configure_optimizers(self):
        parameters = list(self.parameters())
        return torch.optim.SGD(parameters[:-2], lr=0.05), torch.optim.SGD(parameters[-2:], lr=0.05)


def test_per_step_collection_counts_batches_under_manual_optimisation_with_two_optimisers() -> None:
    """The schedule counted global_step (12 after 6 batches), so collection began in epoch 0, before start_epoch=1,
    and took a snapshot every batch instead of every second."""
    batches_seen = BatchSnapshots()
    swa = SWASubspace(params="all", max_rank=4, start_epoch=1, every_n_steps=2)
    module = TwoOptimisers()
    Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, callbacks=[swa, batches_seen]).fit(module, loader())
    batches = list(range(8, 19, 2))  # after batch 6 (one epoch), every 2nd batch, as with one optimiser
    assert swa.moments.count.item() == len(batches) and swa.last_step == batches[-1]
    assert_moments_are_the_closed_form(swa, [batches_seen.snapshots[b - 1] for b in batches], 4)


def test_a_new_trainer_fitting_the_same_module_again_collects_at_its_own_steps() -> None:
    """A new Trainer counts steps from 0 again: the second fit's epoch-end snapshot fell on the step number of the
    first fit's last one and was skipped as a repeat (one snapshot from two fits)."""
    swa, recorder, module = SWASubspace(params="all", max_rank=2, start_epoch=0), Recorder(), Regression()
    snapshots = []
    for _ in range(2):
        Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, callbacks=[swa, recorder]).fit(module, loader())
        snapshots.append(recorder.epochs[0])
    assert swa.moments.count.item() == 2
    assert_moments_are_the_closed_form(swa, snapshots, 2)


class AccumulatingByHand(Regression):
    """Manual optimisation with one optimiser stepped every second batch (after batches ``phase + 1``,
    ``phase + 3``, ... counted from 1), gradients accumulated in between."""

    def __init__(self, phase: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.phase = phase

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(F.mse_loss(self(x), y) / 2)
        if batch_idx % 2 == self.phase:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize(
    ("phase", "every_n_steps", "batches"),
    [(1, 1, [2, 4, 6, 8, 10, 12]), (0, 1, [1, 3, 5, 7, 9, 11]), (0, 2, [2, 4, 6, 8, 10, 12])],
)
def test_manual_optimisation_stepping_every_second_batch_collects_no_weights_twice(
    phase: int, every_n_steps: int, batches: list[int]
) -> None:
    """Steps count batches under manual optimisation; a batch that stepped no optimiser left the last snapshot's (or
    the initial) weights, which were collected again (12 snapshots of 6 distinct weights, the initial among them)."""
    batches_seen = BatchSnapshots()
    swa = SWASubspace(params="all", max_rank=3, start_epoch=0, every_n_steps=every_n_steps)
    Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, callbacks=[swa, batches_seen]).fit(AccumulatingByHand(phase), loader())
    assert swa.moments.count.item() == len(batches) and swa.last_step == batches[-1]
    assert_moments_are_the_closed_form(swa, [batches_seen.snapshots[b - 1] for b in batches], 3)


def test_a_start_fraction_of_max_steps_under_manual_optimisation_with_one_optimiser_is_refused() -> None:
    """max_steps=6 counts the hand-accumulating module's step() calls (12 batches), the schedule batches: collection
    began at batch 3, a quarter of the run, not half; bounded by max_epochs it is the batches' fraction."""
    with pytest.raises(ValueError, match=r"but max_steps=6 counts every optimiser's step\(\) \(1 optimiser here, "
                       r"which the module may step less often than once a batch\)"):
        Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False,
                callbacks=[SWASubspace(start_fraction=0.5, every_n_steps=1)]).fit(AccumulatingByHand(1), loader())
    swa = SWASubspace(params="all", start_fraction=0.5, every_n_steps=2)
    Trainer(max_epochs=2, max_steps=100, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
            callbacks=[swa]).fit(AccumulatingByHand(1), loader())
    assert swa.moments.count.item() == 3 and swa.last_step == 12  # batches 8, 10 and 12 of 12


@pytest.mark.parametrize("step", [6, 12])
def test_a_fit_resumed_on_an_epochs_last_batch_ends_as_one_not_stopped(tmp_path: Path, step: int) -> None:
    """Lightning resumes a checkpoint written on an epoch's last batch without that epoch's on_train_epoch_end or
    the next one's on_train_epoch_start: from step 6 the learning rate of epoch 1 (``swa_lr_ratio``) was never set,
    from step 12 epoch 1's snapshot was never taken (2 snapshots, not 3)."""

    def run(ckpt_path: str | None = None) -> tuple[Regression, SWASubspace]:
        swa = SWASubspace(params="all", start_epoch=1, max_rank=2, swa_lr_ratio=0.5)
        saving = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")]
        module = Regression()
        Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[swa, *([] if ckpt_path else saving)],
                enable_checkpointing=ckpt_path is None).fit(module, loader(), ckpt_path=ckpt_path)
        return module, swa

    straight, collected = run()
    resumed, recollected = run(str(tmp_path / f"step={step}.ckpt"))
    assert collected.moments.count.item() == recollected.moments.count.item() == 3
    for name, value in collected.state_dict()["moments"].items():
        assert torch.equal(recollected.state_dict()["moments"][name], value), name
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_checkpoints_moments_serve_a_test_run(tmp_path: Path) -> None:
    """``trainer.test(ckpt_path=...)`` restores callbacks after ``setup('test')``: the moments were kept for a fit
    that never came ("collected no snapshot yet")."""
    fitted = SWASubspace(params="all", start_epoch=0)
    fit(3, [fitted, ModelCheckpoint(dirpath=tmp_path, save_last=True)], root=tmp_path)
    restored = SWASubspace(params="all", start_epoch=0)

    class Tested(Regression):
        def test_step(self, batch, batch_idx):
            return None

    module = Tested()
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, callbacks=[restored]).test(module, loader(), ckpt_path=str(tmp_path / "last.ckpt"), weights_only=False)
    assert restored.moments.count.item() == 3
    torch.testing.assert_close(restored.moments.mean, fitted.moments.mean, rtol=0, atol=0)
    with restored.swa(module):
        flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(flat, fitted.moments.mean, rtol=0, atol=0)


def test_start_epoch_per_step_counts_optimiser_steps_under_gradient_accumulation() -> None:
    """4 batches an epoch accumulated 2 at a time are 2 steps an epoch: start_epoch=1 starts after step 2, so a
    2-epoch fit collects after steps 3 and 4."""
    swa = SWASubspace(params="all", max_rank=4, start_epoch=1, every_n_steps=1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, dtype=torch.float64, generator=generator)
    data = DataLoader(TensorDataset(x, torch.sin(x.sum(1, keepdim=True))), batch_size=4)  # 4 batches
    Trainer(
        max_epochs=2, accumulate_grad_batches=2, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[swa],
    ).fit(Regression(), data)
    assert swa.moments.count.item() == 2 and swa.last_step == 4
