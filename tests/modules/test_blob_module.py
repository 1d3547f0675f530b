"""BLoB's two-optimiser step against a hand computation, its KL cycle weights, resumption, and errors. Float64.

The hand computation writes the first layer of the toy MLP out densely (mean and variance of the local
reparameterisation, with the noise the module drew), takes the NLL gradient by autograd, one AdamW step on
every parameter but ``rho``, then the SGD step on the closed-form KL gradient
``dKL/dM = M / beta^2``, ``dKL/drho = (-1 / Omega + Omega / beta^2) 2 rho`` (``Omega = rho^2``) plus ``rho``'s NLL
gradient.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_bayes.datamodules import EpochShuffle
from lightning_bayes.modules import BLoB
from lightning_bayes.inference.kl_cycle import cycle_weight
from lightning_bayes.inference.variational_layers import total_kl

from toy_classification import blobs, classifier
from resumption import STOPS, assert_resumption_is_exact

pytestmark = pytest.mark.usefixtures("single_thread")
BETA, LR, KL_LR = 0.7, 0.05, 0.3


def make_trainer(epochs: int = 1, root: Path | None = None, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=root is not None, default_root_dir=root, num_sanity_val_steps=0, **kwargs,
    )


def make_blob(**kwargs) -> BLoB:
    options = {"params": "0.*", "prior_scale": BETA, "init_eps": 0.3, "kl_lr": KL_LR,
               "optimizer": lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.01)} | kwargs
    return BLoB(classifier(), **options)


def test_cycle_weights_are_the_geometric_sequence():
    for length in (1, 2, 5, 40):
        exact = [Fraction(2**i, 2 ** (length + 1) - 1) for i in range(1, length + 1)]
        assert [cycle_weight(step, length) for step in range(2 * length)] == pytest.approx([float(w) for w in exact] * 2, rel=1e-14)
        assert math.isclose(sum(cycle_weight(step, length) for step in range(length)), float(sum(exact)), rel_tol=1e-14)
    assert math.isclose(cycle_weight(4999, 5000), 0.5, rel_tol=1e-12) and cycle_weight(0, 5000) == 0.0
    with pytest.raises(ValueError, match="cycle_length"):
        cycle_weight(3, 0)


def test_one_step_equals_the_hand_computed_adamw_then_sgd_on_the_kl():
    module = make_blob(kl_reweighting=False)  # w = 1 / K, K = 3 batches per epoch
    layer, head = module.backbone[0], module.backbone[2]
    start = {name: value.detach().clone() for name, value in module.named_parameters()}
    drawn = {}

    def capture(_, inputs, output):  # the standard normal draws of the local reparameterisation
        (x,) = inputs
        mean = F.linear(x, layer.weight.mean, layer.bias.mean)
        std = F.linear(x.square(), layer.weight.scale.square(), layer.bias.scale.square()).sqrt()
        drawn.setdefault("eps", ((output - mean) / std).detach())

    layer.register_forward_hook(capture)
    data = blobs(24)
    make_trainer(max_steps=2).fit(module, DataLoader(data, batch_size=8))  # 2 optimiser steps = 1 batch

    p = {name: value.clone().requires_grad_() for name, value in start.items()}
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    w_mean, w_rho, b_mean, b_rho = (p[f"backbone.0.{k}"] for k in ("weight.mean", "weight.raw_scale", "bias.mean", "bias.raw_scale"))
    mean = x @ w_mean.T + b_mean
    std = ((x**2) @ (w_rho**2).square().T + (b_rho**2).square()).sqrt()
    logits = torch.tanh(mean + std * drawn["eps"]) @ p["backbone.2.weight"].T + p["backbone.2.bias"]
    F.cross_entropy(logits, y).backward()
    adam_names = ["backbone.0.weight.mean", "backbone.0.bias.mean", "backbone.2.weight", "backbone.2.bias"]
    adam = {name: p[name].detach().clone().requires_grad_() for name in adam_names}
    for name in adam_names:
        adam[name].grad = p[name].grad
    torch.optim.AdamW(list(adam.values()), lr=LR, weight_decay=0.01).step()
    weight = 1 / 3
    expected = {name: adam[name].detach() for name in adam_names}
    for kind in ("weight", "bias"):
        m = adam[f"backbone.0.{kind}.mean"].detach()
        rho = p[f"backbone.0.{kind}.raw_scale"]
        omega = rho.detach() ** 2
        expected[f"backbone.0.{kind}.mean"] = m - KL_LR * weight * m / BETA**2
        kl_rho = (-1 / omega + omega / BETA**2) * 2 * rho.detach()
        expected[f"backbone.0.{kind}.raw_scale"] = rho.detach() - KL_LR * (rho.grad + weight * kl_rho)
    actual = dict(module.named_parameters())
    assert head is module.backbone[2] and set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].detach(), value, rtol=1e-10, atol=1e-12, msg=name)



def test_with_kl_reweighting_the_kl_gradient_is_scaled_by_the_cycle_weight():
    """At step 0 of a K = 2 cycle (w_0 = 2/7, not 1/K) the KL optimiser's gradient beyond the NLL's is w_0 dKL."""
    module = make_blob(kl_reweighting=True)
    module.cycle_length = lambda: 2  # type: ignore[method-assign]  # a short cycle: w_t = 2^(t+1) / 7
    grads: list[dict[int, torch.Tensor]] = []
    expected: dict[int, torch.Tensor] = {}

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            parameters = pl_module._kl_parameters()
            if not grads:  # the NLL optimiser's step: the rhos keep their NLL gradient, the means' are zeroed after it
                stepped = {id(q) for group in optimizer.param_groups for q in group["params"]}
                grads.append({id(q): torch.zeros_like(q) if id(q) in stepped else q.grad.clone() for q in parameters})
            else:
                grads.append({id(q): q.grad.clone() for q in parameters})
            if len(grads) == 2:  # the KL optimiser's step, at the updated means
                with torch.enable_grad():
                    kl = torch.autograd.grad(total_kl(pl_module.backbone), parameters)
                expected.update({id(q): g for q, g in zip(parameters, kl)})

    make_trainer(max_steps=2, callbacks=[Record()]).fit(module, DataLoader(blobs(24), batch_size=8))
    weight = cycle_weight(0, module._cycle_length)
    assert module._cycle_length == 2 and weight == pytest.approx(2 / 7, rel=1e-15)
    assert len(grads) == 2 and len(expected) == 4
    for key, gradient in expected.items():  # the NLL's part (of rho) is the one it had at the NLL optimiser's step
        torch.testing.assert_close(grads[1][key] - grads[0][key], weight * gradient, rtol=1e-6, atol=0)


def test_the_kl_weight_follows_the_cycle_over_training():
    seen: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            logged = trainer.callback_metrics
            seen.append(float(logged["train/kl_cycle_weight"]))
            # the monitored loss is the negative ELBO per example: NLL + KL / N
            assert float(logged["train/loss"]) == pytest.approx(float(logged["train/nll"] + logged["train/kl"] / 24))

    module = make_blob(cycle_exponent=40.0)
    # the objective's parts reach callback_metrics at the steps whose logs are written: every step here
    make_trainer(4, callbacks=[Record()], log_every_n_steps=1).fit(module, DataLoader(blobs(24), batch_size=8))
    length = int(100 * 24 ** (math.pi / 40) / 8)  # floor(100 N^(pi/gamma) / B) = 16
    assert module._cycle_length == length == 16
    assert seen == pytest.approx([cycle_weight(t, length) for t in range(12)], rel=1e-7)  # logged as float32
    steep = make_blob(cycle_exponent=3.0)  # K = floor(100 * 24^(pi/3) / 8) = floor(348.6)
    make_trainer(max_steps=1).fit(steep, DataLoader(blobs(24), batch_size=8))
    assert steep._cycle_length == int(100 * 24 ** (math.pi / 3) / 8) == 348
    overfit, data = make_blob(cycle_exponent=3.0), blobs(24)  # Lightning unshuffles a datamodule's loader through
    loader = StatefulDataLoader(data, batch_size=8, sampler=EpochShuffle(data))  # a batch sampler (batch_size None)
    make_trainer(overfit_batches=2).fit(overfit, loader)
    assert overfit._cycle_length == 348  # it was "needs the training DataLoader's batch_size ... got None"


def test_omega_starts_between_half_eps_squared_and_eps_squared():
    # rho ~ U[eps / sqrt(2), eps] and Omega = rho^2 (BLoB's parameterisation of A's standard deviation)
    module = make_blob(init_eps=0.3)
    for scale in (module.backbone[0].weight.scale, module.backbone[0].bias.scale):
        assert (scale >= 0.09 / 2 - 1e-9).all() and (scale <= 0.09 + 1e-9).all()


def test_omega_grows_under_the_kl_optimiser_and_stays_below_the_prior():
    module = make_blob(init_eps=0.05, prior_scale=0.5, kl_lr=0.05, kl_reweighting=False)
    before = module.backbone[0].weight.scale.detach().clone()
    make_trainer(20).fit(module, DataLoader(blobs(24), batch_size=8))
    after = module.backbone[0].weight.scale.detach()
    assert (after > 5 * before).all() and (after < 0.5).all(), (before, after)


@pytest.mark.parametrize("stop", STOPS)
def test_resume_gives_the_uninterrupted_result(tmp_path: Path, stop: str):
    def run(epochs: int, root: Path, ckpt: str | None, callbacks: list[Callback]) -> BLoB:
        torch.manual_seed(0)
        module = make_blob(lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
        trainer = make_trainer(epochs, root=root, callbacks=callbacks)
        data = blobs()
        trainer.fit(module, StatefulDataLoader(data, batch_size=8, sampler=EpochShuffle(data)), ckpt_path=ckpt)
        return module

    resumed = assert_resumption_is_exact(run, tmp_path, epochs=3, stop=stop)
    assert resumed.optimizers()[1].param_groups[0]["lr"] == KL_LR * 0.5**3


def test_mean_prediction_is_the_deterministic_network():
    module = make_blob()
    x = blobs()[:5][0]
    layer = module.backbone[0]
    hidden = torch.tanh(F.linear(x, layer.weight.mean, layer.bias.mean))
    expected = F.linear(hidden, module.backbone[2].weight, module.backbone[2].bias)
    module.mean_prediction = True
    torch.testing.assert_close(module.predictive(x).logits[0], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"init_eps": 0.0}, "init_eps"), ({"kl_lr": -1.0}, "kl_lr"), ({"cycle_exponent": 0.0}, "cycle_exponent"),
     ({"gradient_clip_val": 0.0}, "gradient_clip_val"), ({"params": "9.*"}, "params"),
     ({"scheduler_interval": "batch"}, "scheduler_interval")],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_blob(**kwargs)


def test_fp16_loss_scaling_and_half_precision_parameters_are_refused_by_name():
    module = make_blob()
    module._trainer = SimpleNamespace(precision="16-mixed")  # a CPU Trainer cannot be built with 16-mixed
    with pytest.raises(ValueError, match="precision='16-mixed'"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(precision="bf16-true")  # the variational parameters in bf16 (spec: fp32)
    with pytest.raises(ValueError, match=r"precision='bf16-true' is not supported \(it would hold the variational "
                       "parameters in half precision.*; use '32-true', '64-true' or 'bf16-mixed'"):
        module.on_fit_start()
    for precision in ("bf16-mixed", "32-true", "64-true"):
        module._trainer = SimpleNamespace(precision=precision)
        module.on_fit_start()


@pytest.mark.parametrize(("interval", "steps"), [("epoch", 2), ("step", 2 * 4)])  # 2 epochs of 4 batches
def test_the_schedulers_step_every_epoch_or_every_step(interval: str, steps: int):
    """Both optimisers' schedulers advance once per epoch, or once per training step (the reference's per-step
    warm-up and decay)."""
    module = make_blob(
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
        scheduler_interval=interval,
    )
    make_trainer(2).fit(module, train_dataloaders=DataLoader(blobs(), batch_size=len(blobs()) // 4))
    nll_optimizer, kl_optimizer = module.optimizers()
    assert nll_optimizer.param_groups[0]["lr"] == pytest.approx(LR / (1 + steps))
    assert kl_optimizer.param_groups[0]["lr"] == pytest.approx(KL_LR / (1 + steps))
