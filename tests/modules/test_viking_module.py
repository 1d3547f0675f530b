"""VIKING through the Trainer: phases, carried noise (gamma = 0 and 1), exact resumption, the ELBO on a
2-D two-class problem (predictive spread off the data), and clear errors. Float64 tanh MLPs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_bayes.datamodules import DigitsDataModule
from lightning_bayes.inference import linalg
from lightning_bayes.inference.kernel_projection import DenseSystem, project
from lightning_bayes.inference.linalg import compiled_per_example_jacobian, output_constraint
from lightning_bayes.inference.viking import image_dimension
from lightning_bayes.models import MLP
from lightning_bayes.modules.viking import VIKING

from linearisation import first_order_outputs
from once_differentiable_square import Square
from resumption import STOPS, SavesInsideAnEpoch, assert_resumption_is_exact

pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed: int = 0, hidden: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2)).double()


def two_blobs(count: int = 32, seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(count) % 2
    x = torch.randn(count, 2, generator=generator, dtype=torch.float64) * 0.4 + (2.0 * y[:, None] - 1.0)
    return TensorDataset(x, y)


def loader(batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(two_blobs(**kwargs), batch_size=batch_size, shuffle=False)


def assert_in_kernel(jacobian: torch.Tensor, vectors: torch.Tensor, tolerance: float = 1e-10) -> None:
    """``vectors`` are fixed by the batch's kernel projector (eigenvalues of ``J J^T`` under ``rtol = 1e-5`` of
    the largest count as zero), so ``||J v|| <= sqrt(rtol) sigma_max(J) ||v||``; ``tolerance`` is the rounding
    of the dtype the vectors were computed in (float64: 1e-10, float32: 1e-6)."""
    vectors = vectors.reshape(-1, jacobian.shape[1])
    reprojected, _ = project(DenseSystem(jacobian), vectors)
    assert (reprojected - vectors).norm() <= tolerance * vectors.norm()
    sigma_max = torch.linalg.matrix_norm(jacobian, ord=2)
    assert (vectors @ jacobian.T).norm() <= math.sqrt(1e-5) * sigma_max * vectors.norm() * 1.0001


def make_trainer(epochs: int, root: Path | None = None, callbacks: list | None = None, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=root is not None, default_root_dir=root, callbacks=callbacks or [],
        num_sanity_val_steps=0, **kwargs,
    )


def make_module(**kwargs) -> VIKING:
    defaults = {"phase_epochs": (1, 1, 1), "num_samples": 4, "optimizer": lambda p: torch.optim.Adam(p, lr=1e-2)}
    return VIKING(make_model(), **{**defaults, **kwargs})


class Recorder(Callback):
    """Keeps, per step, the batch, theta_hat before the step and the carried vector after it."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.steps.append({"epoch": trainer.current_epoch, "batch": batch, "theta": module.function.theta().clone()})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["carried"] = module.carried.clone()


def test_phases_train_the_right_parameters() -> None:
    module = make_module(phase_epochs=(1, 1, 1))
    grads: dict[int, tuple[bool, bool]] = {}

    class Grads(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            backbone = any(p.grad is not None and p.grad.abs().sum() > 0 for p in pl_module.backbone.parameters())
            family = pl_module.family.log_alpha.grad is not None and pl_module.family.log_sigma_image.grad is not None
            grads.setdefault(pl_module.phase(), (backbone, family))

    make_trainer(3, callbacks=[Grads()]).fit(module, train_dataloaders=loader())
    assert grads == {1: (True, False), 2: (False, True), 3: (True, True)}
    assert [module.phase(e) for e in range(4)] == [1, 2, 3, 3]


def test_gamma_zero_projects_fresh_noise_onto_each_batch_kernel() -> None:
    module, recorder = make_module(gamma=0.0, phase_epochs=(0, 0, 2)), Recorder()
    make_trainer(2, callbacks=[recorder]).fit(module, train_dataloaders=loader())
    for step in recorder.steps:
        x, y = step["batch"]
        jacobian = module.function.jacobian(x, y, step["theta"])
        assert_in_kernel(jacobian, step["carried"])
    carried = torch.stack([s["carried"] for s in recorder.steps])
    assert (carried[1:] - carried[:-1]).norm(dim=1).min() > 0.1  # a fresh draw every step


def test_gamma_one_keeps_the_epoch_split_fixed_and_passes_no_gradient_through_it() -> None:
    module, recorder = make_module(gamma=1.0, phase_epochs=(0, 0, 2)), Recorder()
    make_trainer(2, callbacks=[recorder]).fit(module, train_dataloaders=loader())
    for epoch in (0, 1):
        carried = [s["carried"] for s in recorder.steps if s["epoch"] == epoch]
        assert all(torch.equal(c, carried[0]) for c in carried)
    assert not torch.equal(recorder.steps[0]["carried"], recorder.steps[-1]["carried"])  # re-drawn per epoch
    assert not module.carried.requires_grad and not module.epoch_noise.requires_grad


def test_epoch_sweep_ends_in_the_kernel_of_the_last_batch() -> None:
    # one sweep is one round of alternating projections; the sample ends in the kernel of the last batch
    module = make_module(phase_epochs=(0, 0, 1))
    data = loader()
    module.sweep(data)
    x, y = data.dataset.tensors
    last = module.function.jacobian(x[-8:], y[-8:])
    assert_in_kernel(last, module.sample_kernel)
    assert_in_kernel(last, module.carried)
    # the carried vector and the predictive's samples come from independent draws
    assert all(not torch.equal(module.epoch_noise, row) for row in module.sample_noise)
    assert all(not torch.equal(module.carried, row) for row in module.sample_kernel)
    assert torch.equal(module.swept_at, module._fingerprint())


@pytest.mark.parametrize("stop", STOPS)
def test_resume_restores_the_carried_noise_and_continues_exactly(tmp_path: Path, stop: str) -> None:
    def run(epochs: int, root: Path, ckpt: str | None, callbacks: list[Callback]) -> VIKING:
        module = make_module(phase_epochs=(1, 1, 2))
        trainer = make_trainer(epochs, root=root, callbacks=callbacks)
        trainer.fit(module, train_dataloaders=StatefulDataLoader(two_blobs(), batch_size=8), ckpt_path=ckpt)
        return module

    assert_resumption_is_exact(run, tmp_path, epochs=4, stop=stop)


def test_elbo_decreases_and_predictive_spreads_off_the_data() -> None:
    torch.manual_seed(0)
    module = VIKING(
        make_model(hidden=16), phase_epochs=(2, 2, 10), num_samples=30, kl_weight="elbo",
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), log_alpha=2.0,
    )
    losses: list[tuple[int, float]] = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append((pl_module.phase(), float(outputs["loss"])))

    data = loader(batch_size=16, count=64)
    make_trainer(14, callbacks=[Losses()]).fit(module, train_dataloaders=data)
    elbo = [loss for phase, loss in losses if phase == 3]
    window = len(elbo) // 4
    assert sum(elbo[-window:]) / window < sum(elbo[:window]) / window
    module.sweep(data)
    x_train = data.dataset.tensors[0]
    far = torch.tensor([[0.0, 6.0], [6.0, -6.0], [-6.0, 0.0], [0.0, -6.0]], dtype=torch.float64)
    spread_on = module.predictive(x_train).mutual_information.mean()
    spread_off = module.predictive(far).mutual_information.mean()
    assert spread_off > 2 * spread_on


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"constraint": "logits"}, "constraint"), ({"phase_epochs": (1, 1)}, "phase_epochs"), ({"gamma": 2.0}, "gamma"),
     ({"kl_weight": "half"}, "kl_weight"), ({"solver": "lsmr"}, "solver"), ({"iterations": 0}, "iterations"),
     ({"predictive": "mean"}, "predictive"), ({"compile_jacobian": 1}, "compile_jacobian"),
     ({"kl_weight": True}, "kl_weight"), ({"kl_weight": math.inf}, "kl_weight"), ({"gamma": "0.5"}, "gamma"),
     ({"iterations": True}, "iterations"), ({"phase_epochs": (True, 0, 1)}, "phase_epochs"),
     ({"scale_lr": math.inf}, "scale_lr"), ({"sweep_every_n_epochs": True}, "sweep_every_n_epochs")],
)
def test_bad_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make_module(**kwargs)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_jacobian_trains_as_the_eager_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile_jacobian=True``: the eager fit (MLE, scale warm-up, ELBO epochs with their sweeps and per-step
    differentiable projections) to float64 rounding: parameters, scales, carried noise and projected samples."""
    calls = {True: 0, False: 0}  # compiled Jacobians by gradient mode: the steps' (with graph) and the sweeps'

    def counted(*args):
        calls[torch.is_grad_enabled()] += 1
        return compiled_per_example_jacobian(*args)

    monkeypatch.setattr(linalg, "compiled_per_example_jacobian", counted)
    modules = {  # sigma_im != sigma_ker from the start: the sample, and so the loss, depend on the projection
        compiled: make_module(compile_jacobian=compiled, gamma=0.3, log_sigma_image=-3.0) for compiled in (False, True)
    }
    for module in modules.values():
        make_trainer(4).fit(module, train_dataloaders=loader())
    # 4 batches an epoch: the sweeps of epochs 1-3 and the warm-up's steps without J_b's graph, the ELBO's steps with
    # it (the first step's check that the network has second derivatives takes them by plain autograd)
    assert calls == {True: 2 * 4, False: 3 * 4 + 4}
    eager, compiled = modules[False].state_dict(), modules[True].state_dict()
    assert not torch.equal(eager["carried"], torch.zeros_like(eager["carried"]))
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-9, atol=1e-12, msg=name)


def test_too_many_predictive_samples_are_refused() -> None:
    module = make_module()
    with pytest.raises(ValueError, match="num_samples"):
        module.predictive(torch.zeros(1, 2, dtype=torch.float64), num_samples=5)
    assert math.isfinite(float(module.predictive(torch.zeros(1, 2, dtype=torch.float64)).probs.sum()))


@pytest.mark.parametrize("params", ["all", "last_layer"])
def test_a_timm_backbone_with_batchnorm_trains_and_samples_in_the_kernel(params: str) -> None:
    from lightning_bayes.models import timm_backbone

    torch.manual_seed(0)
    backbone = timm_backbone("test_resnet", num_classes=3)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(12, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    data = DataLoader(TensorDataset(images, labels), batch_size=4)
    module = VIKING(backbone, params=params, phase_epochs=(1, 0, 1), num_samples=2, gamma=0.0)
    recorder = Recorder()
    make_trainer(2, callbacks=[recorder]).fit(module, train_dataloaders=data)
    x, y = recorder.steps[-1]["batch"]
    jacobian = module.function.jacobian(x, y, recorder.steps[-1]["theta"]).double()
    assert_in_kernel(jacobian, recorder.steps[-1]["carried"].double(), tolerance=1e-6)  # a float32 network
    assert module.function.size < sum(p.numel() for p in backbone.parameters()) or params == "all"
    assert torch.isfinite(module.predictive(images[:2]).probs).all()


def test_warm_start_from_a_trained_checkpoint(tmp_path: Path) -> None:
    trained = make_model(seed=3)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "map.ckpt")
    module = VIKING(make_model(seed=4), checkpoint=str(tmp_path / "*.ckpt"))
    for name, value in trained.state_dict().items():
        assert torch.equal(module.backbone.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        VIKING(make_model(), checkpoint=str(tmp_path / "missing.ckpt"))


def test_sweeps_follow_sweep_every_n_epochs() -> None:
    sweeps: list[int] = []

    class CountingVIKING(VIKING):
        def sweep(self, batches, max_batches=None) -> None:
            sweeps.append(self.current_epoch)
            super().sweep(batches, max_batches)

    module = CountingVIKING(make_model(), phase_epochs=(1, 1, 5), num_samples=2, sweep_every_n_epochs=3)
    make_trainer(7).fit(module, train_dataloaders=loader())
    assert sweeps == [1, 4]  # counted from the first noisy epoch (the scale warm-up's)
    sweeps.clear()
    module = CountingVIKING(make_model(), phase_epochs=(0, 0, 2), num_samples=2, sweep_every_n_epochs=0)
    make_trainer(2).fit(module, train_dataloaders=loader())
    assert sweeps == [] and module.carried.norm() > 0
    with pytest.raises(ValueError, match="sweep_every_n_epochs"):
        make_module(gamma=1.0, sweep_every_n_epochs=0)


@pytest.mark.parametrize("kl_weight", ["elbo", 0.5])
def test_the_training_loss_is_the_batch_elbo_at_the_steps_draw(kl_weight) -> None:
    # loss = mean_b NLL_b + beta KL / B at theta = theta_hat + sigma_ker k + sigma_im (e - k), with e, k the epoch's
    # (gamma = 1), beta = B / N ("elbo") or the given number; the logged kernel and image dimensions add up to P
    expected: list[float] = []

    class Check(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            x, y = batch
            theta_hat, e, k = module.function.theta(), module.epoch_noise, module.carried
            theta = theta_hat + module.family.sigma_kernel * k + module.family.sigma_image * (e - k)
            image_dim = image_dimension(e[None], k[None])[0]
            beta = len(y) / 32 if kl_weight == "elbo" else kl_weight
            with torch.no_grad():
                nll = F.cross_entropy(module.function.outputs(theta, x), y)
                expected.append(float(nll + beta * module.family.kl(theta_hat, image_dim) / len(y)))
            self.image_dim = float(image_dim)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            assert float(outputs["loss"]) == pytest.approx(expected[-1], rel=1e-12)
            logged = trainer.callback_metrics
            assert float(logged["train/image_dim"]) == pytest.approx(self.image_dim, rel=1e-12)
            assert float(logged["train/kernel_dim"] + logged["train/image_dim"]) == pytest.approx(module.function.size)

    module = make_module(gamma=1.0, phase_epochs=(0, 0, 2), kl_weight=kl_weight)
    make_trainer(2, callbacks=[Check()], log_every_n_steps=1).fit(module, train_dataloaders=loader())  # terms each step
    assert len(expected) == 8


def test_the_linearised_predictive_is_the_first_order_expansion_at_theta_hat() -> None:
    module = make_module(predictive="linearized")
    data = loader()
    module.sweep(data)
    x = data.dataset.tensors[0][:5]
    theta_hat, thetas = module.function.theta(), module.samples()
    expected = first_order_outputs(module.function, x, theta_hat, thetas - theta_hat)
    torch.testing.assert_close(module.predictive(x).logits, expected, rtol=1e-10, atol=1e-12)


def test_validation_logs_the_first_samples_kernel_residual() -> None:
    # ||J k_1|| / ||k_1|| on the validation data: k_1 lies in the kernel of the sweep's last batch, not of all 32
    module, data = make_module(), loader()
    module.sweep(data)
    x, y = data.dataset.tensors
    trainer = make_trainer(1)
    trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=32), verbose=False)
    k = module.sample_kernel[0]
    expected = float((module.function.jacobian(x, y) @ k).norm() / k.norm())
    assert expected > 1e-6
    assert float(trainer.callback_metrics["val/kernel_residual"]) == pytest.approx(expected, rel=1e-6)


class TwoBlobs(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader()

    def test_dataloader(self) -> DataLoader:
        return loader()


def test_a_stale_posterior_is_swept_again_over_a_training_epochs_batches_before_testing() -> None:
    sweeps: list[int | None] = []

    class CountingVIKING(VIKING):
        def sweep(self, batches, max_batches=None) -> None:
            sweeps.append(max_batches)
            super().sweep(batches, max_batches)

    module = CountingVIKING(make_model(), phase_epochs=(1, 0, 1), num_samples=2)
    trainer = Trainer(max_epochs=1, limit_train_batches=0.6, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=TwoBlobs())  # the MLE epoch moves theta_hat and never sweeps
    assert sweeps == [] and trainer.num_training_batches == 2
    trainer.test(module, datamodule=TwoBlobs(), verbose=False)
    assert sweeps == [2]  # int(0.6 x 4) batches, as Lightning counts a training epoch (it swept 3: ceil)
    trainer.test(module, datamodule=TwoBlobs(), verbose=False)
    assert sweeps == [2]  # theta_hat has not moved since
    with pytest.raises(RuntimeError, match="call module.sweep"):  # never swept and no training data attached
        make_module().on_test_start()


def test_testing_a_fits_checkpoint_sweeps_as_the_test_after_the_fit(tmp_path: Path) -> None:
    """The test-time sweep took the shuffled training batches in the order of the trainer's epoch count: 2 after
    the fit, 0 in a fresh ``test --ckpt_path``, so the two tests scored other samples (NLL 2.3229 against 2.3214)."""
    data = DigitsDataModule(batch_size=64)
    fitted = VIKING(MLP(64, 10, hidden=[8]), phase_epochs=(0, 0, 2), num_samples=2)
    trainer = make_trainer(2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(fitted, datamodule=data)
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    trainer.test(fitted, datamodule=data, verbose=False)
    loaded = VIKING(MLP(64, 10, hidden=[8]), phase_epochs=(0, 0, 2), num_samples=2)
    make_trainer(1, limit_train_batches=3).test(loaded, datamodule=data, ckpt_path=tmp_path / "fitted.ckpt",
                                               verbose=False, weights_only=False)  # fmt: skip
    assert torch.equal(loaded.sample_kernel, fitted.sample_kernel)


def test_a_checkpoint_of_another_num_samples_keeps_its_samples_and_sweeps_for_more(tmp_path: Path) -> None:
    saved = make_module(num_samples=3)
    trainer = make_trainer(3)
    trainer.fit(saved, datamodule=TwoBlobs())
    trainer.test(saved, datamodule=TwoBlobs(), verbose=False)  # the sweep at the fitted theta_hat
    trainer.save_checkpoint(tmp_path / "swept.ckpt")
    tester = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    fewer = make_module(num_samples=2)
    tester.test(fewer, datamodule=TwoBlobs(), ckpt_path=tmp_path / "swept.ckpt", verbose=False)
    assert torch.equal(fewer.sample_kernel, saved.sample_kernel[:2])  # the first two, not swept again
    assert torch.equal(fewer.samples(), saved.samples(2))

    more = make_module(num_samples=5)
    tester.test(more, datamodule=TwoBlobs(), ckpt_path=tmp_path / "swept.ckpt", verbose=False)
    assert more.sample_kernel.shape[0] == 5 and torch.equal(more.swept_at, more._fingerprint())
    assert bool((more.sample_kernel.norm(dim=1) > 0).all())  # no zero row left
    x, y = two_blobs().tensors
    assert_in_kernel(more.function.jacobian(x[-8:], y[-8:]), more.sample_kernel)  # a new sweep for all five


class _CountsBatches(Callback):
    def __init__(self) -> None:
        self.per_epoch: dict[int, int] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.per_epoch[trainer.current_epoch] = self.per_epoch.get(trainer.current_epoch, 0) + 1


def test_the_epoch_start_sweep_leaves_the_training_loader_alone(tmp_path: Path) -> None:
    """The sweep at the start of epoch 0 runs over a side pass: sweeping the training loader itself reset the
    iterator its persistent worker shares with the fit (epoch 0 trained on no batch) and replaced the iterator
    whose position checkpoints keep (a fit resumed inside that epoch ended 0.66 away)."""

    def run(callbacks: list[Callback], ckpt: Path | None = None) -> tuple[VIKING, dict[int, int]]:
        torch.manual_seed(0)
        module, counts = VIKING(MLP(64, 10, hidden=[16]), phase_epochs=(0, 0, 2), num_samples=2), _CountsBatches()
        make_trainer(2, callbacks=[*callbacks, counts]).fit(
            module, datamodule=DigitsDataModule(batch_size=64, num_workers=1), ckpt_path=ckpt, weights_only=False
        )
        return module, counts.per_epoch

    straight, batches = run([])
    assert batches == {0: 17, 1: 17}  # 1,077 training digits
    run([SavesInsideAnEpoch(tmp_path / "inside.ckpt", epoch=0, batch_idx=3, stop=True)])
    resumed, batches = run([], tmp_path / "inside.ckpt")
    assert batches == {0: 13, 1: 17}
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_a_checkpoint_loaded_outside_a_trainer_restores_the_noise_generator(tmp_path: Path) -> None:
    """``VIKING.load_from_checkpoint`` (no Trainer, so rank 0) takes the saved generator: its next sweep draws what the
    saved module's next sweep draws, in the kernel of the saved constraint (which the module rebuilt as the default
    one before it was saved with the checkpoint)."""
    saved = make_module(constraint="output")
    trainer = make_trainer(3)
    trainer.fit(saved, datamodule=TwoBlobs())
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    loaded = VIKING.load_from_checkpoint(tmp_path / "fitted.ckpt", backbone=make_model(seed=5))
    assert loaded.function.constraint is output_constraint
    assert torch.equal(loaded.generator.get_state(), saved.generator.get_state())
    saved.sweep(loader())
    loaded.sweep(loader())
    assert torch.equal(loaded.sample_noise, saved.sample_noise) and torch.equal(loaded.carried, saved.carried)
    assert torch.equal(loaded.sample_kernel, saved.sample_kernel)


def test_a_gaussian_likelihoods_noise_trains_with_the_network() -> None:
    """The likelihood's noise gets gradients in every phase; it was left out of the optimiser (it never moved)."""
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 32, dtype=torch.float64)[:, None]
    data = DataLoader(TensorDataset(x, torch.sin(2 * x) + 0.05 * torch.randn_like(x)), batch_size=8)
    network = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    module = VIKING(network, likelihood="gaussian", phase_epochs=(1, 1, 1), num_samples=2,
                    optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    module.likelihood.double()
    before = module.likelihood.raw_noise.detach().clone()
    make_trainer(3).fit(module, train_dataloaders=data)
    assert (module.likelihood.raw_noise.detach() - before).abs().min() > 1e-3


def test_under_bf16_mixed_the_steps_projection_is_float32_exact() -> None:
    """The step's projection runs with autocast off: the carried vector is in the batch's kernel to float32
    rounding of this problem (a 32-true fit: 9e-6 off its re-projection, ||J_b k|| / ||k|| 3.3e-5; with J_b in
    bf16 they were 0.17 and 1.1e-2), and the logged ||J_b k|| / ||k|| says so."""
    torch.manual_seed(0)
    module = VIKING(make_model().float(), phase_epochs=(0, 0, 2), gamma=0.0, num_samples=2,
                    optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    data = DataLoader(TensorDataset(two_blobs().tensors[0].float(), two_blobs().tensors[1]), batch_size=8)
    recorder = Recorder()
    trainer = make_trainer(2, callbacks=[recorder], precision="bf16-mixed", log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=data)
    x, y = recorder.steps[-1]["batch"]
    jacobian = module.function.jacobian(x, y, recorder.steps[-1]["theta"]).double()
    assert_in_kernel(jacobian, recorder.steps[-1]["carried"].double(), tolerance=1e-4)
    assert trainer.logged_metrics["train/kernel_residual"] < 1e-4


def test_the_logged_step_residual_is_the_batch_kernels() -> None:
    recorder = Recorder()
    module = make_module(gamma=0.3)
    trainer = make_trainer(3, callbacks=[recorder], log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=loader())
    last = recorder.steps[-1]
    x, y = last["batch"]
    jacobian = module.function.jacobian(x, y, last["theta"])
    expected = (jacobian @ last["carried"]).norm() / last["carried"].norm()
    torch.testing.assert_close(trainer.logged_metrics["train/kernel_residual"].double(), expected.float().double())


def test_samples_of_an_older_theta_hat_warn_and_validate_outside_a_fit_resweeps() -> None:
    """After a fit theta_hat has moved since the last epoch-start sweep: a direct predictive call says so, and
    ``trainer.validate`` re-sweeps first (as test and predict do)."""

    class Blobs(LightningDataModule):
        def train_dataloader(self):
            return loader()

        val_dataloader = train_dataloader

    module = make_module(phase_epochs=(0, 0, 2))
    make_trainer(2).fit(module, train_dataloaders=loader())
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"call module.sweep\(train_loader\)"):
        module.predictive(x)
    make_trainer(1).validate(module, datamodule=Blobs())
    assert torch.equal(module.swept_at, module._fingerprint())
    module.predictive(x)  # no warning: the filter below turns one into an error
    module.sweep(loader())


@pytest.mark.filterwarnings("error")
def test_swept_samples_do_not_warn() -> None:
    module = make_module()
    module.sweep(loader())
    module.predictive(torch.zeros(1, 2, dtype=torch.float64))


def test_under_64_true_the_sweeps_take_the_batches_as_the_steps_do() -> None:
    """``precision="64-true"`` casts a float32 network to float64 and every step's batch, but the sweeps read the
    loader themselves: "mat1 and mat2 must have the same dtype" as the ELBO phase began. The fit on float32 data
    now equals the fit on the same values given in float64."""
    x, y = two_blobs().tensors
    fits = []
    for data in (x.float(), x.float().double()):
        module = VIKING(make_model().float(), phase_epochs=(0, 1, 1), num_samples=2)
        make_trainer(2, precision="64-true").fit(module, DataLoader(TensorDataset(data, y), batch_size=8))
        fits.append(module)
    assert fits[0].carried.dtype == torch.float64
    assert torch.equal(fits[0].carried, fits[1].carried) and torch.equal(fits[0].sample_kernel, fits[1].sample_kernel)
    assert torch.equal(fits[0].theta_hat(), fits[1].theta_hat())


def test_a_sweep_after_a_fit_moves_the_batches_to_the_modules_device() -> None:
    """After a GPU fit Lightning's teardown puts the module back on the CPU while the strategy's root device stays
    the GPU: ``module.sweep(train_loader)`` (what the stale-posterior error asks for) sent the batches there. A root
    device of ``meta`` stands in for the GPU."""
    module, trainer = make_module(phase_epochs=(0, 1, 1)), make_trainer(2)
    trainer.fit(module, loader())
    trainer.strategy._root_device = torch.device("meta")
    before = module.sample_kernel.clone()
    module.sweep(loader())
    assert module.sample_kernel.device.type == "cpu" and not torch.equal(module.sample_kernel, before)


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"epochs": 2}, r"max_epochs=2: .*ends before the ELBO phase"),
        ({"epochs": 4}, r"max_epochs=4: .*gets 2 of its 3 epochs"),
        ({"epochs": -1, "max_steps": 8}, r"max_steps=8 \(2 epochs of 4 steps\): .*ends before the ELBO phase"),
        ({"epochs": 9, "max_steps": 14}, r"max_steps=14 \(3.5 epochs of 4 steps\): .*gets 1.5 of its 3 epochs"),
        ({"epochs": 9, "max_steps": 7, "accumulate_grad_batches": 2}, r"max_steps=7 \(3.5 epochs of 2 steps\)"),
    ],
    ids=["max_epochs_before_elbo", "max_epochs_inside_elbo", "max_steps", "max_steps_inside_elbo", "accumulation"],
)
def test_a_fit_shorter_than_the_phases_warns(bounds: dict, message: str) -> None:
    """Also when ``max_steps`` ends it (it did not warn: the scales never trained, and the test reported the
    initial ones as the posterior)."""
    expected = rf"phase_epochs=\(1, 1, 3\) need 5 epochs but the Trainer stops after {message}"
    with pytest.warns(UserWarning, match=expected):
        make_trainer(**bounds).fit(make_module(phase_epochs=(1, 1, 3)), train_dataloaders=loader())


@pytest.mark.filterwarnings("error:.*phase_epochs")
def test_a_fit_as_long_as_the_phases_or_a_smoke_run_does_not_warn() -> None:
    make_trainer(9, max_steps=20).fit(make_module(phase_epochs=(1, 1, 3)), train_dataloaders=loader())
    make_trainer(9, fast_dev_run=2).fit(make_module(phase_epochs=(1, 1, 3)), train_dataloaders=loader())


def test_validation_inside_a_fit_leaves_the_global_generator_as_it_found_it() -> None:
    """VIKING overrode ``on_validation_start`` without calling the base class, so its validations (whose loader draws
    a seed from the global generator) moved the training stream: a fit resumed from an epoch's last batch, whose
    validation Lightning skips, drew other dropout masks."""
    states: list[torch.Tensor] = []

    class Generator(Callback):
        def on_validation_start(self, trainer, pl_module) -> None:
            states.append(torch.random.get_rng_state())

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # after the validation (and the module's hooks)
            states.append(torch.random.get_rng_state())

    module = make_module(phase_epochs=(0, 0, 1), num_samples=2)
    trainer = make_trainer(1, callbacks=[Generator()], limit_val_batches=1)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=DataLoader(two_blobs(), batch_size=8, shuffle=True))
    assert len(states) == 2 and torch.equal(states[0], states[1])


class HardSigmoidFormula(nn.Module):
    """``relu6(x + 3) / 6``: nn.Hardsigmoid's function with torch's second derivatives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3) / 6


def test_a_network_without_second_derivatives_is_refused_before_the_first_step() -> None:
    """The ELBO steps' projections (gamma < 1) differentiate the network twice; torch has no second derivative of
    nn.Hardsigmoid (the gate of timm's MobileNetV3): refused at the first MLE step, naming the fix, with the
    network's train modes as they were; so is a custom Function with a ``@once_differentiable`` backward, which
    torch.func would differentiate silently wrong. gamma = 1 needs none, and the same function written out trains."""

    class ModeRecorder(Callback):
        def __init__(self) -> None:
            self.modes: list[bool] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.modes.append(module.backbone[1].training)

    def network(activation: nn.Module) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2, 6), nn.Dropout(0.1), activation, nn.Linear(6, 2)).double()

    module = VIKING(network(nn.Hardsigmoid()), phase_epochs=(1, 0, 1), num_samples=2, gamma=0.2)
    before = module.function.theta().clone()
    with pytest.raises(ValueError, match=r"VIKING with gamma=0.2 .* second derivative of Sequential"
                       r".*hardsigmoid_backward.*nn.Hardsigmoid by F.relu6\(x \+ 3\) / 6\).*or use gamma=1"):
        make_trainer(3).fit(module, train_dataloaders=loader())
    assert torch.equal(module.function.theta(), before)
    with pytest.raises(ValueError, match="hardsigmoid_backward"):  # a smoke run stands for the whole fit: checked
        make_trainer(3, fast_dev_run=1).fit(module, train_dataloaders=loader())
    once = VIKING(network(Square(once=True)), phase_epochs=(1, 0, 1), num_samples=2, gamma=0.2)
    with pytest.raises(ValueError, match=r"\(the backward of OnceSquare is marked @once_differentiable\)"):
        make_trainer(3).fit(once, train_dataloaders=loader())
    with pytest.warns(UserWarning, match="the fit ends before the ELBO phase"):  # never needs the derivatives
        make_trainer(1).fit(module, train_dataloaders=loader())
    assert not torch.equal(module.function.theta(), before)
    for gamma, activation in ((1.0, nn.Hardsigmoid()), (0.2, HardSigmoidFormula())):
        module = VIKING(network(activation), phase_epochs=(1, 0, 1), num_samples=2, gamma=gamma)
        recorder = ModeRecorder()
        make_trainer(2, callbacks=[recorder]).fit(module, train_dataloaders=loader())
        assert recorder.modes[:4] == [True] * 4  # the MLE epoch trains with dropout on
        assert torch.isfinite(module.predictive(two_blobs().tensors[0]).probs).all()


def test_a_sweep_capped_at_max_batches_projects_onto_exactly_those_batches() -> None:
    """``sweep(loader, max_batches=2)`` equals a same-seed sweep over the loader's first two batches, bitwise."""
    data = loader(batch_size=8)  # 4 batches
    capped, reference = make_module(phase_epochs=(0, 0, 1)), make_module(phase_epochs=(0, 0, 1))
    capped.sweep(data, max_batches=2)
    reference.sweep(list(data)[:2])
    assert torch.equal(capped.carried, reference.carried)
    assert torch.equal(capped.sample_kernel, reference.sample_kernel)


def test_a_64_true_fit_draws_the_noise_of_a_32_true_fit() -> None:
    """Lightning's 64-true makes float64 the default dtype inside steps only: the steps drew from torch's float64
    stream and the epoch-start sweeps from the float32 one, so no draw matched a 32-true fit (digits: test NLL
    2.292 against 2.306). With the draws always in float32 the draws are equal and the rest agrees to float32
    rounding carried through 8 Adam steps and the projections (here 1e-5 in theta_hat, 4e-4 in vectors of norm 2;
    different draws: 0.07 and 3.7)."""
    x, y = two_blobs().tensors
    fits = []
    for precision in ("32-true", "64-true"):
        module = VIKING(make_model().float(), phase_epochs=(0, 1, 2), gamma=0.3, num_samples=3,
                        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
        make_trainer(3, precision=precision).fit(module, DataLoader(TensorDataset(x.float(), y), batch_size=8))
        fits.append(module)
    single, double = fits
    assert double.carried.dtype == torch.float64
    assert torch.equal(double.sample_noise.float(), single.sample_noise)
    for name in ("carried", "sample_kernel"):
        torch.testing.assert_close(getattr(double, name).float(), getattr(single, name), rtol=0, atol=2e-3)
    torch.testing.assert_close(double.theta_hat().float(), single.theta_hat(), rtol=0, atol=1e-4)


def test_under_bf16_true_the_noise_stays_wide_and_a_moved_theta_hat_is_seen() -> None:
    """bf16-true casts the whole module: the carried and sampled noise kept their float32 (projected samples in the
    kernel to float32 rounding, not bf16's) and the staleness fingerprint its float64, which in bf16 missed a
    weight moved by 0.004."""
    x, y = two_blobs().tensors
    module = VIKING(make_model().float(), phase_epochs=(0, 1, 1), num_samples=3,
                    optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    make_trainer(2, precision="bf16-true").fit(module, DataLoader(TensorDataset(x.float(), y), batch_size=8))
    assert module.theta_hat().dtype == torch.bfloat16
    assert {getattr(module, name).dtype for name in ("epoch_noise", "carried", "sample_noise", "sample_kernel")} == {
        torch.float32
    }
    assert module.swept_at.dtype == torch.float64
    module.sweep(loader(batch_size=8, count=32))
    assert torch.equal(module.swept_at, module._fingerprint())
    last = module.function.jacobian(x[-8:].bfloat16(), y[-8:]).double()  # the sweep's last batch, in bf16
    assert_in_kernel(last, module.sample_kernel.double(), tolerance=1e-5)  # projected in float32 (bf16: 1e-2)
    assert module.predictive(x[:4].bfloat16()).probs.isfinite().all()
    with torch.no_grad():
        weight = module.backbone[0].weight
        weight[0, 0] = weight[0, 0] + 2.0 ** -7 * weight[0, 0].abs().clamp_min(1.0)  # one bf16 step or more
    assert not torch.equal(module.swept_at, module._fingerprint())
