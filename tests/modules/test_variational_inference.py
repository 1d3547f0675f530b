"""VariationalInference through the Trainer: the objective term by term, the KL warm-up formula, convergence to
the optimal mean-field posterior of Bayesian linear regression (closed form), the predictive, the Bernstein
family, exact resumption, and errors. Float64."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_bayes.datamodules import EpochShuffle
from lightning_bayes.inference.likelihoods import GaussianLikelihood
from lightning_bayes.inference.variational_layers import VariationalLayer
from lightning_bayes.modules import VariationalInference
from lightning_bayes.predictive import CategoricalPredictive

from toy_classification import blobs, classifier
from resumption import STOPS, assert_resumption_is_exact

pytestmark = pytest.mark.usefixtures("single_thread")


def make_trainer(epochs: int = 1, root: Path | None = None, callbacks: list | None = None, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=root is not None, default_root_dir=root, callbacks=callbacks or [],
        num_sanity_val_steps=0, **kwargs,
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("train_samples", [1, 3])
def test_loss_is_mean_nll_plus_scaled_closed_form_kl(train_samples: int):
    module = VariationalInference(classifier(), init_scale=0.1, prior_scale=0.7, dataset_size=50, kl_weight=0.3,
                                  train_samples=train_samples)
    x, y = blobs()[:10]
    torch.manual_seed(3)
    loss = module.training_step((x, y), 0)
    torch.manual_seed(3)  # the same local-reparameterisation noise, draw by draw
    nll = sum(F.cross_entropy(module.backbone(x), y) for _ in range(train_samples)) / train_samples
    kl, prior = 0.0, torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    for layer in module.variational_layers:
        for family in (layer.weight, layer.bias):
            q = torch.distributions.Normal(family.mean, family.scale)
            kl = kl + torch.distributions.kl_divergence(q, prior).sum()
    assert module.variational_layer_names == ["0", "2"]
    torch.testing.assert_close(loss, nll + 0.3 / 50 * kl, rtol=1e-12, atol=0)


def test_kl_warmup_follows_the_formula_at_every_epoch():
    # the SSVI recipe: beta_t = kl_weight * min(epoch / (epochs / 2), 1) / N
    epochs, data = 8, blobs(12)
    seen: dict[int, float] = {}

    class Record(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[trainer.current_epoch] = pl_module.kl_scale()

    module = VariationalInference(classifier(), kl_weight=0.01, kl_warmup_epochs=epochs / 2)
    make_trainer(epochs, callbacks=[Record()]).fit(module, DataLoader(data, batch_size=12))
    for epoch in (0, epochs // 4, epochs // 2, epochs - 1):
        assert seen[epoch] == pytest.approx(0.01 * min(2 * epoch / epochs, 1.0) / len(data), rel=1e-15)


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"epochs": 4}, r"max_epochs=4: the last epoch weighs the KL by 0.0075 instead of kl_weight=0.01"),
        ({"epochs": 9, "max_steps": 5}, r"max_steps=5 \(2.5 epochs of 2 steps\): .* weighs the KL by 0.005 "),
        # 3 batches an epoch, 2 steps under accumulation (Lightning steps at an epoch's last batch)
        ({"epochs": 9, "max_steps": 3, "accumulate_grad_batches": 2, "batch_size": 4},
         r"max_steps=3 \(1.5 epochs of 2 steps\): .* weighs the KL by 0.0025 "),
    ],
    ids=["max_epochs", "max_steps", "accumulation"],
)
def test_a_fit_that_ends_inside_the_kl_warmup_warns(bounds: dict, message: str) -> None:
    """It trained a tempered posterior silently (the configs' 20-epoch warm-up under max_epochs 3: a tenth of the
    KL weight at the end)."""
    module = VariationalInference(classifier(), kl_weight=0.01, kl_warmup_epochs=4)
    expected = r"^VariationalInference's KL weight ramps up over kl_warmup_epochs=4 epochs but the Trainer stops "
    batch_size = bounds.pop("batch_size", 6)
    with pytest.warns(UserWarning, match=expected + "after " + message):
        make_trainer(**bounds).fit(module, DataLoader(blobs(12), batch_size=batch_size))


class StopsAfterOneEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


@pytest.mark.filterwarnings("error:.*kl_warmup_epochs")
def test_a_fit_past_the_kl_warmup_an_unbounded_one_or_a_smoke_run_does_not_warn() -> None:
    unbounded = {"epochs": -1, "callbacks": [StopsAfterOneEpoch()]}  # no bound the module could compare with
    for bounds in ({"epochs": 5}, {"epochs": -1, "max_steps": 10}, {"fast_dev_run": 1}, unbounded):
        module = VariationalInference(classifier(), kl_weight=0.01, kl_warmup_epochs=4)
        make_trainer(**bounds).fit(module, DataLoader(blobs(12), batch_size=6))


def _gradient_moments(module: VariationalInference, batch: tuple, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over ``draws`` noise draws of the loss gradient wrt (mu, raw scale)."""
    family = module.variational_layers[0].weight
    gradients = []
    for _ in range(draws):
        module.zero_grad()
        module.training_step(batch, 0).backward()
        gradients.append(torch.cat([family.mean.grad.flatten(), family.raw_scale.grad.flatten()]))
    stacked = torch.stack(gradients)
    return stacked.mean(0), stacked.std(0) / math.sqrt(draws)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_optimal_mean_field_posterior_of_linear_regression_is_a_stationary_point():
    # y = X w + e, e ~ N(0, s^2), w ~ N(0, I): the posterior has precision L = I + X^T X / s^2 and mean
    # L^-1 X^T y / s^2; the best mean-field Gaussian (the ELBO's optimum) has that mean and variances 1 / L_ii
    # (Bishop, PRML 10.1.2), whatever the correlation. There the expected gradient of the module's loss vanishes
    # (within 4 standard errors of 1,000 draws); a scale 30% off, a wrong KL weight or a missing 1/N does not.
    generator = torch.Generator().manual_seed(0)
    count, noise = 40, 0.5
    x = torch.randn(count, 2, generator=generator, dtype=torch.float64) @ torch.tensor([[1.0, 0.6], [0.0, 0.8]]).double()
    y = x @ torch.tensor([[0.8], [-0.4]], dtype=torch.float64) + noise * torch.randn(count, 1, generator=generator).double()
    precision = torch.eye(2, dtype=torch.float64) + x.T @ x / noise**2
    mean = torch.linalg.solve(precision, x.T @ y / noise**2).squeeze(1)
    likelihood = GaussianLikelihood(output_dim=1, init_noise=noise).double()
    likelihood.raw_noise.requires_grad_(False)

    def module_at(scale_factor: float, kl_weight: float = 1.0) -> VariationalInference:
        module = VariationalInference(
            nn.Sequential(nn.Linear(2, 1, bias=False)).double(), likelihood=likelihood, dataset_size=count,
            kl_weight=kl_weight,
        )
        family = module.variational_layers[0].weight
        with torch.no_grad():
            family.mean.copy_(mean[None])
            scale = scale_factor * precision.diagonal().rsqrt()[None]
            family.raw_scale.copy_(scale + torch.log(-torch.expm1(-scale)))  # softplus^-1
        return module

    torch.manual_seed(1)
    draws = 1000
    gradient, error = _gradient_moments(module_at(1.0), (x, y), draws)
    assert (gradient.abs() < 4 * error).all(), (gradient, error)
    for wrong in (module_at(1.3), module_at(1.0, kl_weight=2.0)):
        gradient, error = _gradient_moments(wrong, (x, y), draws)
        assert (gradient[2:].abs() > 8 * error[2:]).all(), (gradient, error)


def test_predictive_samples_or_uses_the_mean_weights():
    module = VariationalInference(classifier(), init_scale=0.5, num_samples=6)
    x = blobs()[:5][0]
    sampled = module.predictive(x)
    assert isinstance(sampled, CategoricalPredictive) and sampled.logits.shape == (6, 5, 3)
    assert (sampled.logits[0] - sampled.logits[1]).abs().max() > 0.01
    module.mean_prediction = True
    mean = module.predictive(x)
    layers = module.variational_layers
    deterministic = F.linear(torch.tanh(F.linear(x, layers[0].weight.mean, layers[0].bias.mean)), layers[1].weight.mean,
                             layers[1].bias.mean)
    assert mean.logits.shape == (1, 5, 3)
    torch.testing.assert_close(mean.logits[0], deterministic, rtol=1e-12, atol=0)
    assert all(layer.noise for layer in layers), "the mean model must switch the noise back on"


def test_a_flows_predictive_draws_its_weights_at_once():
    module = VariationalInference(classifier(), params="2.*", family="bernstein", degree=4, num_samples=6)
    calls: list[int] = []
    module.backbone[2].weight.register_forward_hook(lambda flow, inputs, output: calls.append(len(inputs[0])))
    sampled = module.predictive(blobs()[:5][0])
    assert calls == [6]  # one sample(6) of the weight's flow, not six sample(1)
    assert sampled.logits.shape == (6, 5, 3) and (sampled.logits[0] - sampled.logits[1]).abs().max() > 1e-3


def test_bernstein_family_trains_a_chosen_layer_and_keeps_the_rest_deterministic():
    data = blobs(30)
    module = VariationalInference(
        classifier(), params="2.*", family="bernstein", degree=4, support=(-0.2, 0.2), train_samples=2,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    assert isinstance(module.backbone[2], VariationalLayer) and isinstance(module.backbone[0], nn.Linear)
    before = module.predictive(data.tensors[0]).log_prob(data.tensors[1]).mean()
    make_trainer(30).fit(module, DataLoader(data, batch_size=10))
    after = module.predictive(data.tensors[0]).log_prob(data.tensors[1]).mean()
    assert after > before + 0.3, (before, after)


def test_the_resolved_dataset_size_stays_in_the_logged_hyperparameters_after_a_test(tmp_path: Path) -> None:
    """N from the data was logged as ``dataset_size``, which the test stage's logging of the module's hyperparameters
    then overwrote with the argument's null."""
    module = VariationalInference(classifier(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path, name="vi"), enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    data = DataLoader(blobs(), batch_size=8)
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    class Tagless(yaml.SafeLoader):  # the optimiser factory is a tagged Python object: read as None
        pass

    Tagless.add_multi_constructor("", lambda loader, suffix, node: None)
    logged = yaml.load((tmp_path / "vi" / "version_0" / "hparams.yaml").read_text(), Loader=Tagless)
    assert logged["resolved_dataset_size"] == len(blobs()) and logged["dataset_size"] is None


@pytest.mark.parametrize("stop", STOPS)
def test_resume_draws_the_same_noise_as_an_uninterrupted_run(tmp_path: Path, stop: str):
    def run(epochs: int, root: Path, ckpt: str | None, callbacks: list[Callback]) -> VariationalInference:
        torch.manual_seed(0)
        module = VariationalInference(classifier(), init_scale=0.2, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
        trainer = make_trainer(epochs, root=root, callbacks=callbacks)
        data = blobs()
        trainer.fit(module, StatefulDataLoader(data, batch_size=8, sampler=EpochShuffle(data)), ckpt_path=ckpt)
        return module

    assert_resumption_is_exact(run, tmp_path, epochs=3, stop=stop)


class StopsAfterTheMidEpochValidation(Callback):
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1 and trainer.fit_loop.epoch_loop.batch_progress.current.ready < 3:
            trainer.should_stop = True


@pytest.mark.parametrize(
    ("validation", "stop"),
    [({"check_val_every_n_epoch": 2}, None), ({"val_check_interval": 0.5}, None),
     ({"val_check_interval": 0.5}, StopsAfterTheMidEpochValidation())],
    ids=["every_second_epoch", "after_the_last_batch", "inside_an_epoch"],
)
def test_resuming_from_a_checkpoint_saved_as_validation_ends_is_exact(tmp_path: Path, validation: dict, stop) -> None:
    """``ModelCheckpoint`` saves as validation ends, after validation's Monte Carlo draws and before the module puts
    the training stream back: the checkpoint held the stream as validation left it (the resumed fit's weights 0.02
    off the uninterrupted fit's); and a checkpoint saved after an epoch's last batch (its validation) but before
    the epoch ended resumed without restoring the saved stream."""
    def run(epochs: int, root: Path, ckpt: str | None, stopper: Callback | None = None) -> VariationalInference:
        torch.manual_seed(0)
        module = VariationalInference(classifier(), init_scale=0.2, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
        callbacks = [ModelCheckpoint(dirpath=root, save_last=True), *([stopper] if stopper else [])]
        data = blobs()
        make_trainer(epochs, root=root, callbacks=callbacks, **validation).fit(
            module, StatefulDataLoader(data, batch_size=8, sampler=EpochShuffle(data)), DataLoader(data, batch_size=8),
            ckpt_path=ckpt,
        )
        return module

    straight = run(4, tmp_path / "straight", None)
    stopped = run(4 if stop else 2, tmp_path / "stopped", None, stop)
    assert stopped.global_step == (3 + 1 if stop else 2 * 3)  # 3 batches an epoch; validation after each under 0.5
    resumed = run(4, tmp_path / "resumed", str(tmp_path / "stopped" / "last.ckpt"))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_a_fit_after_testing_a_checkpoint_starts_from_the_seed_not_from_the_checkpoints_generators(tmp_path: Path):
    """Testing a checkpoint restores its generators (so the test repeats the fit's own); a fresh fit after it (no
    ckpt_path) put them back once more at its start, overriding the user's seed."""
    def module() -> VariationalInference:
        return VariationalInference(classifier(), init_scale=0.2, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))

    data = blobs()
    torch.manual_seed(0)
    make_trainer(1, root=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="fitted")]).fit(
        module(), DataLoader(data, batch_size=8))
    weights = torch.load(tmp_path / "fitted.ckpt", weights_only=False)["state_dict"]
    fits = []
    for tested_first in (False, True):
        fitted = module()
        if tested_first:
            make_trainer(1).validate(fitted, DataLoader(data, batch_size=8), ckpt_path=tmp_path / "fitted.ckpt")
        else:
            fitted.load_state_dict(weights)
        torch.manual_seed(5)
        make_trainer(1).fit(fitted, DataLoader(data, batch_size=8))
        fits.append(fitted.state_dict())
    assert all(torch.equal(value, fits[1][name]) for name, value in fits[0].items())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"family": "student"}, "family"), ({"dataset_size": 0}, "dataset_size"), ({"kl_weight": -1.0}, "kl_weight"),
     ({"kl_warmup_epochs": -2}, "kl_warmup_epochs"), ({"train_samples": 0}, "train_samples"),
     ({"params": "9.*"}, "params")],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VariationalInference(classifier(), **kwargs)


def test_missing_dataset_size_is_named():
    module = VariationalInference(classifier())
    with pytest.raises(ValueError, match="dataset_size"):
        module.kl_scale()
    assert math.isfinite(VariationalInference(classifier(), dataset_size=10).kl_scale())
