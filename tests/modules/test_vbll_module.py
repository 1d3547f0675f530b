"""VBLLClassifier / VBLLRegressor: shapes, dtypes, tempering, optimiser groups, frozen mode, checkpoints."""

import functools

import lightning
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.inference.vbll import DiscriminativeVBLL, GenerativeVBLL, VBLLRegression
from lightning_bayes.models import MLP, LeNet5
from lightning_bayes.modules.vbll import VBLLClassifier, VBLLRegressor, head_loss
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive


pytestmark = pytest.mark.usefixtures("single_thread")


def _backbone_with_state() -> nn.Module:
    """Features with BatchNorm running statistics and dropout: what eval mode must freeze."""
    backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
    backbone.num_features = 8
    return backbone


def _loader(targets: torch.Tensor, n: int = 32) -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 6), targets), batch_size=8)


def _trainer(**kwargs) -> lightning.Trainer:
    return lightning.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class _Data(lightning.LightningDataModule):
    def __init__(self, loader: DataLoader) -> None:
        super().__init__()
        self.loader = loader

    @property
    def num_train(self) -> int:
        return len(self.loader.dataset)

    def train_dataloader(self) -> DataLoader:
        return self.loader


@pytest.mark.parametrize("head,samples", [("discriminative", 20), ("generative", 1)])
def test_classifier_on_lenet_predictive_shapes(head, samples):
    torch.manual_seed(0)
    module = VBLLClassifier(LeNet5(num_classes=0), num_classes=10, head=head, dataset_size=100).eval()
    assert module.num_samples == samples and module.head.in_features == 84
    pred = module.predictive(torch.randn(3, 1, 28, 28))
    assert isinstance(pred, CategoricalPredictive) and pred.logits.shape == (samples, 3, 10)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(3))
    assert module.predictive(torch.randn(3, 1, 28, 28), num_samples=5).logits.shape[0] == (
        5 if head == "discriminative" else 1
    )


def test_regressor_predictive_is_the_heads_closed_form():
    torch.manual_seed(0)
    module = VBLLRegressor(MLP(3, 0, hidden=[16]), out_features=2, dataset_size=50).eval()
    x = torch.randn(4, 3)
    pred = module.predictive(x)
    assert isinstance(pred, GaussianPredictive) and pred.mean_samples.shape == (1, 4, 2)
    expected = module.head.predictive(module.backbone(x))
    torch.testing.assert_close(pred.variance, expected.variance)


def test_training_step_logs_terms_and_reaches_the_backbone():
    torch.manual_seed(0)
    module = VBLLClassifier(MLP(6, 0, hidden=[8]), num_classes=3, dataset_size=40, kl_weight=2.0)
    assert module.head.regularization_weight == pytest.approx(2.0 / 40)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    loss = module.training_step((x, y), 0)
    terms = module.head.loss(module.backbone(x), y)
    torch.testing.assert_close(loss, terms.total)
    torch.testing.assert_close(logged["train/loss"], terms.nll + (2.0 / 40) * terms.regularizer)
    assert set(logged) == {"train/nll", "train/regularizer", "train/kl_scale", "train/loss"}
    assert float(logged["train/kl_scale"]) == pytest.approx(2.0 / 40)
    torch.testing.assert_close(logged["train/regularizer"], terms.regularizer.detach())
    loss.backward()
    for name, p in module.backbone.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_bf16_autocast_keeps_the_head_in_float32():
    torch.manual_seed(0)
    module = VBLLClassifier(MLP(6, 0, hidden=[16]), num_classes=4, dataset_size=10)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = module(x)
        loss = module.training_step((x, y), 0)
        pred = module.predictive(x)
    assert features.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and pred.logits.dtype == torch.float32
    # the head sees the bf16 features exactly, in float32
    torch.testing.assert_close(loss, module.head.loss(features.float(), y).total, rtol=0, atol=0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_optimizer_puts_weight_decay_on_the_backbone_only():
    module = VBLLClassifier(MLP(6, 0, hidden=[8]), num_classes=3, dataset_size=10,
                            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))  # fmt: skip
    backbone_group, head_group = module.configure_optimizers().param_groups
    assert backbone_group["weight_decay"] == 0.1 and head_group["weight_decay"] == 0.0
    assert {id(p) for p in head_group["params"]} == {id(p) for p in module.head.parameters()}
    assert {id(p) for p in backbone_group["params"]} == {id(p) for p in module.backbone.parameters()}


def test_frozen_backbone_stays_unchanged_in_eval_mode_while_the_head_trains():
    torch.manual_seed(0)
    module = VBLLClassifier(_backbone_with_state(), num_classes=3, freeze_backbone=True, dataset_size=32)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    assert len(module.configure_optimizers().param_groups) == 1
    _trainer().fit(module, _loader(torch.randint(0, 3, (32,))))
    assert not module.backbone.training
    for name, value in module.backbone.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(v, head_before[k]) for k, v in module.head.state_dict().items())


class _Stream(torch.utils.data.IterableDataset):
    """Batches of unknown number: no N to read."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.dataset)


def test_dataset_size_is_read_from_the_datamodule_or_the_loader_or_is_a_clear_error():
    targets = torch.randint(0, 3, (32,))
    module = VBLLClassifier(_backbone_with_state(), num_classes=3, kl_weight=0.5)
    _trainer().fit(module, datamodule=_Data(_loader(targets)))
    assert module.training_size == 32 and module.hparams.dataset_size is None
    assert module.head.regularization_weight == pytest.approx(0.5 / 32)
    _trainer().fit(module, datamodule=_Data(_loader(torch.randint(0, 3, (64,)), n=64)))  # new data: its N
    assert module.training_size == 64 and module.head.regularization_weight == pytest.approx(0.5 / 64)
    plain = VBLLRegressor(_backbone_with_state(), kl_weight=0.5)  # trainer.fit(model, loader): attached after setup
    _trainer().fit(plain, _loader(torch.randn(48, 1), n=48))
    assert plain.training_size == 48 and plain.head.regularization_weight == pytest.approx(0.5 / 48)
    with pytest.raises(ValueError, match="VBLLClassifier needs the training-set size N: pass dataset_size=N"):
        _trainer().fit(VBLLClassifier(_backbone_with_state(), num_classes=3), DataLoader(_Stream(_loader(targets))))


@pytest.mark.parametrize("kind", ["discriminative", "generative", "regression"])
def test_checkpoint_round_trip_gives_the_same_predictive(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "regression":
        make = functools.partial(VBLLRegressor, out_features=1, parameterization="lowrank", dataset_size=32)
        targets = torch.randn(32, 1)
    else:
        make = functools.partial(VBLLClassifier, num_classes=3, head=kind, dataset_size=32)
        targets = torch.randint(0, 3, (32,))
    module = make(_backbone_with_state())
    trainer = _trainer()
    trainer.fit(module, _loader(targets))
    path = tmp_path / "vbll.ckpt"
    trainer.save_checkpoint(path)
    cls = VBLLRegressor if kind == "regression" else VBLLClassifier
    # the hyperparameters hold the optimiser class (as MAP's do): a trusted file, loaded with weights_only=False
    restored = cls.load_from_checkpoint(path, backbone=_backbone_with_state(), weights_only=False)
    assert type(restored.head) is type(module.head)
    module.eval(), restored.eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = module.predictive(x)
        torch.manual_seed(1)
        actual = restored.predictive(x)
    if kind == "regression":
        torch.testing.assert_close(actual.mean_samples, expected.mean_samples, rtol=0, atol=0)
        torch.testing.assert_close(actual.variance_samples, expected.variance_samples, rtol=0, atol=0)
    else:
        torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)


def test_head_choice_and_bad_arguments():
    assert isinstance(VBLLClassifier(MLP(4, 0, hidden=[8]), 3, dataset_size=1).head, DiscriminativeVBLL)
    generative = VBLLClassifier(
        MLP(4, 0, hidden=[8]), 3, head="generative", class_prior=[0.2, 0.3, 0.5], dataset_size=1
    )
    assert isinstance(generative.head, GenerativeVBLL) and generative.head.means.parameterization == "diagonal"
    assert isinstance(VBLLRegressor(nn.Linear(4, 5), in_features=5, dataset_size=1).head, VBLLRegression)
    with pytest.raises(ValueError, match="num_features"):
        VBLLClassifier(nn.Linear(4, 5), 3)
    with pytest.raises(ValueError, match="head must be"):
        VBLLClassifier(MLP(4, 0, hidden=[8]), 3, head="bayes")
    with pytest.raises(ValueError, match="dataset_size"):
        VBLLClassifier(MLP(4, 0, hidden=[8]), 3, dataset_size=0)
    with pytest.raises(ValueError, match="class_prior"):
        VBLLClassifier(MLP(4, 0, hidden=[8]), 3, class_prior=[0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="bound applies"):
        VBLLClassifier(MLP(4, 0, hidden=[8]), 3, head="generative", bound="mc")


@pytest.mark.parametrize(
    "make_head,target",
    [
        *[(functools.partial(DiscriminativeVBLL, 6, 4, 0.1, p, rank=2), "class") for p in ("dense", "diagonal", "lowrank")],
        *[(functools.partial(VBLLRegression, 6, 2, 0.1, p, rank=2), "vector") for p in ("dense", "diagonal", "lowrank")],
        (functools.partial(DiscriminativeVBLL, 6, 4, 0.1, "dense", bound="mc"), "class"),
        (functools.partial(GenerativeVBLL, 6, 4, 0.1), "class"),
    ],
)
def test_every_head_objective_traces_as_one_graph_with_eager_values_and_gradients(make_head, target):
    """``fullgraph=True`` raises at any graph break; AOTAutograd's traced forward and backward give eager's numbers
    (float64, same operations: to rounding). Inductor's code generation is :func:`compiled_head_loss`'s test below."""
    torch.manual_seed(0)
    head = make_head().double()
    features = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,)) if target == "class" else torch.randn(5, 2, dtype=torch.float64)
    torch._dynamo.reset()
    traced = torch.compile(head_loss, backend="aot_eager", fullgraph=True)
    inputs = [features, *head.parameters()]
    torch.manual_seed(1)  # the "mc" bound draws its logit samples inside the graph
    compiled = traced(head, features, y)
    torch.manual_seed(1)
    eager = head_loss(head, features, y)
    for name in ("nll", "regularizer", "total"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-12, atol=0)
    for got, want in zip(torch.autograd.grad(compiled.total, inputs), torch.autograd.grad(eager.total, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")
def test_compile_loss_trains_with_the_eager_loss_and_gradients_under_bf16_autocast():
    """The module's ``compile_loss`` (Inductor) against the eager step on the same weights and batch, bf16-mixed as on
    a GPU: the head computes in float32, so its loss and gradients differ only by the fused reductions' order (rtol
    1e-5); the features' gradient re-enters the backbone in bf16, where one rounding step (2^-8 relative) of a
    different float32 value moves the backbone's gradients by up to about 1% of their largest entry."""
    torch.manual_seed(0)
    eager = VBLLClassifier(MLP(6, 0, hidden=[16]), num_classes=4, dataset_size=10)
    compiled = VBLLClassifier(MLP(6, 0, hidden=[16]), num_classes=4, dataset_size=10, compile_loss=True)
    compiled.load_state_dict(eager.state_dict())
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    losses, grads = [], []
    for module in (eager, compiled):
        module.log = lambda *args, **kwargs: None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.training_step((x, y), 0)
        loss.backward()
        losses.append(loss)
        grads.append({name: p.grad for name, p in module.named_parameters()})
    assert losses[1].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for name, want in grads[0].items():
        if name.startswith("head."):
            torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(grads[1][name], want, rtol=0, atol=1e-2 * want.abs().max().item())
    with pytest.raises(ValueError, match="compile_loss must be True or False; got 'yes'"):
        VBLLClassifier(MLP(6, 0, hidden=[16]), num_classes=4, compile_loss="yes")


def test_the_monte_carlo_bounds_sample_count_reaches_the_head():
    module = VBLLClassifier(MLP(6, 0, hidden=[8]), num_classes=3, bound="mc", mc_samples=3, dataset_size=10)
    assert module.head.mc_samples == 3
