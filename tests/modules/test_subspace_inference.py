"""SubspaceInference through the Trainer. Bayesian linear regression in a planted PCA subspace has a Gaussian
posterior over z in closed form: ESS draws match its moments and VI finds its mean and diagonal precision. The
sampler resumes bitwise from a mid-fit checkpoint; SWA/SWAG read from a real SWASubspace run's checkpoint
reproduce the callback's own weights; every sample's BatchNorm statistics are the refresh at its weights."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.func import functional_call
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.callbacks.swa_subspace import SWASubspace
from lightning_bayes.inference.linalg import FlatParameters
from lightning_bayes.inference.swag import SWAGMoments
from lightning_bayes.modules import MAP
from lightning_bayes.modules.subspace_inference import SubspaceInference

pytestmark = pytest.mark.usefixtures("single_thread")

TEMPERATURE, PRIOR_SCALE = 2.0, 1.5


def regression() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """40 points of y = x^T w + noise, and a hand-made SWASubspace state around w (5 snapshots, K = 4)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64, generator=generator)
    w = torch.randn(6, dtype=torch.float64, generator=generator)
    y = (x @ w + torch.randn(40, dtype=torch.float64, generator=generator)).unsqueeze(1)
    moments = SWAGMoments(6, 4, dtype=torch.float64)
    for _ in range(5):
        moments.update(w + 0.3 * torch.randn(6, dtype=torch.float64, generator=generator))
    return x, y, {"names": ["weight"], "max_rank": 4, "moments": moments.state_dict()}


def linear_module(state: dict, **kwargs) -> SubspaceInference:
    options = {"subspace": "pca", "rank": 2, "likelihood": "gaussian", "temperature": TEMPERATURE,
               "prior_scale": PRIOR_SCALE, **kwargs}
    return SubspaceInference(nn.Linear(6, 1, bias=False).double(), swag_state=state, **options)


def trainer(max_epochs: int, root: Path | None = None, **kwargs) -> Trainer:
    return Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=root is not None, default_root_dir=root, **kwargs)


def exact_posterior(module: SubspaceInference, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p(z | D) ∝ N(y; X (w_hat + B^T z), s^2 I)^(1/T) N(z; 0, sigma_p^2 I): precision A^T A / (s^2 T) + I / sigma_p^2
    with A = X B^T, mean = precision^-1 A^T (y - X w_hat) / (s^2 T)."""
    noise = float(F.softplus(module.likelihood.raw_noise) ** 2 + 1e-6)
    design = x @ module.subspace.basis.T
    residual = y[:, 0] - x @ module.subspace.shift
    precision = design.T @ design / (noise * TEMPERATURE) + torch.eye(2, dtype=torch.float64) / PRIOR_SCALE**2
    covariance = torch.linalg.inv(precision)
    return covariance @ design.T @ residual / (noise * TEMPERATURE), covariance


def test_ess_samples_match_the_closed_form_posterior_in_a_planted_subspace() -> None:
    x, y, state = regression()
    module = linear_module(state, method="ess", num_samples=400)
    fit = trainer(-1)
    fit.fit(module, DataLoader(TensorDataset(x, y), batch_size=20))  # two batches: the sum spans the epoch
    assert int(module.collected) == 400 and fit.should_stop
    mean, covariance = exact_posterior(module, x, y)
    samples = module.samples
    # standard errors from 10 batch means (the chain is autocorrelated): 3 of them
    batch_means = samples.reshape(10, 40, 2).mean(1)
    standard_error = batch_means.std(0) / 10**0.5
    assert ((samples.mean(0) - mean).abs() / standard_error).max() < 3
    torch.testing.assert_close(samples.var(0), covariance.diagonal(), rtol=0.2, atol=0)
    module.eval()
    torch.testing.assert_close(module.predictive(x[:3], 2).mean_samples[:, :, 0],
                               (module.subspace(samples[:2]) @ x[:3].T), rtol=0, atol=1e-12)


def test_under_bf16_true_the_chain_keeps_its_float64_state() -> None:
    """``precision="bf16-true"`` casts the whole module: the chain's samples, the epoch's log-likelihood and the
    slice sampler's threshold were rounded to bf16 (-123.37 to -123.5: other accept/reject decisions)."""
    x, y, state = regression()
    module = linear_module(state, method="ess", num_samples=4)
    trainer(-1, precision="bf16-true").fit(module, DataLoader(TensorDataset(x, y), batch_size=40))
    assert module.model.weight.dtype == torch.bfloat16 and int(module.collected) == 4
    kept = (module.samples, module.partial, module.sampler.threshold, module.sampler.z, module.moments.sq_mean)
    assert {tensor.dtype for tensor in kept} == {torch.float64}


def test_a_sampler_refuses_a_step_budget_and_vi_takes_one() -> None:
    """ESS takes no optimiser step: each batch counts as a step and a ``max_steps`` inside an epoch (5 of 40
    batches) would stop a pass part-way; VI steps an optimiser."""
    x, y, state = regression()
    with pytest.raises(ValueError, match=r"^SubspaceInference takes no optimiser steps"):
        trainer(-1, max_steps=5).fit(linear_module(state, method="ess", num_samples=4), DataLoader(TensorDataset(x, y)))
    vi = linear_module(state, method="vi", num_samples=4)
    trainer(2, max_steps=100).fit(vi, DataLoader(TensorDataset(x, y), batch_size=20))
    assert vi.trainer.global_step == 4  # two epochs of two optimiser steps


def test_vi_stopped_before_max_epochs_still_draws_its_samples_from_q() -> None:
    """``max_steps`` ends the fit in epoch 3 of 100: the samples are drawn then (they were not: the predictive fell
    back to the subspace's centre); 4,000 of them have q's mean and standard deviation (4 standard errors)."""
    x, y, state = regression()
    vi = linear_module(state, method="vi", num_samples=4000)
    trainer(100, max_steps=5).fit(vi, DataLoader(TensorDataset(x, y), batch_size=20))
    assert vi.trainer.global_step == 5 and int(vi.collected) == 4000
    mu, sigma = vi.variational.mu.detach(), vi.variational.sigma.detach()
    samples = vi.samples
    assert ((samples.mean(0) - mu).abs() / (sigma / 4000**0.5)).max() < 4
    torch.testing.assert_close(samples.std(0), sigma, rtol=4 / (2 * 4000) ** 0.5, atol=0)
    assert vi.eval().predictive(x[:2]).mean_samples.shape[0] == 4000


def test_vi_stopped_by_a_callback_after_its_epoch_end_saves_its_samples(tmp_path: Path) -> None:
    """EarlyStopping on a training metric stops the fit in a hook after the module's epoch end, before ModelCheckpoint
    saves: the checkpoint holds the samples the fit ends with (it held none), drawn once."""
    from lightning.pytorch.callbacks import EarlyStopping

    x, y, state = regression()
    vi = linear_module(state, method="vi", num_samples=8)
    stop = EarlyStopping(monitor="train/loss", stopping_threshold=1e9, check_on_train_epoch_end=True)
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    trainer(10, tmp_path, callbacks=[stop, last], log_every_n_steps=1).fit(
        vi, DataLoader(TensorDataset(x, y), batch_size=20)
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert vi.current_epoch == 1 and int(saved["collected"]) == 8
    assert torch.equal(saved["samples"], vi.samples) and vi.samples.abs().sum() > 0
    assert int(vi.draws) == 3  # a noise draw per step (2), the samples once


@pytest.mark.parametrize(
    ("epochs", "options", "stops", "saves"),
    [
        (100, {"max_steps": 5}, False, True),  # the step budget ends the fit in epoch 3: its checkpoint holds samples
        (2, {}, False, True),  # the last epoch's end draws; its checkpoint does not draw again
        (10, {}, True, False),  # a callback stops it after the module's epoch end and nothing is saved: train end draws
        (3, {"min_epochs": 3}, True, False),  # a stop asked before min_epochs is not the end: one draw, at the end
    ],
    ids=["max_steps", "max_epochs", "early_stop", "early_stop_before_min_epochs"],
)
def test_vi_draws_its_samples_once_as_the_fit_ends(tmp_path: Path, epochs: int, options: dict, stops: bool,
                                                    saves: bool) -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    x, y, state = regression()
    vi = linear_module(state, method="vi", num_samples=8)
    stop = EarlyStopping(monitor="train/loss", stopping_threshold=1e9, check_on_train_epoch_end=True)
    callbacks = [stop] if stops else []
    if saves:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True))
    trainer(epochs, tmp_path if saves else None, callbacks=callbacks, log_every_n_steps=1, **options).fit(
        vi, DataLoader(TensorDataset(x, y), batch_size=20)
    )
    assert int(vi.collected) == 8 and vi.samples.abs().sum() > 0
    assert int(vi.draws) == vi.trainer.global_step + 1  # a noise draw per step, the samples once
    if saves:
        saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
        assert int(saved["collected"]) == 8 and torch.equal(saved["samples"], vi.samples)


def test_ess_refuses_a_loader_that_drops_its_last_batch() -> None:
    """The slice threshold of one pass is compared with the next pass's log-likelihood: a shuffled loader that
    drops a batch sums other examples every time."""
    x, y, state = regression()
    loader = DataLoader(TensorDataset(x[:30], y[:30]), batch_size=8, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match=r"^SubspaceInference with method='ess' needs the log-likelihood of every "
                       r"training example; the training loader drops its last batch: set the datamodule's drop_last"):
        trainer(-1).fit(linear_module(state, method="ess", num_samples=4), loader)


def test_vi_finds_the_posterior_mean_and_diagonal_precision() -> None:
    """For a Gaussian posterior the best diagonal Gaussian (KL(q || p)) has the posterior mean and
    sigma_i^2 = 1 / precision_ii."""
    x, y, state = regression()
    module = linear_module(
        state, method="vi", num_samples=4, optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.003 ** (1 / 800)),
    )  # one noise draw per step; the learning rate decays 300-fold, so the last iterate's gradient noise is small
    trainer(800).fit(module, DataLoader(TensorDataset(x, y), batch_size=40))
    mean, covariance = exact_posterior(module, x, y)
    sigma = torch.linalg.inv(covariance).diagonal().rsqrt()
    torch.testing.assert_close(module.variational.mu.detach(), mean, rtol=0, atol=0.1 * float(sigma.min()))
    torch.testing.assert_close(module.variational.sigma.detach(), sigma, rtol=0.05, atol=0)
    assert int(module.collected) == 4 and module.samples.abs().sum() > 0
    assert int(module.draws) == 801  # a noise draw per step, then the samples once, at the end of the last epoch


def test_the_sampler_resumes_bitwise_from_a_mid_fit_checkpoint(tmp_path: Path) -> None:
    x, y, state = regression()
    data = DataLoader(TensorDataset(x, y), batch_size=20)
    straight = linear_module(state, method="ess", num_samples=6)
    trainer(-1).fit(straight, data)
    first = linear_module(state, method="ess", num_samples=6)
    trainer(5, tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(first, data)
    assert 0 < int(first.collected) < 6  # killed in the middle of sampling
    resumed = linear_module(state, method="ess", num_samples=6)
    trainer(-1).fit(resumed, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(resumed.samples, straight.samples) and int(resumed.draws) == int(straight.draws)


@pytest.mark.parametrize(
    ("options", "bound", "collected"),
    [({"max_epochs": 1}, "max_epochs=1", 0),
     ({"max_epochs": -1, "max_steps": 8}, r"max_steps=8 \(4 epochs of 2 steps\)", 1)],
    ids=["max_epochs", "max_steps"],
)
def test_a_chain_the_trainer_stops_short_is_warned_of(options: dict, bound: str, collected: int) -> None:
    """max_epochs=1 ended an ESS fit with 0 of its samples and no word; a finished chain warns of nothing."""
    x, y, state = regression()
    data = DataLoader(TensorDataset(x, y), batch_size=20)
    short = linear_module(state, method="ess", num_samples=3)
    with pytest.warns(UserWarning, match=rf"^SubspaceInference collected {collected} of num_samples=3 samples: the "
                                         rf"Trainer stopped its fit at {bound} \(method='ess' stops itself .*: set "
                                         r"max_epochs=-1 and fit again, resuming"):
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, **options).fit(short, data)
    assert int(short.collected) == collected
    finished = linear_module(state, method="ess", num_samples=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(-1).fit(finished, data)
    assert int(finished.collected) == 3 and not [w for w in caught if "SubspaceInference collected" in str(w.message)]


class CountBatches(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1


def test_resuming_a_finished_chain_keeps_it_and_draws_nothing(tmp_path: Path) -> None:
    x, y, state = regression()
    data = DataLoader(TensorDataset(x, y), batch_size=20)
    finished = linear_module(state, method="ess", num_samples=3)
    trainer(-1, tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(finished, data)
    resumed, counter = linear_module(state, method="ess", num_samples=3), CountBatches()
    trainer(-1, callbacks=[counter]).fit(resumed, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert counter.batches == 0 and int(resumed.collected) == 3
    assert torch.equal(resumed.samples, finished.samples) and int(resumed.draws) == int(finished.draws)


def test_a_finished_chain_given_more_samples_goes_on_as_one_chain(tmp_path: Path) -> None:
    x, y, state = regression()
    data = DataLoader(TensorDataset(x, y), batch_size=20)
    straight = linear_module(state, method="ess", num_samples=6)
    trainer(-1).fit(straight, data)
    trainer(-1, tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(
        linear_module(state, method="ess", num_samples=4), data
    )
    extended = linear_module(state, method="ess", num_samples=6)
    trainer(-1).fit(extended, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert int(extended.collected) == 6 and int(extended.draws) == int(straight.draws)
    assert torch.equal(extended.samples, straight.samples)


def test_fewer_samples_than_the_checkpoint_holds_are_its_first(tmp_path: Path) -> None:
    x, y, state = regression()
    data = DataLoader(TensorDataset(x, y), batch_size=20)
    finished = linear_module(state, method="ess", num_samples=4)
    trainer(-1, tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(finished, data)
    fewer = linear_module(state, method="ess", num_samples=2)
    trainer(1).validate(fewer, data, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert int(fewer.collected) == 2 and torch.equal(fewer.samples, finished.samples[:2])
    expected = fewer.subspace(finished.samples[:2]) @ x[:3].T
    torch.testing.assert_close(fewer.predictive(x[:3]).mean_samples[:, :, 0], expected, rtol=0, atol=1e-12)


class Net(nn.Module):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8) if batchnorm else nn.Identity(), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def classification() -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(48, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=12)


def collected_run(
    tmp_path: Path, batchnorm: bool = False, params: str = "all", max_rank: int = 6
) -> tuple[MAP, SWASubspace, Path]:
    swa = SWASubspace(params=params, start_epoch=1, every_n_steps=1, max_rank=max_rank)
    trained = MAP(Net(batchnorm), optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    trainer(3, tmp_path, callbacks=[swa, ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(trained, classification())
    return trained, swa, tmp_path / "last.ckpt"


def test_swa_and_swag_from_a_checkpoint_reproduce_the_callbacks_weights(tmp_path: Path) -> None:
    trained, swa, path = collected_run(tmp_path)
    x = next(iter(classification()))[0]
    module = SubspaceInference(Net(), checkpoint=str(path), subspace="swag", method="none", swag_scale=0.0,
                               num_samples=1).eval()
    with swa.swa(trained):
        torch.testing.assert_close(module.predictive(x).logits[0], trained(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(module(x), trained(x), rtol=0, atol=0)  # the checkpoint's final weights
    swag = SubspaceInference(Net(), checkpoint=str(tmp_path / "*.ckpt"), subspace="swag", method="none", num_samples=3,
                             seed=4).eval()
    draws = swa.moments.sample(0.5, num_samples=3, generator=torch.Generator().manual_seed(4))
    flat = FlatParameters(trained, "all")
    for index, draw in enumerate(draws):
        expected = functional_call(trained, flat.unflatten(draw), (x,))
        torch.testing.assert_close(swag.predictive(x).logits[index], expected, rtol=0, atol=1e-6)


def test_a_pca_subspace_from_a_buffer_not_yet_full_is_that_of_the_stored_deviations(tmp_path: Path) -> None:
    """8 snapshots in a buffer of 20 rows: the basis is the top-2 PCA of those 8 deviations, D^T D / 7, not of the
    20 rows with 12 of zeros (which would scale the basis by sqrt(7 / 19))."""
    _, swa, path = collected_run(tmp_path, max_rank=20)
    stored = int(swa.moments.count)
    assert stored == 8 and swa.moments.max_rank == 20
    module = SubspaceInference(Net(), checkpoint=str(path), subspace="pca", rank=2, method="none", num_samples=1)
    deviations = swa.moments.deviations[:stored].double()
    covariance = deviations.T @ deviations / (stored - 1)
    top = torch.linalg.eigvalsh(covariance)[-2:].flip(0)
    basis = module.subspace.basis.double()
    torch.testing.assert_close(torch.linalg.eigvalsh(basis @ basis.T).flip(0), top, rtol=1e-4, atol=0)
    torch.testing.assert_close(module.subspace.shift.double(), swa.moments.mean.double(), rtol=0, atol=0)


def test_ess_on_a_batchnorm_network_refuses_a_shuffled_loader(tmp_path: Path) -> None:
    """With BatchNorm on batch statistics the log-likelihood of one point depends on which examples share a batch,
    so a shuffled pass would score the slice's threshold and its proposals differently; a fixed order is accepted."""
    _, _, path = collected_run(tmp_path, batchnorm=True, params="*head*")
    options = {"checkpoint": str(path), "subspace": "pca", "rank": 2, "method": "ess", "num_samples": 2}
    data = classification().dataset
    shuffled = DataLoader(data, batch_size=12, shuffle=True)
    with pytest.raises(ValueError, match=r"^SubspaceInference with method='ess' compares each pass's log-likelihood "
                       r"with the last one's, and on a network with BatchNorm .*the training loader shuffles: set "
                       r"the datamodule's shuffle=False"):
        trainer(-1).fit(SubspaceInference(Net(batchnorm=True), **options), shuffled)
    fixed = SubspaceInference(Net(batchnorm=True), **options)
    trainer(-1).fit(fixed, DataLoader(data, batch_size=12))
    assert int(fixed.collected) == 2
    _, _, plain_path = collected_run(tmp_path / "plain")
    plain = SubspaceInference(Net(), **{**options, "checkpoint": str(plain_path)})
    trainer(-1).fit(plain, shuffled)  # a sum over the data: the order does not matter
    assert int(plain.collected) == 2


def test_batchnorm_statistics_are_refreshed_and_cached_per_sample(tmp_path: Path) -> None:
    _, _, path = collected_run(tmp_path, batchnorm=True, params="*head*")
    module = SubspaceInference(Net(batchnorm=True), checkpoint=str(path), subspace="swag", method="none",
                               num_samples=2)
    x = next(iter(classification()))[0]
    with pytest.raises(ValueError, match="fit SubspaceInference first"):
        module.eval().predictive(x)
    trainer(1).fit(module, classification())
    assert bool(module.bn_ready)
    module.eval()
    for index, weights in enumerate(module.sample_weights()):
        reference = copy.deepcopy(module.model)
        reference.head.weight.data.copy_(weights[:24].view(3, 8))
        reference.head.bias.data.copy_(weights[24:])
        update_bn(classification(), reference)
        reference.eval()
        torch.testing.assert_close(module.bn_statistics[index], torch.cat([reference.body[1].running_mean,
                                                                            reference.body[1].running_var]))
        torch.testing.assert_close(module.predictive(x).logits[index], reference(x), rtol=0, atol=1e-6)
    # head-only samples share the body: the refresh at the trained weights equals every sample's
    torch.testing.assert_close(module.bn_statistics[0], module.bn_statistics[1], rtol=0, atol=0)



def test_a_batchnorm_chain_stopped_short_says_how_many_samples_it_collected(tmp_path: Path) -> None:
    """Its predictive said "fit SubspaceInference first" after a fit that max_epochs=1 had stopped before sampling
    was done (and so before the samples' statistics)."""
    _, _, path = collected_run(tmp_path, batchnorm=True, params="*head*")
    module = SubspaceInference(Net(batchnorm=True), checkpoint=str(path), subspace="pca", rank=2, method="ess",
                               num_samples=2)
    with pytest.warns(UserWarning, match="collected 0 of num_samples=2 samples: the Trainer stopped its fit at "
                                         "max_epochs=1"):
        trainer(1).fit(module, classification())
    with pytest.raises(ValueError, match=r"^the model has BatchNorm, whose statistics SubspaceInference recomputes for "
                                         r"each sample once sampling is done, and its fit collected 0 of num_samples=2 "
                                         r"samples before the Trainer stopped it \(e\.g\. at max_epochs\): fit on "
                                         r"with max_epochs=-1"):
        module.eval().predictive(next(iter(classification()))[0])


def test_each_sample_predicts_with_its_own_batchnorm_statistics_when_the_layer_before_is_sampled(
    tmp_path: Path,
) -> None:
    """With the Linear before BatchNorm in the subspace, the samples' statistics differ and sample i's logits are
    the model's at its weights after update_bn there."""
    _, _, path = collected_run(tmp_path, batchnorm=True, params="*body.0.*")
    module = SubspaceInference(Net(batchnorm=True), checkpoint=str(path), subspace="swag", method="none",
                               num_samples=2)
    trainer(1).fit(module, classification())
    module.eval()
    x = next(iter(classification()))[0]
    logits = module.predictive(x).logits
    assert (module.bn_statistics[0] - module.bn_statistics[1]).abs().max() > 1e-3
    for index, weights in enumerate(module.sample_weights()):
        reference = copy.deepcopy(module.model)
        reference.body[0].weight.data.copy_(weights[:32].view(8, 4))
        reference.body[0].bias.data.copy_(weights[32:])
        update_bn(classification(), reference)
        torch.testing.assert_close(logits[index], reference.eval()(x), rtol=0, atol=1e-6)


def test_a_finished_batchnorm_chain_tested_with_more_samples_predicts_with_those_it_has(tmp_path: Path) -> None:
    _, _, path = collected_run(tmp_path, batchnorm=True, params="*head*")
    options = {"checkpoint": str(path), "subspace": "pca", "rank": 2, "method": "ess", "temperature": 1.0}
    finished = SubspaceInference(Net(batchnorm=True), num_samples=3, **options)
    trainer(-1, tmp_path / "ess", callbacks=[ModelCheckpoint(dirpath=tmp_path / "ess", save_last=True)]).fit(
        finished, classification()
    )
    more = SubspaceInference(Net(batchnorm=True), num_samples=5, **options)
    trainer(1).validate(more, classification(), ckpt_path=tmp_path / "ess" / "last.ckpt", verbose=False)
    x = next(iter(classification()))[0]
    with pytest.warns(UserWarning, match="predicts with the 3 samples it holds, not num_samples=5: fit with"):
        logits = more.eval().predictive(x).logits  # the three samples and their cached statistics
    torch.testing.assert_close(logits, finished.eval().predictive(x).logits, rtol=0, atol=0)


def test_curve_and_random_subspaces() -> None:
    _, _, state = regression()
    generator = torch.Generator().manual_seed(5)
    points = [torch.randn(6, dtype=torch.float64, generator=generator) for _ in range(3)]
    curve = linear_module(state, subspace="curve", rank=2, method="none", curve_points=points, num_samples=3)
    torch.testing.assert_close(curve.subspace.shift, torch.stack(points).mean(0))
    random = linear_module(state, subspace="random", rank=3, method="none", num_samples=2)
    pca = linear_module(state, subspace="pca", rank=2, method="none")
    torch.testing.assert_close(random.subspace.basis.norm(dim=1),
                               pca.subspace.basis.norm(dim=1).mean().expand(3), rtol=1e-12, atol=0)
    assert random.samples.shape == (2, 3) and int(random.collected) == 2
    # method "none" draws the subspace coefficients from the prior N(0, sigma_p^2 I): the sample standard deviation of
    # 3 x 2000 draws has standard error sigma_p / sqrt(2 n) = 0.014
    prior = linear_module(state, subspace="random", rank=3, method="none", num_samples=2000)
    assert float(prior.samples.std()) == pytest.approx(PRIOR_SCALE, abs=5 * PRIOR_SCALE / (2 * 6000) ** 0.5)
    one = linear_module(state, subspace="random", rank=3, method="none", num_samples=1)  # one sample: not the centre
    assert torch.equal(one.sample_weights(), one.subspace(one.samples)) and not torch.equal(
        one.sample_weights()[0], one.subspace.shift)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subspace": "kfac"}, "subspace must be one of"),
        ({"method": "hmc"}, "method must be one of"),
        ({"subspace": "swag", "method": "ess"}, "method must be 'none'"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"prior_scale": -1.0}, "prior_scale must be a finite number > 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"swag_scale": -0.5}, "swag_scale must be None or a finite number >= 0"),
        ({"swag_scale": float("inf")}, "swag_scale must be None or a finite number >= 0; got inf"),
        ({"subspace": "curve", "rank": 2}, r"needs rank=2 and curve_points=\[w0, w_half, w2\]"),
        ({"rank": 4}, r"k must be an int in \[1, K - 1\] = \[1, 3\]"),
        ({"params": "bias"}, "matched no parameter"),
    ],
)
def test_bad_arguments_are_named(kwargs, message) -> None:
    _, _, state = regression()
    with pytest.raises(ValueError, match=message):
        linear_module(state, **kwargs)


def test_a_checkpoint_without_swa_state_is_refused(tmp_path: Path) -> None:
    plain = MAP(Net())
    fit = trainer(1, tmp_path)
    fit.fit(plain, classification())
    fit.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds 0 non-empty SWASubspace states"):
        SubspaceInference(Net(), checkpoint=str(tmp_path / "plain.ckpt"))
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        SubspaceInference(Net())


def test_a_swag_state_of_another_shape_or_a_file_that_is_no_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    """{"a": 1} raised KeyError 'names', [1, 2] a TypeError; a YAML checkpoint torch.load's UnpicklingError."""
    with pytest.raises(ValueError, match=r"^swag_state must be SWASubspace.state_dict\(\), with keys \['max_rank', "
                       r"'moments', 'names'\]; got keys \['a'\]$"):
        linear_module({"a": 1})
    with pytest.raises(ValueError, match=r"^swag_state must be SWASubspace.state_dict\(\) \(a dict\); got list$"):
        linear_module([1, 2])  # type: ignore[arg-type]
    (tmp_path / "config.yaml").write_text("model:\n  class_path: MAP\n")
    with pytest.raises(ValueError, match=r"^checkpoint='.*config.yaml' is not a Lightning checkpoint or state dict"):
        SubspaceInference(nn.Linear(6, 1), checkpoint=str(tmp_path / "config.yaml"))


def test_a_state_without_snapshots_is_refused_saying_why() -> None:
    _, _, state = regression()
    state["moments"] = SWAGMoments(6, 4, dtype=torch.float64).state_dict()
    with pytest.raises(ValueError, match=r"^swag_state holds no snapshot: its run ended before the callback's start of "
                       r"collection \(start_epoch or start_fraction\); train past it$"):
        linear_module(state)


def test_swag_from_one_snapshot_with_a_low_rank_part_is_refused() -> None:
    """Its draws would all be the SWA mean (diagonal variance 0, the low-rank part dropped without 2 deviations)."""
    _, _, state = regression()
    moments = SWAGMoments(6, 4, dtype=torch.float64)
    moments.update(torch.ones(6, dtype=torch.float64))
    state["moments"] = moments.state_dict()
    with pytest.raises(ValueError, match=r"^subspace='swag' draws SWAG's low-rank part \(max_rank=4\), which needs"):
        linear_module(state, subspace="swag", method="none")
    swa = linear_module(state, subspace="swag", method="none", swag_scale=0.0, num_samples=1)  # SWA: the mean serves
    torch.testing.assert_close(swa.sample_weights(1), torch.ones(1, 6, dtype=torch.float64), rtol=0, atol=0)


def test_swag_scale_defaults_to_the_references_half_and_one_for_swag_diag() -> None:
    """s = 0.5 for SWAG (a low-rank part), 1 for SWAG-diag (``max_rank=0``): the draws of a diagonal-only run have
    the diagonal covariance itself (they had half of it)."""
    _, _, state = regression()
    assert linear_module(state, subspace="swag", method="none").swag_scale == 0.5
    generator = torch.Generator().manual_seed(0)
    diagonal = SWAGMoments(6, 0, dtype=torch.float64)
    for _ in range(5):
        diagonal.update(torch.randn(6, dtype=torch.float64, generator=generator))
    state = {"names": ["weight"], "max_rank": 0, "moments": diagonal.state_dict()}
    module = linear_module(state, subspace="swag", method="none", num_samples=3)
    assert module.swag_scale == 1.0
    expected = diagonal.sample(1.0, 3, generator=torch.Generator().manual_seed(module.seed))
    torch.testing.assert_close(module.sample_weights(3), expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # a direct step, outside a Trainer
def test_the_vi_loss_divides_the_kl_by_num_data_not_the_batch_size() -> None:
    """On a 10-row batch with num_data=40 the VI loss is the batch's mean NLL + T KL / 40 at the step's draw."""
    x, y, state = regression()
    module = linear_module(state, method="vi", num_samples=1, num_data=40)
    with torch.no_grad():
        module.variational.mu.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    x, y = x[:10], y[:10]
    loss = module.training_step((x, y), 0)
    # the draw: a CPU generator seeded (seed << 32) + draws, draws = 0 before the first step
    noise = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(module.seed << 32))
    z = module.variational.mu + module.variational.sigma * noise
    w = module.subspace.shift + z @ module.subspace.basis
    variance = (F.softplus(module.likelihood.raw_noise).pow(2) + 1e-6).double()  # the float32 noise parameter
    summed_nll = 0.5 * (torch.log(2 * torch.pi * variance) + (y[:, 0] - x @ w) ** 2 / variance).sum()
    ratio = (module.variational.sigma / PRIOR_SCALE) ** 2
    kl = 0.5 * (ratio + (module.variational.mu / PRIOR_SCALE) ** 2 - 1 - torch.log(ratio)).sum()
    torch.testing.assert_close(loss, summed_nll / 10 + TEMPERATURE * kl / 40, rtol=1e-12, atol=0)
