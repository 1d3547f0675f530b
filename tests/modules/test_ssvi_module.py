"""SSVI through a real Trainer on a tiny CNN: exact nnz and masks after every step and update, the update schedule,
frozen parameters on update iterations, the KL warm-up, bitwise resume, a timm ResNet, errors."""

import math

import pytest
import timm
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.inference.point_mass import PointMass
from lightning_bayes.inference.sparse_gaussian import SparseGaussian
from lightning_bayes.inference.ssvi_topology import drop_fraction, update_support
from lightning_bayes.modules import ssvi as ssvi_module
from lightning_bayes.modules.ssvi import SSVI
from lightning_bayes.predictive import CategoricalPredictive

pytestmark = pytest.mark.usefixtures("single_thread")

EPOCHS, BATCHES, EVERY, DENSITY = 4, 3, 2, 0.25
TOTAL = EPOCHS * BATCHES
END = math.floor(0.75 * TOTAL)  # 9: updates at iterations 2, 4, 6, 8


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(96, 3))


def loader(shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle)


def ssvi(**overrides) -> SSVI:
    options = {
        "density": DENSITY, "update_every": EVERY, "drop_fraction": 0.3, "dataset_size": 24, "kl_weight": 0.01,
        "kl_warmup_epochs": EPOCHS / 2, "num_samples": 2,
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    }
    return SSVI(tiny_cnn(), **{**options, **overrides})


def trainer(epochs: int, callbacks=(), **options) -> Trainer:
    defaults = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0}
    return Trainer(max_epochs=epochs, callbacks=list(callbacks), **{**defaults, **options})


def families(module: SSVI) -> list[SparseGaussian]:
    return [layer.weight for layer in module.variational_layers]


class Recorder(Callback):
    """State before and after every training iteration, gradients before every optimiser step, KL scale per epoch;
    asserts exact nnz and zeros off the masks (values, momentum) after every iteration."""

    def __init__(self) -> None:
        self.snapshots, self.kl_scales, self.checked_steps = [], [], 0

    def on_train_epoch_start(self, trainer, module) -> None:
        self.kl_scales.append(module.kl_scale())

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = {name: value.detach().clone() for name, value in module.state_dict().items()}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        for family in module.sparse_families:
            off = ~family.mask
            assert (family.loc.grad[off] == 0).all() and (family.raw_scale.grad[off] == 0).all()
        self.checked_steps += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        for family in families(module):
            density = DENSITY if family in module.sparse_families else 1.0
            assert family.num_active == round(density * family.mask.numel())
            off = ~family.mask
            assert (family.loc[off] == 0).all() and (family.raw_scale[off] == 0).all()
            for parameter in (family.loc, family.raw_scale):
                assert (optimizer.state[parameter]["momentum_buffer"][off] == 0).all()
        after = {name: value.detach().clone() for name, value in module.state_dict().items()}
        self.snapshots.append((self.before, after))


def test_exact_sparsity_schedule_and_frozen_parameters_on_updates_through_a_trainer():
    module, recorder = ssvi(), Recorder()
    trainer(EPOCHS, [recorder], limit_val_batches=0).fit(module, loader())
    layers = module.variational_layers
    assert [layer.weight in module.sparse_families for layer in layers] == [False, True, True]  # first conv dense
    assert all(isinstance(layer.bias, PointMass) for layer in layers)
    assert len(recorder.snapshots) == TOTAL and int(module.iteration) == TOTAL
    assert recorder.checked_steps == TOTAL - 4  # no optimiser step on the four update iterations
    prefixes = [f"backbone.{name}.weight" for name in module.variational_layer_names]
    updates, swapped = [], 0
    for t, (before, after) in enumerate(recorder.snapshots, start=1):
        changed = [int((before[f"{p}.mask"] != after[f"{p}.mask"]).sum()) for p in prefixes]
        if not (t % EVERY == 0 and t < END):
            assert changed == [0, 0, 0], t
            continue
        updates.append(t)
        moved = {name for name in after if not torch.equal(before[name], after[name])}
        assert all(name.startswith(tuple(prefixes[1:])) or name == "iteration" for name in moved), moved
        for prefix, count, layer in zip(prefixes[1:], changed[1:], layers[1:]):
            mask_before, mask_after = before[f"{prefix}.mask"], after[f"{prefix}.mask"]
            active = int(mask_before.sum())
            assert count == 2 * round(drop_fraction(t, END, 0.3) * active)  # dropped plus grown
            swapped += count
            kept, grown = mask_before & mask_after, mask_after & ~mask_before
            for attribute in ("loc", "raw_scale"):  # kept weights do not move on an update iteration
                assert torch.equal(after[f"{prefix}.{attribute}"][kept], before[f"{prefix}.{attribute}"][kept])
            assert (after[f"{prefix}.loc"][grown] == 0).all()
            expected_rho = before[f"{prefix}.raw_scale"][kept].mean()
            assert torch.allclose(after[f"{prefix}.raw_scale"][grown], expected_rho.expand(int(grown.sum())), rtol=0, atol=1e-7)
    assert updates == [2, 4, 6, 8] and swapped > 0
    # KL weight beta_t / N = 0.01 min(2 epoch / EPOCHS, 1) / N at epochs 0, EPOCHS/4, EPOCHS/2 and the last
    assert recorder.kl_scales == pytest.approx([0.01 * min(2 * e / EPOCHS, 1.0) / 24 for e in range(EPOCHS)], rel=1e-15)
    groups = trainer_optimizer_groups(module)
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 5e-4


def trainer_optimizer_groups(module: SSVI) -> list[dict]:
    return module.trainer.optimizers[0].param_groups


class StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module) -> None:
        trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


def test_a_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path):
    # validation samples every epoch (and in the resumed run's sanity check) from the same random stream
    validating = {"limit_val_batches": 1, "num_sanity_val_steps": 1}
    full = ssvi()
    trainer(EPOCHS, **validating).fit(full, loader(), loader(shuffle=False))
    first = ssvi()
    interrupted = trainer(EPOCHS, [StopAfter(epochs=2)], **validating)  # the same schedule, killed halfway
    interrupted.fit(first, loader(), loader(shuffle=False))
    assert int(first.iteration) == 2 * BATCHES
    interrupted.save_checkpoint(tmp_path / "half.ckpt")
    torch.manual_seed(123)  # whatever happens to the random stream in between
    resumed = ssvi(seed=7)  # different initial supports: the checkpoint must restore them
    trainer(EPOCHS, **validating).fit(resumed, loader(), loader(shuffle=False), ckpt_path=tmp_path / "half.ckpt")
    expected, actual = full.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    full_state = full.trainer.optimizers[0].state_dict()["state"]
    resumed_state = resumed.trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(full_state[k]["momentum_buffer"], resumed_state[k]["momentum_buffer"]) for k in full_state)


class NoiseOnUpdates(Callback):
    """Whether the layers drew noise in each forward of the update iterations (``module.iteration`` is already t)."""

    def __init__(self) -> None:
        self.noise: list[bool] = []

    def on_train_start(self, trainer, module) -> None:
        def record(layer, inputs, output):
            t = int(module.iteration)
            if t % EVERY == 0 and t < END and torch.is_grad_enabled():
                self.noise.append(layer.noise)

        module.variational_layers[-1].register_forward_hook(record)


@pytest.mark.parametrize("noise_free", [False, True])
def test_growth_gradient_is_taken_with_or_without_noise(noise_free):
    module, recorder = ssvi(grow_noise_free=noise_free), NoiseOnUpdates()
    trainer(EPOCHS, [recorder], limit_val_batches=0).fit(module, loader())
    assert recorder.noise == [not noise_free] * 4  # iterations 2, 4, 6, 8
    assert all(layer.noise for layer in module.variational_layers)


def test_density_and_counted_flops_are_logged():
    module = ssvi()
    fit = trainer(1, limit_val_batches=0)
    fit.fit(module, loader())
    # conv1 dense 36 weights at 6x6, conv2 54 of 216 at 4x4, linear 72 of 288: local reparameterisation doubles both
    sparse, dense = 36 * 36 + 54 * 16 + 72, 36 * 36 + 216 * 16 + 288
    end = math.floor(0.75 * BATCHES)  # one epoch: 3 iterations, end 2, no update (t = 2 is not < 2)
    assert end == 2
    assert fit.callback_metrics["ssvi/flops_ratio"].item() == pytest.approx(sparse / dense, rel=1e-6)
    assert fit.callback_metrics["ssvi/density"].item() == pytest.approx((36 + 54 + 72) / (36 + 216 + 288), rel=1e-6)


def test_timm_resnet_backbone_keeps_batchnorm_and_biases_deterministic_and_the_stem_dense():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    module = SSVI(backbone, density=0.1, dataset_size=8, num_samples=2)
    layers = module.variational_layers
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in backbone.modules())  # every conv and linear converted
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert layers[0].weight not in module.sparse_families and layers[0].weight.num_active == layers[0].weight.mask.numel()
    assert all(f.num_active == round(0.1 * f.mask.numel()) for f in module.sparse_families)
    assert layers[-1].weight in module.sparse_families and isinstance(layers[-1].bias, PointMass)  # the head is sparse
    assert all(layer.bias is None or isinstance(layer.bias, PointMass) for layer in layers)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    trainer(1, limit_val_batches=0).fit(module, DataLoader(TensorDataset(x, y), batch_size=2))
    predictive = module.predictive(x)
    assert isinstance(predictive, CategoricalPredictive) and predictive.logits.shape == (2, 4, 4)
    assert torch.isfinite(predictive.logits).all()


@pytest.mark.parametrize("argument, value", [
    ("density", 0.0), ("density", 1.5), ("update_every", 0), ("drop_fraction", 1.0),
    ("update_end_fraction", 1.2), ("score", "magnitude"), ("grow_rho", "max"), ("mean_init", "kaiming"),
])
def test_bad_arguments_name_themselves(argument, value):
    with pytest.raises(ValueError, match=argument):
        ssvi(**{argument: value})


def test_growth_gradients_under_accumulation_are_those_of_the_whole_batch(monkeypatch):
    """Update at iteration 1 (the initial weights, noise off): two accumulated micro-batches of 4 give the growth
    gradients of one batch of 8, not those of the last micro-batch alone."""
    captured: list[torch.Tensor] = []

    def spy(family, dense_gradient, *args, **kwargs):
        captured.append(dense_gradient.clone())
        return update_support(family, dense_gradient, *args, **kwargs)

    monkeypatch.setattr(ssvi_module, "update_support", spy)
    first_update = {}
    for batch_size, accumulate in ((8, 1), (4, 2)):
        captured.clear()
        module = ssvi(update_every=1, grow_noise_free=True)
        data = DataLoader(loader(shuffle=False).dataset, batch_size=batch_size)
        trainer(1, limit_val_batches=0, accumulate_grad_batches=accumulate).fit(module, data)
        first_update[accumulate] = captured[: len(module.sparse_families)]
    for whole, accumulated in zip(first_update[1], first_update[2]):
        torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-7)


def test_a_fit_without_a_last_step_is_refused_by_name():
    """The schedule needs the total steps (math.floor of an infinite estimate was an OverflowError)."""
    with pytest.raises(ValueError, match=r"^SSVI's support schedule .* has no last step: set trainer max_steps"):
        trainer(-1, max_time={"seconds": 30}).fit(ssvi(), loader())


def test_measuring_layer_positions_gives_every_submodule_its_own_mode_back():
    """The noise-free measuring pass put the backbone back with ``train(mode)``, setting a submodule kept in eval
    mode (a frozen part) to training mode with the rest."""
    module = ssvi().train()
    kept = module.backbone[1]
    kept.eval()
    modes = {name: m.training for name, m in module.named_modules()}
    module._measure_positions(torch.randn(2, 1, 8, 8))
    assert {name: m.training for name, m in module.named_modules()} == modes and not kept.training
