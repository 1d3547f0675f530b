"""MAP, MC dropout and deep ensemble against explicit computations."""

import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_bayes.datamodules import DigitsDataModule
from lightning_bayes.inference.likelihoods import GaussianLikelihood
from lightning_bayes.models import MLP
from lightning_bayes.modules import MAP, DeepEnsemble, MCDropout
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive

from resumption import STOPS, SavesInsideAnEpoch, assert_resumption_is_exact


def _mlp(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def test_map_predictive_is_the_softmax_of_the_network():
    torch.manual_seed(0)
    module = MAP(_mlp()).eval()
    x = torch.randn(5, 4)
    pred = module.predictive(x)
    assert isinstance(pred, CategoricalPredictive) and pred.logits.shape == (1, 5, 3)
    torch.testing.assert_close(pred.probs, torch.softmax(module.backbone(x), -1))


def test_mc_dropout_draws_distinct_masks_and_is_unbiased():
    torch.manual_seed(0)
    # identity features through dropout then a fixed linear map: E[output] equals the no-dropout output
    backbone = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2))
    module = MCDropout(backbone, likelihood=GaussianLikelihood(output_dim=2), num_samples=4000).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        pred = module.predictive(x)
        exact = backbone(x)  # eval mode: dropout is the identity
    assert isinstance(pred, GaussianPredictive) and pred.mean_samples.shape == (4000, 3, 2)
    assert not backbone[0].training, "dropout mode must be restored after sampling"
    assert len(torch.unique(pred.mean_samples[:, 0, 0])) > 10
    # each sample is W (m * x / 0.5) + b with m ~ Bernoulli(0.5): mean exact, std of the mean ~ |W||x| / sqrt(4000)
    bound = 4 * (backbone[1].weight.abs() @ x.abs().T).T.max() / 4000**0.5
    assert (pred.mean - exact).abs().max() < bound


class _Encoder(nn.Module):
    """A transformer encoder layer (dropout in attention and in the feed-forward part) between BatchNorm layers."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_in = nn.BatchNorm1d(5)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.norm_in(x)).mean(1))


@pytest.mark.parametrize("context", [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_mc_dropout_samples_attention_dropout_and_keeps_batchnorm_statistics(context):
    """Only nn.Dropout modules were switched on: under no_grad/inference_mode (validation, test, predict) the
    eval-mode encoder layer took torch's fused path, which skips every dropout, so all samples were one; and attention
    dropout (nn.MultiheadAttention's own) was never sampled."""
    torch.manual_seed(0)
    backbone = _Encoder()
    backbone.norm_in.running_mean.normal_()
    module = MCDropout(backbone, num_samples=6).eval()
    statistics = backbone.norm_in.running_mean.clone()
    with context():
        logits = module.predictive(torch.randn(2, 5, 8)).logits
    assert len({tuple(sample.flatten().tolist()) for sample in logits}) == 6
    assert torch.equal(backbone.norm_in.running_mean, statistics) and int(backbone.norm_in.num_batches_tracked) == 0
    assert not any(m.training for m in backbone.modules()), "every module's mode must be restored"

    attention_only = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    only = MCDropout(_AttentionHead(attention_only), num_samples=4).eval()
    with context():
        assert only.predictive(torch.randn(2, 5, 8)).logits.std(0).max() > 0


class _AttentionHead(nn.Module):
    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention, self.head = attention, nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x)[0].mean(1))


class _MixedStochastic(nn.Module):
    """Stochastic depth and a recurrent layer with dropout between its layers, then a plain dropout."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.path, self.rnn = DropPath(0.3), nn.LSTM(4, 8, num_layers=2, dropout=0.2, batch_first=True)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.rnn(x + self.path(x))[0][:, -1]))


def test_mc_dropout_leaves_stochastic_depth_and_recurrent_layers_as_they_are():
    """Switching every module but BatchNorm to training mode turned on stochastic depth (an in-place draw vmap
    refuses) and sent an LSTM's dropout through the stacked path (no batching rule for aten::lstm): both crashed."""
    torch.manual_seed(0)
    module = MCDropout(_MixedStochastic(), num_samples=5).eval()
    with torch.no_grad():
        logits = module.predictive(torch.randn(2, 6, 4)).logits
    assert len({tuple(sample.flatten().tolist()) for sample in logits}) == 5
    assert not any(m.training for m in module.backbone.modules())


class _TinyBert(nn.Module):
    """A one-layer BERT whose only dropout is attention's (``attention_probs_dropout_prob``)."""

    def __init__(self, attention: str) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5, attn_implementation=attention,
        )  # fmt: skip
        self.bert, self.head = BertModel(config, add_pooling_layer=False), nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_mc_dropout_samples_the_attention_dropout_a_layer_gates_itself(attention: str):
    """BertSelfAttention applies ``self.dropout.p`` only when it is training itself: left in eval mode, all samples
    were one (and under SDPA, whose dropout draws in place, the unstacked vmap failed)."""
    torch.manual_seed(0)
    module = MCDropout(_TinyBert(attention), num_samples=4).eval()
    with torch.no_grad():
        logits = module.predictive(torch.randint(0, 50, (2, 5))).logits
    assert len({tuple(sample.flatten().tolist()) for sample in logits}) == 4
    assert not any(m.training for m in module.backbone.modules())


def test_mc_dropout_without_dropout_layers_is_an_error():
    with pytest.raises(ValueError, match="dropout"):
        MCDropout(_mlp(0.0))


def test_ensemble_vectorised_forward_equals_members_one_by_one():
    torch.manual_seed(0)
    ensemble = DeepEnsemble(_mlp(), num_members=4, vectorize=True).eval()
    x = torch.randn(7, 4)
    looped = torch.stack([member(x) for member in ensemble.members])
    torch.testing.assert_close(ensemble(x), looped, rtol=1e-6, atol=1e-6)
    ensemble.vectorize = "auto"  # the default: a loop on a CPU, vmap on a GPU
    assert not ensemble.vectorized() and DeepEnsemble(_mlp(), num_members=2).vectorize == "auto"
    torch.testing.assert_close(ensemble(x), looped, rtol=0, atol=0)
    weights = [m[0].weight for m in ensemble.members]
    assert all(not torch.equal(weights[0], w) for w in weights[1:]), "members must be re-initialised"
    pred = ensemble.predictive(x)
    torch.testing.assert_close(pred.probs, torch.softmax(looped, -1).mean(0), rtol=1e-6, atol=1e-6)


def test_ensemble_gradient_of_each_member_is_its_own_loss_gradient():
    torch.manual_seed(0)
    ensemble = DeepEnsemble(_mlp(), num_members=3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ensemble.training_step((x, y), 0).backward()
    for member in ensemble.members:
        reference = [p.detach().clone().requires_grad_() for p in member.parameters()]
        out = torch.func.functional_call(member, dict(zip([n for n, _ in member.named_parameters()], reference)), (x,))
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), reference)
        for p, g in zip(member.parameters(), grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


class _RawRegressor(nn.Module):
    """Parameters held directly, with no layer ``reset_parameters()`` to re-draw them."""

    def __init__(self, with_layer: bool = False) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.zeros(2))
        self.layer = nn.Linear(2, 2) if with_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x @ self.w + self.b)


def test_an_ensemble_whose_members_could_not_differ_is_refused_and_a_partial_one_warns():
    """Parameters outside any layer's reset_parameters() were copied unchanged: a backbone made of them gave M
    identical members (MAP at M times the cost, mutual information 0)."""
    with pytest.raises(ValueError, match=r"none of _RawRegressor's has one \(e.g. \['w', 'b'\]\)"):
        DeepEnsemble(_RawRegressor(), num_members=3)
    with pytest.warns(UserWarning, match=r"2 trainable parameters of _RawRegressor .* start equal .*\['w', 'b'\]"):
        ensemble = DeepEnsemble(_RawRegressor(with_layer=True), num_members=3)
    assert not torch.equal(ensemble.members[0].layer.weight, ensemble.members[1].layer.weight)
    for bad in (1, 2.0, True):
        with pytest.raises(ValueError, match=f"num_members must be an int >= 2 for an ensemble; got {bad!r}"):
            DeepEnsemble(_mlp(), num_members=bad)


def test_ensemble_with_batchnorm_runs_members_in_turn():
    backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    ensemble = DeepEnsemble(backbone, num_members=2, vectorize=True)
    assert not ensemble.vectorized()
    assert ensemble(torch.randn(5, 4)).shape == (2, 5, 3)


def test_gaussian_ensemble_mixture_moments():
    torch.manual_seed(0)
    ensemble = DeepEnsemble(nn.Linear(3, 1), num_members=3, likelihood="gaussian").eval()
    x = torch.randn(6, 3)
    pred = ensemble.predictive(x)
    means = torch.stack([m(x) for m in ensemble.members])
    noise = torch.stack([torch.nn.functional.softplus(lik.raw_noise) ** 2 + 1e-6 for lik in ensemble.likelihoods])
    torch.testing.assert_close(pred.mean, means.mean(0))
    torch.testing.assert_close(pred.variance, noise.mean(0).expand(6, 1) + means.var(0, unbiased=False))


def test_each_gaussian_member_learns_its_own_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each member's noise gets the gradient of that member's NLL alone (Lakshminarayanan et al. 2017: every
    network of the ensemble is a full Gaussian model); one shared noise would get the sum of both."""
    torch.manual_seed(0)
    ensemble = DeepEnsemble(nn.Linear(3, 1), num_members=2, likelihood="gaussian")
    monkeypatch.setattr(ensemble, "log_training_loss", lambda *args, **kwargs: None)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    ensemble.training_step((x, y), 0).backward()
    gradients = []
    for member, likelihood in zip(ensemble.members, ensemble.likelihoods):
        own = GaussianLikelihood()
        own.load_state_dict(likelihood.state_dict())
        own.loss(member(x).detach(), y).backward()
        torch.testing.assert_close(likelihood.raw_noise.grad, own.raw_noise.grad)
        gradients.append(own.raw_noise.grad)
    assert not torch.allclose(gradients[0], gradients[1])  # the members differ, so would a shared noise's parts


def test_weight_decay_leaves_a_gaussian_likelihoods_noise_alone():
    """AdamW's decay pulled the learned noise towards softplus(0) = 0.69 (a noise sd 7% too wide at 0.1 on a clean
    linear fit): one step with zero gradients decays the weights by lr * wd and leaves the noise where it was."""
    import functools

    module = MAP(nn.Linear(1, 1), likelihood=GaussianLikelihood(1, init_noise=0.05),
                 optimizer=functools.partial(torch.optim.AdamW, lr=0.1, weight_decay=0.5))
    optimizer = module.configure_optimizers()
    decayed, kept = optimizer.param_groups
    assert [p is module.likelihood.raw_noise for p in kept["params"]] == [True] and kept["weight_decay"] == 0.0
    assert len(decayed["params"]) == 2 and decayed["weight_decay"] == 0.5
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in module.named_parameters():
        factor = 1.0 if name.startswith("likelihood.") else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-7, atol=0, msg=name)

    members = DeepEnsemble([nn.Linear(1, 1), nn.Linear(1, 1)], likelihood=GaussianLikelihood(1),
                           optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.5))  # one noise per member
    kept = members.configure_optimizers().param_groups[1]
    assert {id(p) for p in kept["params"]} == {id(p) for p in members.likelihoods.parameters()}
    assert len(kept["params"]) == 2 and kept["weight_decay"] == 0.0
    for undecayed in (torch.optim.Adam, torch.optim.LBFGS):  # one group: earlier checkpoints resume, LBFGS builds
        plain = MAP(nn.Linear(1, 1), likelihood=GaussianLikelihood(1), optimizer=undecayed)
        assert len(plain.configure_optimizers().param_groups) == 1


def test_non_finite_loss_stops_with_a_clear_error():
    module = MAP(_mlp())
    hint = r"\(lower the learning rate or check the inputs\)"
    with pytest.raises(FloatingPointError, match=r"training loss is nan at global step 0; .*" + hint):
        module.on_before_backward(torch.tensor(float("nan")))


def test_a_non_finite_loss_after_a_non_finite_gradient_names_the_parameter():
    """A finite loss whose gradient was not (e.g. a kernel's NaN backward) leaves NaN parameters after the step: the
    error names the first one and the Trainer flag that finds the operation, not the learning rate."""
    module = MAP(_mlp())
    with torch.no_grad():
        module.backbone[3].weight[0, 1] = float("nan")
    named = r"parameter 'backbone\.3\.weight' is already non-finite.*detect_anomaly"
    with pytest.raises(FloatingPointError, match=named):
        module.on_before_backward(torch.tensor(float("nan")))


@pytest.mark.parametrize("vectorize", [True, False])
def test_ensemble_clips_each_members_gradient_by_its_own_norm(vectorize: bool):
    """Trainer(gradient_clip_val=c): every member steps as if trained alone with that clipping."""

    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ensemble = DeepEnsemble(_mlp(), num_members=3, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), vectorize=vectorize)
    with torch.no_grad():  # members far apart, so their gradient norms differ
        for scale, member in zip((1.0, 3.0, 10.0), ensemble.members):
            for p in member.parameters():
                p.mul_(scale)
    start = [[p.detach().clone().requires_grad_() for p in member.parameters()] for member in ensemble.members]
    expected = []
    for member, params in zip(ensemble.members, start):
        names = [n for n, _ in member.named_parameters()]
        out = torch.func.functional_call(member, dict(zip(names, params)), (x,))
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), params)
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        assert norm > 0.05, "the clip value must bind for every member"
        expected.append([(p - g * (0.05 / (norm + 1e-6))).detach() for p, g in zip(params, grads)])  # clip_grad_norm_'s
    trainer = Trainer(max_steps=1, gradient_clip_val=0.05, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(ensemble, DataLoader(TensorDataset(x, y), batch_size=16))
    for member, want in zip(ensemble.members, expected):
        for p, w in zip(member.parameters(), want):
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


def test_ensemble_leaves_a_fused_optimiser_under_mixed_precision_to_lightnings_refusal():
    """A fused optimiser unscales inside its step: under a loss scaler (16-mixed) the member-wise clipping met scaled
    gradients. As for any module, Lightning refuses clipping it under mixed precision."""
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ensemble = DeepEnsemble(_mlp(), num_members=2, optimizer=lambda p: torch.optim.AdamW(p, fused=True))
    trainer = Trainer(max_steps=1, gradient_clip_val=0.05, precision="bf16-mixed", logger=False, accelerator="cpu",
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        trainer.fit(ensemble, DataLoader(TensorDataset(x, y), batch_size=16))


def _dropout_fit(epochs: int, root: Path, ckpt_path: str | None, callbacks: list[Callback]) -> MCDropout:
    torch.manual_seed(0)  # the same initial weights; the checkpoint then restores the global generator
    module = MCDropout(MLP(64, 10, hidden=[16], dropout=0.3), num_samples=3)
    Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks, limit_val_batches=2,  # with a sanity check
    ).fit(module, datamodule=DigitsDataModule(batch_size=64, shuffle=False), ckpt_path=ckpt_path, weights_only=False)
    return module


@pytest.mark.parametrize("stop", STOPS)
def test_resumed_dropout_training_draws_the_unstopped_masks(tmp_path: Path, stop: str) -> None:
    """The global generator the masks come from is checkpoint state (BayesianModule): without it the resumed fit
    restarts the stream and its weights differ (by 0.018 here). Inside an epoch, the datamodule's training
    loader (a ``StatefulDataLoader``) goes on from the saved batch."""
    assert_resumption_is_exact(_dropout_fit, tmp_path, epochs=3, stop=stop)


def test_a_fit_resumed_from_an_epochs_last_batch_draws_the_unstopped_masks(tmp_path: Path) -> None:
    """A checkpoint on an epoch's last batch comes before that epoch's validation, which Lightning skips on resume:
    the unstopped fit's validation had drawn dropout masks from the global generator, so every later training mask
    differed (weights 0.015 apart). Validation inside a fit now leaves the generator as it found it."""
    straight = _dropout_fit(3, tmp_path / "straight", None, [])
    every = ModelCheckpoint(tmp_path / "steps", every_n_train_steps=17, save_top_k=-1)  # 17 batches an epoch
    _dropout_fit(1, tmp_path / "stopped", None, [every])
    resumed = _dropout_fit(3, tmp_path / "resumed", str(tmp_path / "steps" / "epoch=0-step=17.ckpt"), [])
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), name


def test_resuming_inside_an_epoch_with_a_loader_without_state_warns_that_it_restarts(tmp_path: Path) -> None:
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    loader = DataLoader(data.train_set, batch_size=64, shuffle=True)  # a user's loader: 1,077 images, 17 batches
    options = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_checkpointing": False}
    saving = Trainer(max_epochs=2, callbacks=[SavesInsideAnEpoch(tmp_path / "mid.ckpt")], **options)
    saving.fit(MAP(MLP(64, 10)), loader)
    resumed = Trainer(max_epochs=2, **options)
    with pytest.warns(UserWarning, match=r"saved inside an epoch \(after batch 3 of 17\).*see batches 0 to 13"):
        resumed.fit(MAP(MLP(64, 10)), loader, ckpt_path=tmp_path / "mid.ckpt", weights_only=False)


def test_resuming_by_epochs_a_fit_stopped_by_max_steps_warns_of_the_batches_left_out(tmp_path: Path) -> None:
    """A fit stopped by max_steps=5 writes last.ckpt as its epoch ends: resumed by epochs, Lightning counts that epoch
    done and 12 of its 17 batches were never trained, without a word (resumed by max_steps it goes on inside)."""
    import warnings

    data = DigitsDataModule(batch_size=64)
    options = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    Trainer(max_steps=5, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], **options).fit(
        MAP(MLP(64, 10)), datamodule=data)
    resumed = Trainer(max_epochs=2, enable_checkpointing=False, **options)
    with pytest.warns(UserWarning, match=r"MAP resumes from a checkpoint written as epoch 0 ended after 5 of its 17 "
                      r"batches \(.*\): Lightning counts that epoch done, so its other 12 batches are not trained"):
        resumed.fit(MAP(MLP(64, 10)), datamodule=data, ckpt_path=tmp_path / "last.ckpt", weights_only=False)
    assert resumed.global_step == 22  # 5 + one epoch of 17
    by_steps = Trainer(max_steps=34, enable_checkpointing=False, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "MAP resumes from a checkpoint written as epoch")
        by_steps.fit(MAP(MLP(64, 10)), datamodule=data, ckpt_path=tmp_path / "last.ckpt", weights_only=False)
    assert by_steps.global_step == 34


def test_a_partly_frozen_layer_keeps_its_frozen_weight_shared_by_every_member():
    """A layer with a frozen weight and a trainable bias is not reset (``reset_parameters`` would redraw the frozen
    weight in place, the tensor every member and the user's backbone share)."""
    import warnings

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    net[0].weight.requires_grad_(False)
    before = net[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # members start equal in the partly frozen layer: warned
        ensemble = DeepEnsemble(net, num_members=3)
    assert torch.equal(ensemble.members[0][0].weight, before)
    assert all(member[0].weight is ensemble.members[0][0].weight for member in ensemble.members)


def test_a_command_line_checkpoint_of_another_method_is_named_as_such(tmp_path: Path) -> None:
    """Lightning called it a class "blocked to prevent arbitrary code execution" to be imported first (MAP was)."""
    from lightning_bayes.modules import IVONModule

    model = MAP(MLP(64, 10, hidden=[8]))
    checkpoint = {  # what LightningCLI saves: the class path and its instantiator among the hyperparameters
        "state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0",
        "hyper_parameters": {"_class_path": "lightning_bayes.modules.MAP",
                             "_instantiator": "lightning.pytorch.cli.instantiate_module"},
    }
    torch.save(checkpoint, tmp_path / "map.ckpt")
    refused = r"map.ckpt' is a checkpoint of lightning_bayes.modules.MAP, not of IVONModule: load it with MAP.load_from"
    with pytest.raises(ValueError, match=refused):
        IVONModule.load_from_checkpoint(tmp_path / "map.ckpt", backbone=MLP(64, 10, hidden=[8]))
    loaded = MAP.load_from_checkpoint(tmp_path / "map.ckpt", backbone=MLP(64, 10, hidden=[8]))
    assert isinstance(loaded, MAP)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(TypeError):  # as Lightning's: not on an instance
        model.load_from_checkpoint(tmp_path / "map.ckpt")


def test_a_checkpoint_of_another_network_says_the_network_comes_from_the_constructor(tmp_path: Path) -> None:
    """torch names the tensors that do not fit; the user is told where the network comes from (not the file)."""
    model = MAP(MLP(64, 10, hidden=[8]))
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0"}, tmp_path / "map.ckpt")
    with pytest.raises(RuntimeError, match=r"(?s)size mismatch for backbone.*built from the constructor's arguments"):
        MAP.load_from_checkpoint(tmp_path / "map.ckpt", backbone=MLP(64, 10, hidden=[16]))
    with pytest.raises(RuntimeError, match=r"(?s)Unexpected key.*not read from the checkpoint"):
        MAP(MLP(64, 10, hidden=[8])).load_state_dict({**model.state_dict(), "extra": torch.zeros(1)})
    loaded = MAP.load_from_checkpoint(tmp_path / "map.ckpt", backbone=MLP(64, 10, hidden=[8]))
    assert torch.equal(loaded.backbone.head.weight, model.backbone.head.weight)


def test_a_checkpoint_of_another_network_lists_a_few_keys_of_each_kind() -> None:
    """A LoRA model's mismatch listed some 200 names (17 KB) before the hint."""
    wide, narrow = MAP(MLP(64, 10, hidden=[8] * 12)), MAP(MLP(64, 10, hidden=[16]))
    with pytest.raises(RuntimeError) as refused:
        narrow.load_state_dict(wide.state_dict())
    message = str(refused.value)
    assert re.search(r'Unexpected key\(s\) in state_dict: ("[^"]+", ){5}\.\.\. \(22 in all\)', message)
    assert message.count("size mismatch") == 3 and "built from the constructor's arguments" in message


def test_an_ensemble_of_probes_shares_one_frozen_backbone_and_its_feature_cache(tmp_path: Path) -> None:
    """M probes on one frozen backbone compute each example's features once (not M times) and keep one cache; the
    members stay independent heads, run in a loop (inside vmap no value can be read to key the cache), and a
    checkpoint restores them."""
    from lightning_bayes.models import LinearProbe

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.num_features, self.rows = nn.Linear(4, 6), 6, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.rows += len(x)
            return torch.tanh(self.layer(x))

    torch.manual_seed(0)
    backbone = Counting()
    with pytest.warns(UserWarning, match=r"vectorize=True\) runs its members in a loop: a feature cache"):
        ensemble = DeepEnsemble(LinearProbe(backbone, 3, cache_features=True), num_members=3, vectorize=True)
    assert not ensemble.vectorized() and all(m.backbone is ensemble.members[0].backbone for m in ensemble.members)
    x = torch.randn(10, 4)
    outputs = ensemble(x)
    for _ in range(2):
        assert torch.equal(ensemble(x), outputs)
    assert backbone.rows == 10  # three members, three calls: the features of 10 examples computed once
    features = torch.tanh(backbone.layer(x))
    for member, output in zip(ensemble.members, outputs):
        torch.testing.assert_close(output, member.head(features), rtol=0, atol=0)
    assert not torch.equal(outputs[0], outputs[1])
    torch.save(ensemble.state_dict(), tmp_path / "ensemble.pt")
    torch.manual_seed(1)
    restored = DeepEnsemble(LinearProbe(Counting(), 3, cache_features=True), num_members=3)
    restored.load_state_dict(torch.load(tmp_path / "ensemble.pt"))
    torch.testing.assert_close(restored(x), outputs, rtol=0, atol=0)



def test_fsdp1_is_refused_on_two_processes_only_for_a_method_without_support() -> None:
    """FSDP1 needs CUDA, so the module meets a stand-in for the Trainer (the check reads only these two)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = DeepEnsemble(_mlp(), num_members=2)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(ValueError, match=r"DeepEnsemble does not support FSDP1 .* on 2 processes"):
        module._refuse_multi_process_fsdp1()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=1)
    module._refuse_multi_process_fsdp1()  # one process: every parameter is whole


def test_predict_step_on_an_x_y_batch_predicts_from_x():
    torch.manual_seed(0)
    module = MAP(_mlp()).eval()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5, 4)).float()  # y shaped like x: a wrong pick would run
    torch.testing.assert_close(module.predict_step((x, y), 0).probs, module.predictive(x).probs)
    torch.testing.assert_close(module.predict_step(x, 0).probs, module.predictive(x).probs)


@pytest.mark.parametrize("ready, expected", [(0, 0), (1, 1), (3, 3), (5, 0)])
def test_batches_done_at_resume_counts_the_batches_of_a_part_done_epoch(ready: int, expected: int):
    """Lightning's batch progress of the epoch under way (5 batches): 0 and a finished epoch count as none."""
    from types import SimpleNamespace

    module = MAP(_mlp())
    progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
    module._trainer = SimpleNamespace(
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)), num_training_batches=5
    )
    assert module.batches_done_at_resume() == expected


def test_validation_and_test_log_the_negative_log_likelihood():
    """val/nll and test/nll: the mean of -log p(y | x) over the examples (positive for a classifier)."""
    torch.manual_seed(0)
    module = MAP(_mlp())
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    loader = DataLoader(TensorDataset(x, y), batch_size=12)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    expected = -module.eval().predictive(x).log_prob(y).mean()
    assert float(expected) > 0
    [validated] = trainer.validate(module, loader, verbose=False)
    [tested] = trainer.test(module, loader, verbose=False)
    torch.testing.assert_close(torch.tensor(validated["val/nll"]), expected.detach())
    torch.testing.assert_close(torch.tensor(tested["test/nll"]), expected.detach())


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_the_logged_nll_leaves_out_a_distributed_samplers_repeats(stage: str) -> None:
    """Rank 1 of 2 over 7 examples gets examples 1, 3, 5 and a repeat of example 0 (DistributedSampler pads to equal
    shares): ``{stage}/nll`` is the mean over the three, as the calibration metrics' NLL is (each example once,
    across ranks); batches of 3 put the repeat alone in the second batch."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_size=3, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    module = MAP(_mlp()).eval()
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    (logged,) = getattr(trainer, stage)(module, loader, verbose=False)
    key = "val/nll" if stage == "validate" else "test/nll"
    expected = torch.nn.functional.cross_entropy(module(x[[1, 3, 5]]), y[[1, 3, 5]])
    assert logged[key] == pytest.approx(expected.item(), rel=1e-6)


def test_validating_a_best_checkpoint_scores_it_as_the_fit_did(tmp_path: Path) -> None:
    """The best checkpoint holds the global generators' states from where its epoch's validation started, after that
    validation's loader drew a seed; a validate of it restored them and its loader drew again, so MC dropout's masks
    (and the val NLL) differed from the fit's (IVON on digits: 0.4064 against 0.4040)."""
    torch.manual_seed(0)
    x, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/nll", filename="best")
    options = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    Trainer(max_epochs=3, callbacks=[checkpoint], default_root_dir=tmp_path, **options).fit(
        MCDropout(_mlp(0.5), num_samples=8), train, val
    )
    (validated,) = Trainer(**options).validate(MCDropout(_mlp(0.5), num_samples=8), val,
                                               ckpt_path=checkpoint.best_model_path, verbose=False, weights_only=False)
    assert validated["val/nll"] == float(checkpoint.best_model_score)


def test_a_validate_that_never_reached_its_loop_leaves_the_next_validate_its_own_draws(tmp_path: Path) -> None:
    """A checkpoint's generator states wait for its validate's loop; with none (limit_val_batches=0) they are dropped
    at the next set-up, not restored by a later validate of the module as it is."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    options = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    module = MCDropout(_mlp(0.5), num_samples=8)
    Trainer(max_epochs=1, default_root_dir=tmp_path, **options).fit(module, data, data)
    (saved,) = tmp_path.rglob("*.ckpt")
    Trainer(limit_val_batches=0, **options).validate(module, data, ckpt_path=saved, verbose=False, weights_only=False)
    scores = []
    for _ in range(2):
        torch.manual_seed(5)
        scores.append(Trainer(**options).validate(module, data, verbose=False)[0]["val/nll"])
    assert scores[0] == scores[1]
