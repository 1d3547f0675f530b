"""NullSpaceLaplace through the Trainer: kernel property of the samples, linearised predictive on training
points, loss kernel, exact resumption, checkpoint loading and clear errors. A float64 tanh MLP
(30 -> 6 -> 3, P = 207) on 20 points in five fixed micro-batches: sweeps converge to ~1e-12 here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_bayes.inference.linalg import LossConstraint, ParameterFunction
from lightning_bayes.modules import nullspace_laplace as nullspace_laplace_module
from lightning_bayes.modules import MAP, NullSpaceLaplace
from lightning_bayes.predictive import CategoricalPredictive

from linearisation import first_order_outputs
from once_differentiable_square import Square
from resumption import SavesInsideAnEpoch
from unbatchable import CheckedInputs

pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(30, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def make_data(shuffle: bool = False) -> tuple[DataLoader, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20, 30, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (20,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=shuffle), x, y


def make_trainer(sweeps: int, root: Path | None = None, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=sweeps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=root is not None,
        default_root_dir=root,
        **kwargs,
    )


def fitted(sweeps: int = 60, **kwargs) -> tuple[NullSpaceLaplace, torch.Tensor, torch.Tensor]:
    loader, x, y = make_data()
    module = NullSpaceLaplace(make_model(), num_samples=6, rtol=1e-12, **kwargs)
    make_trainer(sweeps).fit(module, train_dataloaders=loader)
    return module, x, y


def test_samples_lie_in_the_training_kernel_and_keep_training_outputs() -> None:
    module, x, y = fitted()
    deltas = module.deltas()
    jacobian = module.function.jacobian(x, y)
    assert (torch.linalg.vector_norm(deltas @ jacobian.T, dim=1) / deltas.norm(dim=1)).max() < 1e-3
    predictive = module.predictive(x)
    assert isinstance(predictive, CategoricalPredictive) and predictive.logits.shape == (6, 20, 3)
    map_logits = module(x)
    tolerance = 1e-7 * float(deltas.norm(dim=1).max())  # relative to the sample's size ||theta_s - theta_hat||
    torch.testing.assert_close(predictive.logits, map_logits.expand(6, -1, -1), rtol=0, atol=tolerance)
    far = 4 * torch.randn(5, 30, dtype=torch.float64)
    assert (module.predictive(far).logits - module(far)).abs().max() > 1e-3  # variance off the training span
    assert module.projections.sweeps_done.item() == 60
    assert 0 < module.rank() <= 60 + 4 * (2 * 60 / 6) ** 0.5


@pytest.mark.parametrize("predictive", ["linearized", "neural"])
def test_deltas_and_the_predictive_are_the_scaled_samples_through_the_network(predictive: str) -> None:
    # theta_s - theta_hat = c alpha^-1/2 v_s (here c = 0.5, alpha = 4: a quarter of each projected sample); the
    # predictive's logits are f(theta_hat) + J delta_s (linearised) or f(theta_hat + delta_s) (neural)
    module, x, _ = fitted(sweeps=2, alpha=4.0, scale=0.5, predictive=predictive)
    deltas, theta_hat = module.deltas(), module.function.theta()
    torch.testing.assert_close(deltas, 0.25 * module.projections.samples, rtol=1e-15, atol=0)
    if predictive == "linearized":
        expected = first_order_outputs(module.function, x, theta_hat, deltas)
    else:
        expected = torch.stack([module.function.outputs(theta_hat + d, x) for d in deltas])
    torch.testing.assert_close(module.predictive(x).logits, expected, rtol=1e-10, atol=1e-12)


def test_a_sweep_ends_after_the_epochs_last_batch() -> None:
    # the epoch's summary (rank, alpha) is that of the finished sweep: after two unconverged sweeps the logged rank is
    # the final samples' estimate, which the last batch's projection still moves
    loader, _, _ = make_data()
    module, trainer = NullSpaceLaplace(make_model(), num_samples=6, accelerate=False), make_trainer(2)
    trainer.fit(module, train_dataloaders=loader)
    assert float(trainer.callback_metrics["train/rank"]) == pytest.approx(module.rank(), rel=1e-6)
    assert float(trainer.callback_metrics["train/alpha"]) == pytest.approx(module.alpha(), rel=1e-6)


def test_loss_kernel_samples_are_orthogonal_to_per_example_loss_gradients() -> None:
    module, x, y = fitted(sweeps=60, constraint="loss")
    gradients = ParameterFunction(module.model, constraint=LossConstraint(module.likelihood)).jacobian(x, y)
    deltas = module.deltas()
    cosines = (deltas @ gradients.T) / (deltas.norm(dim=1, keepdim=True) * gradients.norm(dim=1))
    assert cosines.abs().max() < 1e-8
    assert 0 < module.rank() < 30  # 20 loss rows instead of 60 output rows: a smaller image


def test_resuming_from_a_mid_fit_checkpoint_gives_identical_samples(tmp_path: Path) -> None:
    loader, _, _ = make_data()
    straight = NullSpaceLaplace(make_model(), num_samples=4, seed=3)
    make_trainer(6).fit(straight, train_dataloaders=loader)

    class StopAfterThree(Callback):  # an interrupted 6-epoch fit (a fit of 3 would end with a plain sweep)
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            trainer.should_stop = trainer.current_epoch == 2

    first = NullSpaceLaplace(make_model(), num_samples=4, seed=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(6, tmp_path, callbacks=[StopAfterThree(), checkpoint]).fit(first, train_dataloaders=loader)
    assert first.projections.sweeps_done.item() == 3
    resumed = NullSpaceLaplace(make_model(), num_samples=4, seed=3)
    make_trainer(6, tmp_path).fit(resumed, train_dataloaders=loader, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.projections.sweeps_done.item() == 6
    assert torch.equal(resumed.projections.samples, straight.projections.samples)


@pytest.mark.parametrize("scale", [1.0, "line_search"])  # the line search's batches collected so far are saved
def test_resuming_inside_a_sweep_from_a_stateful_loader_gives_identical_samples(tmp_path: Path, scale) -> None:
    _, x, y = make_data()
    loader = StatefulDataLoader(TensorDataset(x, y), batch_size=4)  # 5 batches; the loader's position is saved
    options = {"num_samples": 4, "seed": 3, "scale": scale, "scale_batches": 3, "alpha": 1.0}
    straight = NullSpaceLaplace(make_model(), **options)
    make_trainer(3).fit(straight, train_dataloaders=loader)
    inside = SavesInsideAnEpoch(tmp_path / "mid.ckpt", epoch=2, batch_idx=1, stop=True)  # the last sweep
    make_trainer(3, callbacks=[inside]).fit(NullSpaceLaplace(make_model(), **options), loader)
    resumed = NullSpaceLaplace(make_model(), **options)
    make_trainer(3).fit(resumed, train_dataloaders=loader, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.projections.sweeps_done.item() == 3
    assert torch.equal(resumed.projections.samples, straight.projections.samples)
    assert resumed.scale() == straight.scale()  # 1.41; with the batches collected before the stop lost: 0.32


def test_resuming_inside_a_sweep_from_a_loader_without_state_is_refused_by_name(tmp_path: Path) -> None:
    """Lightning would feed the restarted loader's first batches under the saved batch indices."""
    loader, _, _ = make_data()
    make_trainer(2, callbacks=[SavesInsideAnEpoch(tmp_path / "mid.ckpt")]).fit(NullSpaceLaplace(make_model()), loader)
    with pytest.raises(ValueError, match=r"saved inside a sweep \(after batch 3 of 5\)"):
        make_trainer(3).fit(NullSpaceLaplace(make_model()), loader, ckpt_path=tmp_path / "mid.ckpt")


def test_line_search_scale_keeps_the_training_nll_within_tolerance() -> None:
    module, x, y = fitted(sweeps=3, predictive="neural", scale="line_search", alpha=1.0)
    c = float(module.scale_value)
    assert c > 0
    base = -module.predictive(x, scale=0.0).log_prob(y).mean()
    assert -module.predictive(x).log_prob(y).mean() <= 1.01 * base + 1e-12
    assert -module.predictive(x, scale=4 * c).log_prob(y).mean() > 1.01 * base  # larger scales break the bound


def test_loads_a_map_checkpoint_and_refuses_another_model(tmp_path: Path) -> None:
    loader, x, _ = make_data()
    trained = MAP(make_model(seed=5))
    trainer = make_trainer(1, tmp_path)
    trainer.fit(trained, train_dataloaders=loader)
    path = tmp_path / "map.ckpt"
    trainer.save_checkpoint(path)
    module = NullSpaceLaplace(make_model(seed=0), checkpoint=str(tmp_path / "m*.ckpt"))
    torch.testing.assert_close(module(x), trained(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"does not fit Sequential: \['0.weight \(6, 30\) vs \(3, 30\)"):
        NullSpaceLaplace(nn.Sequential(nn.Linear(30, 3)).double(), checkpoint=str(path))
    with pytest.raises(ValueError, match=r"is not of a Sequential: .* missing \['3.weight', '3.bias'\]"):
        NullSpaceLaplace(nn.Sequential(*make_model(), nn.Linear(3, 3)).double(), checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        NullSpaceLaplace(make_model(), checkpoint=str(tmp_path / "none*.ckpt"))


@pytest.mark.parametrize("loader_class", [DataLoader, StatefulDataLoader])  # torchdata's RandomSampler is its own
def test_shuffled_training_loader_is_refused(loader_class: type[DataLoader]) -> None:
    _, x, y = make_data()
    loader = loader_class(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        make_trainer(1).fit(NullSpaceLaplace(make_model()), train_dataloaders=loader)


def test_a_training_loader_that_drops_its_last_batch_is_refused() -> None:
    """The kernel is that of every training example: a dropped last batch would leave its examples unconstrained."""
    _, x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=3, drop_last=True)  # 20 examples: the last 2 dropped
    with pytest.raises(ValueError, match=r"drops its last batch: set the datamodule's drop_last=False"):
        make_trainer(1).fit(NullSpaceLaplace(make_model()), train_dataloaders=loader)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"constraint": "logits"}, "constraint must be one of"),
        ({"predictive": "glm"}, "predictive must be one of"),
        ({"scale": -1.0}, "scale must be a finite number >= 0 or 'line_search'"),
        ({"scale": math.inf}, "scale must be a finite number >= 0 or 'line_search'"),
        ({"scale_tolerance": math.inf}, "scale_tolerance must be a finite number > 0"),
        ({"alpha": math.nan}, "alpha must be a finite number > 0"),
        ({"alpha": math.inf}, "alpha must be a finite number > 0"),
        ({"atol": math.nan}, "atol must be None or a finite number > 0"),
        ({"alpha": "marginal"}, "alpha must be a positive number or one of"),
        ({"scale_tolerance": 0.0}, r"scale_tolerance must be a finite number > 0 \(a relative training-NLL .*got 0.0"),
        ({"scale_batches": 0}, "scale_batches must be an int >= 1; got 0"),
        ({"params": "nothing*"}, "matched no parameter"),
        ({"compile_jacobian": "yes"}, "compile_jacobian must be True or False; got 'yes'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        NullSpaceLaplace(make_model(), **kwargs)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_jacobian_gives_the_eager_samples() -> None:
    """``compile_jacobian=True``: the eager sweeps' samples and the same predictive, to float64 rounding."""
    eager, x, _ = fitted(sweeps=3)
    compiled = fitted(sweeps=3, compile_jacobian=True)[0]
    assert compiled.function.compile_jacobian and not eager.function.compile_jacobian
    torch.testing.assert_close(compiled.deltas(), eager.deltas(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(compiled.predictive(x).logits, eager.predictive(x).logits, rtol=1e-9, atol=1e-12)


def test_sweeps_under_bf16_mixed_precision_run_in_full_precision() -> None:
    """A float32 network: under ``precision="bf16-mixed"`` the sweeps' Jacobians would be bf16 (several percent
    off); the module turns autocast off for them, so the samples are the float32 fit's, bit for bit."""
    loader, _, _ = make_data()
    x32 = torch.utils.data.TensorDataset(*(t.float() if t.is_floating_point() else t for t in loader.dataset.tensors))
    deltas = {}
    for precision in ("32-true", "bf16-mixed"):
        module = NullSpaceLaplace(make_model().float(), num_samples=4, scale=1.0, alpha=1.0)
        make_trainer(2, precision=precision).fit(module, train_dataloaders=DataLoader(x32, batch_size=4))
        deltas[precision] = module.deltas()
    assert deltas["32-true"].dtype == torch.float32
    torch.testing.assert_close(deltas["bf16-mixed"], deltas["32-true"], rtol=0, atol=0)


def test_every_sweep_is_checkpointed_and_a_fit_resumes_from_any_of_them(tmp_path: Path) -> None:
    """ModelCheckpoint saves only when ``global_step`` has moved, which a fit without optimiser steps never did: a
    sweep's epochs were not checkpointed (only at the end of the fit), so a stopped run had nothing to resume from."""
    loader, _, _ = make_data()
    straight = NullSpaceLaplace(make_model(), num_samples=4, seed=3)
    every = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    make_trainer(4, tmp_path, callbacks=[every]).fit(straight, train_dataloaders=loader)
    assert sorted(p.name for p in tmp_path.glob("epoch=*.ckpt")) == [f"epoch={e}.ckpt" for e in range(4)]
    resumed = NullSpaceLaplace(make_model(), num_samples=4, seed=3)
    make_trainer(4).fit(resumed, train_dataloaders=loader, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert resumed.projections.sweeps_done.item() == 4
    assert torch.equal(resumed.projections.samples, straight.projections.samples)
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", save_top_k=-1, every_n_train_steps=3)
    make_trainer(1, tmp_path, callbacks=[steps]).fit(NullSpaceLaplace(make_model()), train_dataloaders=loader)
    saved = torch.load(tmp_path / "steps" / "epoch=0-step=3.ckpt", weights_only=False)
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    assert (saved["global_step"], batches) == (3, 3), "a step is counted as its batch starts, before callbacks save"


def test_a_step_budget_inside_a_sweep_is_refused_and_whole_sweeps_are_taken() -> None:
    """A sweep is a whole epoch whose batches count as steps: ``max_steps=6`` would stop the second sweep of 5
    batches part-way; ``max_steps=10`` is two sweeps, as ``max_epochs=2``; ``fast_dev_run=2`` is one sweep of two
    batches, ``fast_dev_run=7`` one of all 5 (both were refused, naming a ``max_steps`` the user never set)."""
    loader, _, _ = make_data()
    with pytest.raises(ValueError, match=r"^NullSpaceLaplace takes no optimiser steps .* max_steps=6 would stop it "
                       r"inside an epoch of 5 batches: bound the fit by max_epochs .*, or give a multiple of 5$"):
        make_trainer(-1, max_steps=6).fit(NullSpaceLaplace(make_model(), num_samples=2), train_dataloaders=loader)
    by_steps, by_epochs = NullSpaceLaplace(make_model(), num_samples=2), NullSpaceLaplace(make_model(), num_samples=2)
    make_trainer(-1, max_steps=10).fit(by_steps, train_dataloaders=loader)
    make_trainer(2).fit(by_epochs, train_dataloaders=loader)
    assert (by_steps.trainer.global_step, int(by_steps.projections.sweeps_done)) == (10, 2)
    assert torch.equal(by_steps.projections.samples, by_epochs.projections.samples)
    for runs, steps in ((2, 2), (7, 5)):  # fast_dev_run=7 over 5 batches: one epoch of 5, as max_epochs=1 says
        smoke = NullSpaceLaplace(make_model(), num_samples=2)
        make_trainer(5, fast_dev_run=runs).fit(smoke, train_dataloaders=loader)
        assert (smoke.trainer.global_step, int(smoke.projections.sweeps_done)) == (steps, 1)


def test_more_predictive_samples_than_projected_is_an_error() -> None:
    module = NullSpaceLaplace(make_model(), num_samples=3)
    with pytest.raises(ValueError, match="num_samples=5 exceeds the 3 projected samples"):
        module.predictive(torch.zeros(2, 30, dtype=torch.float64), num_samples=5)


def test_timm_backbone_with_batchnorm_and_a_parameter_subset() -> None:
    """A timm ResNet in eval mode (BatchNorm running statistics) with the posterior over the last block's
    BatchNorm affine parameters and the head. One micro-batch holds all the data, so one sweep is the exact
    projection (random images give nearly parallel batch row spaces: convergence is tested elsewhere)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3, pretrained=False)
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(3))
    module = NullSpaceLaplace(model, params=["layer4.0.bn*", "fc.*"], num_samples=3)
    make_trainer(1).fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=12))
    assert module.function.size == 4 * 512 + 512 * 3 + 3
    deltas = module.deltas()
    residual = torch.linalg.vector_norm(deltas @ module.function.jacobian(x, y).T, dim=1) / deltas.norm(dim=1)
    assert residual.max() < 1e-4  # float32 Jacobian: the rtol=1e-5 cutoff sets the floor
    moved = (module.predictive(x).logits - module(x)).norm()
    isotropic = module.projections.noise * (deltas.norm(dim=1, keepdim=True) / module.projections.noise.norm(dim=1, keepdim=True))
    assert moved < 1e-3 * module.function.jvp(x, isotropic)[1].norm()  # training outputs stay put
    assert module.model.training is False and module.model.layer4[0].bn1.training is False


def test_a_checkpoint_tested_with_fewer_samples_uses_its_first_and_refuses_more(tmp_path: Path) -> None:
    loader, _, _ = make_data()
    full = NullSpaceLaplace(make_model(), num_samples=4, seed=3)
    make_trainer(3, tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(full, loader)
    fewer, checkpoint = NullSpaceLaplace(make_model(), num_samples=2, seed=3), tmp_path / "last.ckpt"
    make_trainer(1).validate(fewer, loader, ckpt_path=checkpoint, verbose=False)
    torch.testing.assert_close(fewer.deltas(), full.deltas(2), rtol=0, atol=0)  # alpha from all four samples
    with pytest.raises(ValueError, match="num_samples=6 exceeds the 4 samples the checkpoint's fit projected"):
        make_trainer(1).validate(NullSpaceLaplace(make_model(), num_samples=6), loader, ckpt_path=checkpoint)


def test_a_model_vmap_rejects_validates_from_a_checkpoint_with_the_loop(tmp_path: Path) -> None:
    loader, _, _ = make_data()
    fit = NullSpaceLaplace(CheckedInputs(*make_model()), num_samples=4, rtol=1e-12)
    with pytest.warns(UserWarning, match="fall back to a Python loop"):
        make_trainer(40, tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(fit, loader)
    loaded = NullSpaceLaplace(CheckedInputs(*make_model(seed=1)), num_samples=4, rtol=1e-12)
    with pytest.warns(UserWarning, match="fall back to a Python loop"):  # no training step ran here to probe vmap
        (metrics,) = make_trainer(1).validate(loaded, loader, ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert metrics["val/kernel_residual"] < 1e-6  # the loaded samples lie in the kernel of the training batches
    torch.testing.assert_close(loaded.deltas(), fit.deltas(), rtol=0, atol=0)


def test_a_fixed_scale_survives_loading_a_line_search_checkpoint() -> None:
    searched, _x, _ = fitted(sweeps=2, scale="line_search", alpha=1.0)
    fixed = NullSpaceLaplace(make_model(), num_samples=6, scale=0.5, alpha=1.0)
    fixed.load_state_dict(searched.state_dict())
    assert fixed.scale() == 0.5 and searched.scale() == float(searched.scale_value) != 1.0
    reloaded = NullSpaceLaplace(make_model(), num_samples=6, scale="line_search", alpha=1.0)
    reloaded.load_state_dict(searched.state_dict())
    assert reloaded.scale() == searched.scale()
    torch.testing.assert_close(fixed.deltas(), searched.deltas() * (0.5 / searched.scale()))


def test_every_micro_batch_of_a_sweep_checks_the_heap_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    # lightning_bayes.heap explains why; 45 micro-batches per sweep, 2 sweeps: one check after each
    checks: list[int] = []

    class Counting:
        def __init__(self, budget_bytes: int) -> None:
            assert budget_bytes == 256 * 2**20

        def __call__(self) -> bool:
            checks.append(len(checks))
            return False

    monkeypatch.setattr("lightning_bayes.modules.nullspace_laplace.ReleaseOnGrowth", Counting)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(90, 30, dtype=torch.float64, generator=generator), torch.randint(0, 3, (90,), generator=generator)
    module = NullSpaceLaplace(make_model(), num_samples=2)
    make_trainer(2).fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=2))
    assert len(checks) == 90


def test_a_default_trainers_sanity_check_runs_and_alpha_before_a_sweep_says_fit_first() -> None:
    """Lightning's default sanity check validates before the first sweep, when no alpha exists: it now only logs
    the kernel residual (it raised "needs a positive rank estimate ... got rank 0")."""
    loader, _, _ = make_data()
    module = NullSpaceLaplace(make_model(), num_samples=4)
    with pytest.raises(RuntimeError, match="no sweep has projected them yet: fit first"):
        module.alpha()
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.num_sanity_val_steps == 2 and module.projections.sweeps_done.item() == 1
    assert math.isfinite(module.alpha())


def test_the_fits_last_sweep_is_plain_so_the_samples_lie_in_the_last_batchs_kernel() -> None:
    """The extrapolation after a sweep mixes the sweep's start back in; after the fit's last sweep it is skipped,
    so the samples end exactly in the kernel of the last micro-batch (float64 rounding), unlike after an
    extrapolated sweep (the third of four)."""
    loader, x, y = make_data()

    class StopAfterThree(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            trainer.should_stop = trainer.current_epoch == 2

    residuals = []
    for epochs, callbacks in ((3, []), (4, [StopAfterThree()])):
        module = NullSpaceLaplace(make_model(), num_samples=4, accelerate=True)
        make_trainer(epochs, callbacks=callbacks).fit(module, train_dataloaders=loader)
        assert module.projections.sweeps_done.item() == 3
        residuals.append(float(module.projections.residual(module.function.jacobian(x[-4:], y[-4:])).max()))
    assert residuals[0] < 1e-12 and residuals[1] > 1e-4


@pytest.mark.parametrize("forward_mode", [True, False], ids=["forward-mode", "no-forward-mode"])
def test_a_large_validation_jacobian_is_not_formed_and_the_residual_is_the_same(
    monkeypatch: pytest.MonkeyPatch, forward_mode: bool
) -> None:
    """Above ``_DENSE_RESIDUAL_ENTRIES`` (0 here) ``val/kernel_residual`` comes from ``S`` forward-mode products, no
    Jacobian formed (a ResNet-18's output Jacobian of 16 validation images took 7.2 GB and 16.5 s); a network
    without forward-mode AD (a custom Function without ``jvp``) forms the Jacobian as before, saying so."""
    loader, _, _ = make_data()
    torch.manual_seed(0)
    hidden = [nn.Tanh()] if forward_mode else [Square(once=True)]
    module = NullSpaceLaplace(nn.Sequential(nn.Linear(30, 6), *hidden, nn.Linear(6, 3)).double(), num_samples=4,
                              predictive="neural")
    trainer = make_trainer(2)
    trainer.fit(module, train_dataloaders=loader)
    (dense,) = trainer.validate(module, loader, verbose=False)
    monkeypatch.setattr(nullspace_laplace_module, "_DENSE_RESIDUAL_ENTRIES", 0)
    if forward_mode:
        def no_jacobian(*args, **kwargs):
            raise AssertionError("the validation batch's Jacobian was formed")
        monkeypatch.setattr(module.function, "jacobian", no_jacobian)
        (products,) = trainer.validate(module, loader, verbose=False)
    else:
        with pytest.warns(UserWarning, match=r"forms each batch's 12 x 207 Jacobian: forward-mode AD .* failed"):
            (products,) = trainer.validate(module, loader, verbose=False)
    assert dense["val/kernel_residual"] > 1e-6  # two sweeps leave the samples off the validation batches' kernels
    assert products["val/kernel_residual"] == pytest.approx(dense["val/kernel_residual"], rel=1e-10)


def test_a_gaussian_maps_noise_comes_with_its_weights(tmp_path: Path) -> None:
    """A Gaussian MAP's trained noise scale is the likelihood's: the post-hoc Laplace took the network alone and
    kept sigma = 1 (every predictive and the line search then used the wrong noise)."""
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 24, dtype=torch.float64)[:, None]
    data = DataLoader(TensorDataset(x, torch.sin(2 * x) + 0.1 * torch.randn_like(x)), batch_size=8)
    network = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    trained = MAP(network, likelihood="gaussian", optimizer=lambda p: torch.optim.Adam(p, lr=5e-2)).double()
    make_trainer(30).fit(trained, train_dataloaders=data)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "map.ckpt")
    laplace = NullSpaceLaplace(
        nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double(), checkpoint=str(tmp_path / "map.ckpt"),
        likelihood="gaussian", num_samples=2,
    )
    default = NullSpaceLaplace(make_model(), likelihood="gaussian").likelihood.raw_noise
    assert abs(float(trained.likelihood.raw_noise) - float(default)) > 1.0  # sigma 0.21 against softplus(0.54) = 1
    assert float(laplace.likelihood.raw_noise) == float(trained.likelihood.raw_noise.float())  # its float32 copy


def test_a_checkpoint_rebuilds_its_constraint_and_refuses_another(tmp_path: Path) -> None:
    loader, _, _ = make_data()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = NullSpaceLaplace(make_model(), num_samples=4, constraint="loss")
    make_trainer(2, tmp_path, callbacks=[checkpoint]).fit(module, train_dataloaders=loader)
    restored = NullSpaceLaplace.load_from_checkpoint(tmp_path / "last.ckpt", model=make_model())
    assert isinstance(restored.function.constraint, LossConstraint)
    with pytest.raises(ValueError, match="projected with constraint='loss'; this module has constraint='output'"):
        make_trainer(3, tmp_path).fit(
            NullSpaceLaplace(make_model(), num_samples=4, constraint="output"), loader, ckpt_path=tmp_path / "last.ckpt"
        )


def test_a_fitted_checkpoint_loads_without_the_map_it_started_from(tmp_path: Path) -> None:
    """``load_from_checkpoint(..., checkpoint=None)``, the README's way when the MAP's file is gone, stopped at
    Lightning's ``_load_state() got multiple values for argument 'checkpoint'``; without it the error says so."""
    loader, x, _ = make_data()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in make_model(1).state_dict().items()}}, tmp_path / "map.pt")
    module = NullSpaceLaplace(make_model(), checkpoint=str(tmp_path / "map.pt"), num_samples=4)
    make_trainer(2, tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(module, loader)
    (tmp_path / "map.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"map.pt' is not a file; train the model first; or, as .*last.ckpt' is "
                       r"a fitted NullSpaceLaplace holding the weights, load it with checkpoint=None$"):
        NullSpaceLaplace.load_from_checkpoint(tmp_path / "last.ckpt", model=make_model(), weights_only=False)
    restored = NullSpaceLaplace.load_from_checkpoint(tmp_path / "last.ckpt", model=make_model(), checkpoint=None,
                                                     weights_only=False)
    assert restored.hparams.checkpoint is None
    for name, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    torch.testing.assert_close(restored.predictive(x).logits, module.predictive(x).logits, rtol=0, atol=0)


def test_another_methods_checkpoint_as_ckpt_path_is_refused_by_name(tmp_path: Path) -> None:
    torch.save({"state_dict": {f"model.{k}": v for k, v in make_model().state_dict().items()}}, tmp_path / "map.ckpt")
    module = NullSpaceLaplace(make_model(), num_samples=4)
    with pytest.raises(ValueError, match=r"holds no null-space Laplace samples .* pass the file as "
                                         r"NullSpaceLaplace\(checkpoint=...\), not as ckpt_path"):
        module.on_load_checkpoint({"state_dict": torch.load(tmp_path / "map.ckpt")["state_dict"]})


def test_a_loader_without_a_length_is_refused() -> None:
    _, x, y = make_data()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    with pytest.raises(ValueError, match="has no length .* --trainer.limit_train_batches N"):
        make_trainer(1).fit(NullSpaceLaplace(make_model(), num_samples=4), DataLoader(Stream(), batch_size=4))


def test_bf16_parameters_get_float32_samples_in_the_kernel() -> None:
    """A bf16 network's samples are float32 and J_b^T lam is taken in float32 (bf16 samples were 2e-2 off P eps,
    3e-3 off the kernel)."""
    _, x, y = make_data()
    model = make_model().to(torch.bfloat16)
    module = NullSpaceLaplace(model, num_samples=4, accelerate=False)
    assert module.projections.samples.dtype == torch.float32
    bf16 = DataLoader(TensorDataset(x.to(torch.bfloat16), y), batch_size=4)
    make_trainer(40).fit(module, train_dataloaders=bf16)
    jacobian = module.function.jacobian(x[-4:].to(torch.bfloat16), y[-4:]).float()
    samples = module.projections.samples
    assert ((samples @ jacobian.T).norm(dim=1) / samples.norm(dim=1)).max() < 1e-5


def test_under_bf16_true_the_samples_stay_float32_in_the_kernel() -> None:
    """``precision="bf16-true"`` casts the whole module, the projected samples with it (bf16 samples: 1.6e-4 off
    the kernel against 1e-8): they stay float32, as for a network built in bf16."""
    _, x, y = make_data()
    module = NullSpaceLaplace(make_model().float(), num_samples=4, accelerate=False, scale="line_search")
    make_trainer(40, precision="bf16-true").fit(module, DataLoader(TensorDataset(x.float(), y), batch_size=4))
    assert module.function.theta().dtype == torch.bfloat16
    assert module.projections.samples.dtype == module.scale_value.dtype == torch.float32
    jacobian = module.function.jacobian(x[-4:].to(torch.bfloat16), y[-4:]).float()
    samples = module.projections.samples
    assert ((samples @ jacobian.T).norm(dim=1) / samples.norm(dim=1)).max() < 1e-5


def test_without_the_gram_cache_the_samples_are_the_same() -> None:
    loader, _, _ = make_data()
    cached, uncached = (NullSpaceLaplace(make_model(), num_samples=4, cache_gram=flag) for flag in (True, False))
    for module in (cached, uncached):
        make_trainer(3).fit(module, train_dataloaders=loader)
    assert len(cached.projections._factors) == 5 and len(uncached.projections._factors) == 0
    assert torch.equal(cached.projections.samples, uncached.projections.samples)
