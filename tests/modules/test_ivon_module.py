"""IVONModule through the Trainer: S closure calls per step, the guards for a gradient scaler and gradient
accumulation, bitwise resumption, sigma^2 in checkpoints, and the predictive as an explicit average over draws."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import functools
import re
import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader

from lightning_bayes.modules.ivon import IVONModule
from lightning_bayes.optim import IVON

from toy_classification import blobs, classifier

pytestmark = pytest.mark.usefixtures("single_thread")


def loader() -> DataLoader:
    return DataLoader(blobs(), batch_size=8)


def ivon_factory(params, ess: float) -> IVON:
    return IVON(params, ess, lr=0.2, hess_init=0.5, beta2=0.99, weight_decay=1e-2, mc_samples=3, seed=5)


def make_trainer(epochs: int = 1, root: Path | None = None, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=root is not None, default_root_dir=root, num_sanity_val_steps=0, **kwargs,
    )


class CountingIVON(IVONModule):
    """Records the flat parameters each training_step sees."""

    def __init__(self, **kwargs) -> None:
        super().__init__(classifier(), optimizer=ivon_factory, dataset_size=24, **kwargs)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(torch.cat([p.detach().reshape(-1).clone() for p in self.parameters()]))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_each_step_calls_training_step_at_mc_samples_draws(precision: str) -> None:
    module = CountingIVON()
    start = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()]).float()
    make_trainer(fast_dev_run=1, precision=precision).fit(module, loader())
    assert len(module.seen) == 3  # one batch, mc_samples = 3
    draws = torch.stack(module.seen).float()
    assert all(not torch.equal(draws[i], draws[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    std = (1 / (24 * (0.5 + 1e-2))) ** 0.5  # sigma of the first step: h = h_0, ess = 24 examples
    assert ((draws - start).std() / std).item() == pytest.approx(1.0, rel=0.25)  # 3 x 59 draws
    state = module.trainer.optimizers[0].state[module.backbone[0].weight]
    assert state["hess"].dtype == (torch.float32 if precision == "bf16-true" else torch.float64)
    assert ("mean" in state) == (precision == "bf16-true")
    assert module.posterior_variance.dtype == torch.float64  # not cast to bf16 with the module under bf16-true


def test_weights_whose_posterior_std_is_below_bf16_resolution_are_warned_about() -> None:
    """sigma = 1 / sqrt(ess (h + delta)) at ess = 1e8 is about 1e-4: below half of bf16's spacing at most weights,
    where a draw rounds back to the mean and IVON's Hessian estimate sees no noise. ess = 24 is far above it; float32
    weights (bf16-mixed) are not concerned."""
    for ess, precision, warned in ((1e8, "bf16-true", True), (24, "bf16-true", False), (1e8, "bf16-mixed", False)):
        factory = functools.partial(lambda params, _, ess: ivon_factory(params, ess), ess=ess)  # this ess, not N's
        module = IVONModule(classifier(), optimizer=factory, dataset_size=24)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(2, precision=precision).fit(module, loader())
        messages = [str(w.message) for w in caught if "below half their dtype's spacing" in str(w.message)]
        assert len(messages) == warned, (ess, precision)
        share = module.trainer.optimizers[0].below_resolution()
        assert (share >= 0.1) == warned and (share == 0.0 or precision == "bf16-true")
        if warned:  # the share at the first epoch's end
            assert re.match(r"IVON under precision='bf16-true': the posterior std of \d+% of the weights", messages[0])


def test_gradient_scaler_is_refused() -> None:
    """Lightning turns precision='16-mixed' into bf16 on a CPU; the fp16 plugin with its scaler is what a GPU gets."""
    trainer = make_trainer(fast_dev_run=1, plugins=[MixedPrecision("16-mixed", device="cpu")])
    with pytest.raises(ValueError, match=r"precision='16-mixed'.*gradient scaler.*'bf16-mixed'"):
        trainer.fit(IVONModule(classifier(), optimizer=ivon_factory, dataset_size=24), loader())


def test_gradient_accumulation_is_refused() -> None:
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2.*larger batch.*mc_samples"):
        make_trainer(fast_dev_run=2, accumulate_grad_batches=2).fit(
            IVONModule(classifier(), optimizer=ivon_factory, dataset_size=24), loader()
        )


def test_fsdp1_on_several_processes_is_refused() -> None:
    """FSDP1 needs CUDA, so the module meets a stand-in for the Trainer (the check reads only these two)."""
    module = IVONModule(classifier(), optimizer=ivon_factory, dataset_size=24)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(ValueError, match=r"cannot train under FSDPStrategy on 2 processes.*'ddp'.*FSDP2"):
        module.on_fit_start()


def test_optimizer_must_be_ivon() -> None:
    module = IVONModule(classifier(), optimizer=lambda params, ess: torch.optim.SGD(params, lr=0.1), dataset_size=24)
    with pytest.raises(ValueError, match="must build a lightning_bayes.optim.IVON.*got SGD"):
        make_trainer(fast_dev_run=1).fit(module, loader())


def test_resumed_run_is_bitwise_identical(tmp_path: Path) -> None:
    """Validation draws from torch's global generator in between; the training noise does not depend on it."""
    uninterrupted = IVONModule(classifier(), optimizer=ivon_factory, num_samples=2, dataset_size=24)
    make_trainer(epochs=3).fit(uninterrupted, loader(), loader())
    first = IVONModule(classifier(), optimizer=ivon_factory, num_samples=2, dataset_size=24)
    make_trainer(epochs=1, root=tmp_path).fit(first, loader(), loader())
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    resumed = IVONModule(classifier(), optimizer=ivon_factory, num_samples=2, dataset_size=24)
    torch.manual_seed(123)  # a different global stream
    make_trainer(epochs=3).fit(resumed, loader(), loader(), ckpt_path=checkpoint)
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    ours, theirs = uninterrupted.trainer.optimizers[0], resumed.trainer.optimizers[0]
    assert ours.steps == theirs.steps == 9
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(ours.state[p]["hess"], theirs.state[q]["hess"])
    torch.testing.assert_close(uninterrupted.posterior_variance, resumed.posterior_variance, rtol=0, atol=0)


def test_a_resumed_run_validates_with_the_unstopped_runs_draws(tmp_path: Path) -> None:
    """IVON without a seed draws one from torch's global generator when it is built, which a resumed fit does after
    loading the checkpoint (and its global generators): the generators are restored again when training starts, so
    the predictive's draws at validation (global generator) are the unstopped run's."""

    def unseeded(params, ess: float) -> IVON:
        return IVON(params, ess, lr=0.2, hess_init=0.5, mc_samples=3)

    def fit(epochs: int, root: Path | None, ckpt_path: Path | None = None) -> list[float]:
        torch.manual_seed(0)
        module = IVONModule(classifier(), optimizer=unseeded, num_samples=4, dataset_size=24)
        losses: list[float] = []

        class Record(Callback):
            def on_validation_epoch_end(self, trainer, pl_module) -> None:
                losses.append(float(trainer.callback_metrics["val/nll"]))

        trainer = make_trainer(epochs=epochs, root=root, callbacks=[Record()])
        trainer.fit(module, loader(), loader(), ckpt_path=ckpt_path)
        return losses

    straight = fit(3, None)
    fit(1, tmp_path)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    assert fit(3, None, checkpoint) == straight[1:]


def test_checkpoint_carries_sigma2_and_the_predictive_averages_draws(tmp_path: Path) -> None:
    module = IVONModule(classifier(), optimizer=ivon_factory, num_samples=4, dataset_size=100, kl_weight=0.5)
    with pytest.raises(RuntimeError, match="no posterior variance yet"):
        module.predictive(blobs()[:4][0])
    make_trainer(epochs=2, root=tmp_path).fit(module, loader())
    optimizer = module.trainer.optimizers[0]
    assert optimizer.param_groups[0]["ess"] == 200.0  # dataset_size / kl_weight
    expected = torch.cat([(1 / (200.0 * (optimizer.state[p]["hess"] + 1e-2))).reshape(-1) for p in module.parameters()])
    (path,) = tmp_path.rglob("*.ckpt")
    loaded = IVONModule.load_from_checkpoint(path, backbone=classifier(seed=9), optimizer=ivon_factory)
    torch.testing.assert_close(loaded.posterior_variance, expected, rtol=0, atol=0)
    for p, q in zip(module.parameters(), loaded.parameters()):
        assert torch.equal(p, q)

    x = blobs()[:5][0]
    torch.manual_seed(0)
    logits = loaded.predictive(x, num_samples=3).logits
    torch.manual_seed(0)  # the same draws by hand: theta = m + sigma * n, n one vector over the parameters in order
    means = [p.detach().clone() for p in loaded.parameters()]
    mean, sizes = torch.cat([m.reshape(-1) for m in means]), [m.numel() for m in means]
    by_hand = []
    for _ in range(3):
        flat = mean + torch.randn(mean.shape, dtype=mean.dtype) * expected.sqrt()
        theta = [t.view_as(m) for t, m in zip(flat.split(sizes), means)]
        hidden = torch.tanh(x @ theta[0].T + theta[1])
        by_hand.append(hidden @ theta[2].T + theta[3])
    torch.testing.assert_close(logits, torch.stack(by_hand), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(p, m) for p, m in zip(loaded.parameters(), means))  # the mean is restored

    loaded.mean_prediction = True
    torch.testing.assert_close(loaded.predictive(x).logits, loaded(x).unsqueeze(0), rtol=0, atol=0)


def test_params_selector_freezes_the_rest() -> None:
    module = IVONModule(classifier(), params="backbone.2.*", optimizer=ivon_factory, dataset_size=24)
    assert module.posterior_names == ["backbone.2.weight", "backbone.2.bias"]
    assert not module.backbone[0].weight.requires_grad
    assert module.posterior_variance.shape == (8 * 3 + 3,)
    first = module.backbone[0].weight.detach().clone()
    make_trainer(fast_dev_run=1).fit(module, loader())
    assert torch.equal(module.backbone[0].weight, first)
    assert list(module.trainer.optimizers[0].state) == [module.backbone[2].weight, module.backbone[2].bias]


def test_plain_loaders_need_dataset_size() -> None:
    with pytest.raises(ValueError, match="needs the training-set size N when it builds IVON.*pass dataset_size=N"):
        make_trainer(fast_dev_run=1).fit(IVONModule(classifier(), optimizer=ivon_factory), loader())


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [("dataset_size", 0, "dataset_size must be None or a positive int; got 0"),
     ("kl_weight", 0.0, r"kl_weight must be a finite number > 0 .*; got 0.0"),
     ("params", "nothing*", "params='nothing\\*' matched no parameter")],
)
def test_argument_errors(argument: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IVONModule(classifier(), **{argument: value})


def test_leaving_out_a_layer_peft_trains_afresh_is_refused() -> None:
    """params="lora" on a peft SEQ_CLS model froze its randomly initialised classification head (peft's
    ``modules_to_save``) silently: IVON trained the adapters on top of a random head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    with pytest.raises(ValueError, match=r"params='lora' leaves out layers peft initialised afresh .*modules_to_save"):
        IVONModule(model, optimizer=ivon_factory, params="lora", dataset_size=24)
    module = IVONModule(model, optimizer=ivon_factory, params=["lora", "*modules_to_save*"], dataset_size=24)
    assert any("modules_to_save" in name for name in module.posterior_names)


def test_the_default_optimizer_is_ivon_with_lr_0_1_and_the_given_ess() -> None:
    """IVONModule's default factory: IVON with the library defaults, lr = 0.1 (documented), ess passed through."""
    from lightning_bayes.modules.ivon import default_ivon

    optimizer = default_ivon([torch.nn.Parameter(torch.zeros(3))], 240.0)
    assert isinstance(optimizer, IVON)
    assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.param_groups[0]["ess"] == 240.0
