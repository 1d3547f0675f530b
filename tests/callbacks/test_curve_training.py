"""CurveTraining through the Trainer on two-moons: endpoints, frozen points, the exact gradients of the
curve-point weight decay and of the Jensen-Shannon regulariser, the barrier, the curve ensemble,
BatchNorm along the curve, LoRA tensors, files, removal and exact resumption. Float64 tanh MLPs
(2 -> 8 -> 8 -> 2) whose two endpoints are trained in the test from different seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from sklearn.datasets import make_moons
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_bayes.callbacks.calibration import CalibrationMetrics
from lightning_bayes.callbacks.curve_training import CurveTraining
from lightning_bayes.inference.curves import bernstein, polychain
from lightning_bayes.inference.jensen_shannon import jensen_shannon
from lightning_bayes.modules import MAP
from lightning_bayes.predictive import CategoricalPredictive

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainers without a logger write the loss-along-curve and metrics files into the working directory."""
    monkeypatch.chdir(tmp_path)


def moons(n: int = 256, seed: int = 0) -> TensorDataset:
    x, y = make_moons(n, noise=0.1, random_state=seed)
    return TensorDataset(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y))


def mlp(seed: int, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    middle = [nn.BatchNorm1d(8)] if batch_norm else []
    return nn.Sequential(nn.Linear(2, 8), *middle, nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def sgd(lr: float = 0.1, momentum: float = 0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two MAP solutions on two-moons from different seeds (full-batch Adam, 300 steps each)."""
    folder = tmp_path_factory.mktemp("endpoints")
    x, y = moons().tensors
    paths, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: the single_thread fixture does not reach here
    for seed in (1, 2):
        module = MAP(mlp(seed))
        optimizer = torch.optim.Adam(module.parameters(), lr=0.03)
        for _ in range(300):
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()
        paths.append(str(folder / f"seed{seed}.pt"))
        torch.save(module.state_dict(), paths[-1])
    torch.set_num_threads(threads)
    return paths[0], paths[1]


def trainer(epochs: int = 1, root: Path | None = None, callbacks: list | None = None, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=root is not None,
        default_root_dir=root,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def loader(shuffle: bool = False, batch_size: int = 64) -> DataLoader:
    return DataLoader(moons(), batch_size=batch_size, shuffle=shuffle)


def state(path: str) -> dict[str, Tensor]:
    return torch.load(path, weights_only=True)


def weights_at(module: nn.Module, names: list[str]) -> dict[str, Tensor]:
    return {name: _get(module, name).detach().clone() for name in names}


def _get(module: nn.Module, name: str) -> Tensor:
    owner, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(owner), attribute)


NAMES = [f"backbone.{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")]


@pytest.mark.parametrize("curve, num_bends", [("bezier", 3), ("bezier", 4), ("polychain", 4)])
def test_the_curve_returns_the_endpoints_exactly(endpoints, curve, num_bends):
    start, end = endpoints
    for t, source in ((0.0, start), (1.0, end)):
        module, callback = (
            MAP(mlp(0)),
            CurveTraining(params="all", curve=curve, num_bends=num_bends, start=start, end=end),
        )
        callback.setup(trainer(), module, "fit")
        callback.remove(module, t)
        assert not parametrize.is_parametrized(module)
        expected = state(source)
        assert all(torch.equal(_get(module, n), expected[n]) for n in NAMES)


def test_control_points_start_on_the_line_and_frozen_points_get_no_gradient(endpoints):
    start, end = endpoints
    module, callback = MAP(mlp(0), optimizer=sgd()), CurveTraining(params="all", num_bends=4, start=start, end=end)
    trainer(2, callbacks=[callback]).fit(module, loader(), loader())
    a, b = state(start), state(end)
    for name in NAMES:
        curve = callback.curves[name]
        assert [n for n, _ in curve.named_parameters()] == ["point_1", "point_2"]
        assert torch.equal(curve.point_0, a[name]) and torch.equal(curve.point_3, b[name])  # bitwise unchanged
        assert curve.point_0.grad is None and curve.point_3.grad is None
        assert not torch.equal(curve.point_1, torch.lerp(a[name], b[name], 1 / 3))  # trained away from the line


def test_segments_start_on_the_line_and_anchors_freeze_every_junction(endpoints):
    # two quadratic Bezier segments (5 control points): without anchors the junction starts at the line's midpoint;
    # with fix_anchors the endpoints and the junction (points 0, 2, 4) are frozen
    start, end = endpoints
    module = MAP(mlp(0))
    callback = CurveTraining(params="all", start=start, end=end, segments=2)
    callback.setup(trainer(), module, "fit")
    a, b = state(start), state(end)
    for name in NAMES:
        torch.testing.assert_close(callback.curves[name].point_2, 0.5 * (a[name] + b[name]), rtol=0, atol=1e-15)
    anchored = CurveTraining(params="all", start=start, end=end, segments=2, anchors=[end])
    anchored.setup(trainer(), MAP(mlp(0)), "fit")
    assert all(curve.trainable == (False, True, False, True, False) for curve in anchored.curves.values())
    free = CurveTraining(params="all", start=start, end=end, segments=2, anchors=[end], fix_anchors=False)
    free.setup(trainer(), MAP(mlp(0)), "fit")
    assert all(all(curve.trainable) for curve in free.curves.values())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_an_update_is_the_exact_gradient_of_the_loss_plus_curve_point_weight_decay(endpoints, accumulate):
    # with gradient accumulation each micro-batch draws its own t and adds (its loss + its decay) / accumulate
    start, end = endpoints
    wd, lr = 0.3, 0.5
    module = MAP(mlp(0), optimizer=sgd(lr))
    callback = CurveTraining(params="all", start=start, end=end, weight_decay=wd, seed=4)
    size = 256 // accumulate
    data = loader(batch_size=size)
    callback.setup(trainer(), module, "fit")
    before = {n: callback.curves[n].point_1.detach().clone() for n in NAMES}
    trainer(1, callbacks=[callback], limit_train_batches=accumulate, limit_val_batches=0,
            accumulate_grad_batches=accumulate).fit(module, data)
    generator = torch.Generator().manual_seed(4)
    ts = [float(torch.rand((), generator=generator, dtype=torch.float64)) for _ in range(accumulate)]
    assert callback.t == ts[-1]
    a, b = state(start), state(end)
    x, y = data.dataset.tensors
    middle = {n: before[n].clone().requires_grad_() for n in NAMES}
    plain, loss = mlp(0), 0.0
    for index, t in enumerate(ts):
        c = bernstein(t, 2)[0].tolist()
        theta = {n: c[0] * a[n] + c[1] * middle[n] + c[2] * b[n] for n in NAMES}
        rows = slice(index * size, (index + 1) * size)
        logits = functional_call(plain, {n[9:]: v for n, v in theta.items()}, (x[rows],))
        decay = 0.5 * wd * sum(v.square().sum() for v in theta.values())
        loss = loss + (nn.functional.cross_entropy(logits, y[rows]) + decay) / accumulate
    grads = torch.autograd.grad(loss, [middle[n] for n in NAMES])
    for name, grad in zip(NAMES, grads):
        torch.testing.assert_close(callback.curves[name].point_1.detach(), before[name] - lr * grad, rtol=0, atol=1e-12)


def test_the_jensen_shannon_term_is_subtracted_from_the_loss_and_its_gradient_is_exact(endpoints):
    start, end = endpoints
    lam, lr, draws = 0.5, 0.5, 3
    module = MAP(mlp(0), optimizer=sgd(lr))
    callback = CurveTraining(params="all", start=start, end=end, js_weight=lam, samples_per_step=draws, seed=5)
    data = loader(batch_size=256)
    callback.setup(trainer(), module, "fit")
    before = {n: callback.curves[n].point_1.detach().clone() for n in NAMES}
    trainer(1, callbacks=[callback], limit_train_batches=1, limit_val_batches=0).fit(module, data)
    generator = torch.Generator().manual_seed(5)
    t = float(torch.rand((), generator=generator, dtype=torch.float64))
    ts = torch.rand(draws, generator=generator, dtype=torch.float64).tolist()
    a, b = state(start), state(end)
    x, y = data.dataset.tensors
    middle = {n: before[n].clone().requires_grad_() for n in NAMES}
    plain = mlp(0)

    def logits_at(time: float) -> Tensor:
        c = bernstein(time, 2)[0].tolist()
        theta = {n[9:]: c[0] * a[n] + c[1] * middle[n] + c[2] * b[n] for n in NAMES}
        return functional_call(plain, theta, (x,))

    members = torch.stack([torch.log_softmax(logits_at(s), -1) for s in ts])
    js = jensen_shannon(members).mean()
    loss = nn.functional.cross_entropy(logits_at(t), y) - lam * js
    grads = torch.autograd.grad(loss, [middle[n] for n in NAMES])
    for name, grad in zip(NAMES, grads):
        torch.testing.assert_close(callback.curves[name].point_1.detach(), before[name] - lr * grad, rtol=0, atol=1e-12)
    assert js.item() > 0


def test_the_jensen_shannon_passes_run_in_training_mode(endpoints):
    """The J passes run in the module's training mode, as its own step does (the predictive a BayesianModule
    evaluates in eval mode is taken as written there): a dropout layer sees training=True in every pass."""
    start, end = endpoints

    module = MAP(nn.Sequential(*mlp(0), nn.Dropout(0.2)))  # the end points' parameter names are kept
    seen = []
    module.backbone[5].register_forward_hook(lambda layer, inputs, output: seen.append(layer.training))
    callback = CurveTraining(params="all", start=start, end=end, js_weight=0.1, samples_per_step=2)
    trainer(callbacks=[callback], limit_train_batches=2).fit(module, loader(), loader())
    assert len(seen) >= 2 * 3 and all(seen[: 2 * 3])  # two steps of one own pass and two J passes each, all training


def test_the_trained_curve_has_no_barrier_where_the_straight_line_has_one(endpoints):
    start, end = endpoints
    module = MAP(mlp(0), optimizer=sgd(0.1, momentum=0.9))
    callback = CurveTraining(params="all", start=start, end=end, grid_points=21)
    fit = trainer(1, callbacks=[callback], limit_train_batches=0)
    fit.validate(module, loader())
    line_before = callback.grid_values["val"]["line_nll"]
    assert callback.grid_values["val"]["curve_nll"] == pytest.approx(line_before, abs=1e-12)  # starts on the line
    trainer(30, callbacks=[callback]).fit(module, loader(shuffle=True, batch_size=32), loader())
    values = callback.grid_values["val"]
    endpoint_nll = max(values["curve_nll"][0], values["curve_nll"][-1])
    barrier = max(values["line_nll"]) - endpoint_nll
    assert barrier > 0.2, f"the straight line should show a barrier; got {barrier:.3f}"
    assert max(values["curve_nll"]) - endpoint_nll < 0.25 * barrier
    assert values["line_nll"] == pytest.approx(line_before, abs=1e-12)  # the line never moves


def test_the_curve_ensemble_is_the_predictive_at_validation_test_and_predict_only(endpoints):
    start, end = endpoints
    module = MAP(mlp(0))
    callback = CurveTraining(params="all", start=start, end=end, ensemble_points=4)
    x, y = moons().tensors
    calibration = CalibrationMetrics()
    fit = trainer(1, callbacks=[callback, calibration], limit_train_batches=0)
    fit.test(module, loader(batch_size=256))
    members = []
    for t in (0.125, 0.375, 0.625, 0.875):
        c = bernstein(t, 2)[0].tolist()
        a, b, m = state(start), state(end), {n: callback.curves[n].point_1 for n in NAMES}
        theta = {n[9:]: c[0] * a[n] + c[1] * m[n] + c[2] * b[n] for n in NAMES}
        members.append(functional_call(mlp(0), theta, (x,)))
    expected = CategoricalPredictive(torch.stack(members).detach())
    ensemble = callback.predictive(module, x)
    torch.testing.assert_close(ensemble.logits, expected.logits, rtol=0, atol=1e-12)
    nll = float(-expected.log_prob(y).mean())
    assert fit.callback_metrics["test/nll"].item() == pytest.approx(nll, abs=1e-12)
    assert calibration.last_metrics["test/cal/mi"] == pytest.approx(float(expected.mutual_information.mean()), abs=1e-6)
    assert "predictive" not in module.__dict__  # the module's own predictive is back
    (predicted,) = fit.predict(module, loader(batch_size=256))  # lightning-bayes predict: the ensemble too
    torch.testing.assert_close(predicted.logits, expected.logits, rtol=0, atol=1e-12)
    assert "predictive" not in module.__dict__
    assert module.predictive(x).num_samples == 1


class BatchNormClassifier(LightningModule):
    """Any LightningModule (no ``predictive``): the callback reads ``forward`` as logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(0, batch_norm=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MoonsData(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader(batch_size=64)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(moons(64, seed=3), batch_size=64)


def test_batch_norm_statistics_are_re_estimated_at_every_t_and_restored_afterwards():
    torch.manual_seed(7)
    module = BatchNormClassifier()
    ends = [{n: torch.randn_like(p) for n, p in module.named_parameters()} for _ in range(2)]
    data = MoonsData()
    callback = CurveTraining(params="all", curve="polychain", num_bends=2, grid_points=3, line=False)
    with torch.no_grad():  # the endpoints: the module's own tensors (start) and a random far end
        for name, value in ends[0].items():
            _get(module, name).copy_(value)
    callback.setup(trainer(), module, "fit")
    for name, curve in callback.curves.items():
        curve.point_1.data.copy_(ends[1][name])
    buffers = {name: value.clone() for name, value in module.named_buffers()}
    trainer(callbacks=[callback]).validate(module, datamodule=data)
    for name, value in module.named_buffers():  # the training statistics are back, and the batch count too
        assert torch.equal(value, buffers[name]), name
    x, y = data.val_dataloader().dataset.tensors
    for index, t in enumerate((0.0, 0.5, 1.0)):
        reference = mlp(0, batch_norm=True)
        with torch.no_grad():
            for name, value in ends[0].items():
                _get(reference, name[4:]).copy_((1 - t) * value + t * ends[1][name])
        update_bn(data.train_dataloader(), reference)
        reference.eval()
        with torch.no_grad():
            nll = nn.functional.cross_entropy(reference(x), y).item()
        assert callback.grid_values["val"]["curve_nll"][index] == pytest.approx(nll, abs=1e-10)
    # baked at t = 1 (the last reference) with the statistics recomputed there; without batches, warned
    callback.remove(module, 1.0, batches=data.train_dataloader())
    for name, value in reference.named_buffers():
        torch.testing.assert_close(module.net.get_buffer(name), value, rtol=1e-6, atol=1e-7, msg=name)
    other = BatchNormClassifier()
    callback = CurveTraining(params="all", curve="polychain", num_bends=2)
    callback.setup(trainer(), other, "fit")
    with pytest.warns(UserWarning, match=r"CurveTraining.remove: without batches the BatchNorm layers keep the "
                      r"training's statistics \(a mixture over random t\), not those of theta\(0.5\)"):
        callback.remove(other, 0.5)


def test_batch_norm_along_the_curve_during_fit_uses_the_training_loader():
    module = BatchNormClassifier()
    callback = CurveTraining(params="all", num_bends=3, grid_points=3)
    seen: dict[str, list[Tensor]] = {"start": [], "end": []}

    class RunningMean(Callback):  # the shared training statistics before and after each validation
        def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            seen["start"].append(pl_module.net[1].running_mean.clone())

        def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            seen["end"].append(pl_module.net[1].running_mean.clone())

    trainer(2, callbacks=[callback, RunningMean()], limit_train_batches=2).fit(module, datamodule=MoonsData())
    values = callback.grid_values["val"]
    assert len(values["curve_nll"]) == 3 and all(math.isfinite(v) for v in values["curve_nll"] + values["line_nll"])
    assert len(seen["start"]) == 2 and not torch.equal(seen["start"][0], seen["start"][1])  # training moves them
    for before, after in zip(seen["start"], seen["end"]):
        assert torch.equal(before, after)  # re-estimated at every t of the grid, then restored


class WorkerMoonsData(MoonsData):
    def train_dataloader(self) -> DataLoader:  # 16 batches, loaded by a persistent worker
        return DataLoader(moons(), batch_size=16, num_workers=1, persistent_workers=True)


def test_batch_norm_along_the_curve_inside_an_epoch_leaves_the_fits_batches_alone():
    """The statistics come from a side pass: iterating the training loader itself reset the iterator its
    persistent worker shares with the fit, which then trained the epoch's second half on its first half."""
    seen: list[Tensor] = []

    class Batches(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
            seen.append(batch[1])

    callback = CurveTraining(params="all", num_bends=3, grid_points=2)
    trainer(1, callbacks=[callback, Batches()], val_check_interval=0.5).fit(BatchNormClassifier(), WorkerMoonsData())
    assert len(callback.grid_values["val"]["curve_nll"]) == 2  # the validation inside the epoch ran
    assert torch.equal(torch.cat(seen), moons().tensors[1])  # every example once, in order


def test_lora_matrices_are_the_curve_and_the_base_is_untouched(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    def lora_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), mlp(0))
        return MAP(model, optimizer=sgd())

    paths = []
    for seed in (1, 2):
        paths.append(str(tmp_path / f"lora{seed}.pt"))
        torch.save(lora_model(seed).state_dict(), paths[-1])
    module = lora_model(3)
    base = {n: p.detach().clone() for n, p in module.named_parameters() if "lora" not in n}
    callback = CurveTraining(params="lora", segments=2, start=paths[0], end=paths[1], num_bends=3)
    trainer(1, callbacks=[callback]).fit(module, loader(), loader())
    assert all("lora_" in n for n in callback.curves)
    assert len(callback.curves) == 4  # lora_A and lora_B of two layers
    assert all(torch.equal(p, base[n]) for n, p in module.named_parameters() if n in base)
    for name, curve in callback.curves.items():  # 2 segments of degree 2: anchors 0 and 4 fixed, 1-3 trained
        assert [n for n, _ in curve.named_parameters()] == ["point_1", "point_2", "point_3"]
        assert torch.equal(curve.point_0, state(paths[0])[name]) and torch.equal(curve.point_4, state(paths[1])[name])


def test_canonical_lora_anchors_keep_the_function_and_remove_the_gauge(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(1)
    model = MAP(inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), mlp(0)))
    start = str(tmp_path / "start.pt")
    torch.save(model.state_dict(), start)
    gauged = {k: v.clone() for k, v in model.state_dict().items()}
    gauge = torch.tensor([[2.0, 1.0], [0.5, 3.0]], dtype=torch.float64)
    for layer in ("0", "2"):  # the same adapter in another gauge: B S, S^-1 A
        a, b = f"backbone.{layer}.lora_A.default.weight", f"backbone.{layer}.lora_B.default.weight"
        gauged[a], gauged[b] = torch.linalg.solve(gauge, gauged[a]), gauged[b] @ gauge
    end = str(tmp_path / "end.pt")
    torch.save(gauged, end)
    x = moons().tensors[0]
    expected = model(x).detach()
    callback = CurveTraining(params="lora", start=start, end=end, canonical_lora=True)
    callback.setup(trainer(), model, "fit")
    for curve in callback.curves.values():  # both anchors land on one representative: the curve is a point
        torch.testing.assert_close(curve.point_2, curve.point_0, rtol=0, atol=1e-10)
    callback.remove(model, 0.5)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)  # the function is unchanged


def test_canonical_lora_needs_both_factors():
    from peft import LoraConfig, inject_adapter_in_model

    model = MAP(inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), mlp(0)))
    with pytest.raises(ValueError, match="both LoRA factors of a layer are needed"):
        CurveTraining(params="*lora_A*", canonical_lora=True).setup(trainer(), model, "fit")


def test_loss_along_curve_files_are_written_and_never_overwritten(endpoints, tmp_path):
    start, end = endpoints
    module = MAP(mlp(0))
    callback = CurveTraining(params="all", start=start, end=end, test_grid_points=5)
    for _ in range(2):
        tested = trainer(1, root=tmp_path, callbacks=[callback])
        tested.test(module, loader(), verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "loss_along_curve_test-1.json",
        "loss_along_curve_test-1.png",
        "loss_along_curve_test.json",
        "loss_along_curve_test.png",
    ]
    values = json.loads((tmp_path / "loss_along_curve_test.json").read_text())
    assert values["t"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(values) == {"t", "curve_nll", "curve_error", "line_nll", "line_error"}
    assert all(math.isfinite(v) for v in values["curve_nll"] + values["line_error"])
    x, y = moons().tensors  # the line (1 - t) a + t b: its NLL and error rate at each t; the curve starts on it
    a, b = state(start), state(end)
    errors = []
    for index, t in enumerate(values["t"]):
        logits = functional_call(mlp(0), {n[9:]: (1 - t) * a[n] + t * b[n] for n in a}, (x,))
        errors.append(float((logits.argmax(-1) != y).double().mean()))
        nll = float(nn.functional.cross_entropy(logits, y))
        for kind in ("curve", "line"):
            assert values[f"{kind}_nll"][index] == pytest.approx(nll, rel=1e-9)
            assert values[f"{kind}_error"][index] == pytest.approx(errors[-1], abs=1e-12)
    assert max(errors) > 0.05  # the barrier: the line's middle misclassifies
    logged = {name: float(value) for name, value in tested.callback_metrics.items()}
    for kind in ("nll", "error"):  # the summaries: worst along the curve, and the worse of its two ends
        assert logged[f"curve/test_max_{kind}"] == pytest.approx(max(values[f"curve_{kind}"]), rel=1e-6)
        ends = max(values[f"curve_{kind}"][0], values[f"curve_{kind}"][-1])
        assert logged[f"curve/test_endpoint_{kind}"] == pytest.approx(ends, rel=1e-6)


def test_a_distributed_samplers_repeats_are_left_out_of_the_curve_scores(endpoints, tmp_path):
    """Rank 1 of 2 over 255 moons: examples 1, 3, ..., 253 and a repeat of example 0 (DistributedSampler pads to equal
    shares), the last of the second batch of 64; the scores along the line are those of the 127 examples."""
    start, end = endpoints
    data = TensorDataset(*(t[:255] for t in moons().tensors))
    shard = DataLoader(data, batch_size=64, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    callback = CurveTraining(params="all", start=start, end=end, test_grid_points=3)
    trainer(1, root=tmp_path, callbacks=[callback]).test(MAP(mlp(0)), shard, verbose=False)
    values = json.loads((tmp_path / "loss_along_curve_test.json").read_text())
    x, y = (t[1::2] for t in data.tensors)
    a, b = state(start), state(end)
    for index, t in enumerate(values["t"]):
        logits = functional_call(mlp(0), {n[9:]: (1 - t) * a[n] + t * b[n] for n in a}, (x,))
        assert values["line_nll"][index] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-9)
        assert values["line_error"][index] == pytest.approx(float((logits.argmax(-1) != y).double().mean()), abs=1e-12)


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_curve_bitwise(endpoints, tmp_path):
    start, end = endpoints

    def run(epochs: int, root: Path, ckpt_path: str | None = None) -> CurveTraining:
        callback = CurveTraining(params="all", start=start, end=end, weight_decay=1e-3, seed=11)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1)
        module = MAP(mlp(0), optimizer=sgd(0.1, momentum=0.9))
        trainer(epochs, root, [callback, checkpoint], limit_val_batches=0).fit(
            module, loader(batch_size=32), ckpt_path=ckpt_path
        )
        return callback

    straight = run(4, tmp_path / "straight")
    run(2, tmp_path / "first")
    resumed = run(4, tmp_path / "second", ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    assert resumed.t == straight.t
    for name in NAMES:
        assert torch.equal(resumed.curves[name].point_1, straight.curves[name].point_1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"curve": "spline"}, "curve must be one of"),
        ({"num_bends": 1}, "num_bends must be an integer >= 2"),
        ({"curve": "polychain", "segments": 2}, "a polychain has no segments or anchors"),
        ({"segments": 3, "anchors": ["a.ckpt"]}, "anchors must list segments - 1 = 2 checkpoints"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
        ({"js_weight": float("nan")}, "js_weight must be a finite number >= 0"),
        ({"samples_per_step": 1}, "samples_per_step must be an integer >= 2"),
        ({"grid_points": 1}, "grid_points must be an integer >= 2"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurveTraining(**kwargs)


def test_optimiser_weight_decay_on_control_points_is_warned_about(endpoints):
    start, end = endpoints
    module = MAP(mlp(0), optimizer=lambda params: torch.optim.AdamW(params, weight_decay=0.01))
    callback = CurveTraining(params="all", start=start, end=end)
    with pytest.warns(UserWarning, match="the optimiser decays the control points"):
        trainer(1, callbacks=[callback], limit_train_batches=1, limit_val_batches=0).fit(module, loader())


def test_a_checkpoint_of_another_model_is_refused(endpoints):
    module = MAP(nn.Sequential(nn.Linear(2, 3)).double())
    with pytest.raises(ValueError, match="does not fit MAP"):
        CurveTraining(params="all", start=endpoints[0]).setup(trainer(), module, "fit")


def test_one_instance_trains_one_modules_curve(endpoints):
    """Testing the module it trained works; a second module (a loop over seeds reusing the callback) gets a curve of
    its own, with a warning: it trained as a plain network, its "curve" flat, without a word."""
    start, end = endpoints
    callback = CurveTraining(params="all", start=start, end=end)
    first, second = MAP(mlp(0)), MAP(mlp(0))
    trainer(1, callbacks=[callback], limit_train_batches=1, limit_val_batches=0).fit(first, loader())
    trainer(callbacks=[callback], limit_test_batches=1).test(first, loader())
    with pytest.warns(UserWarning, match="CurveTraining: this MAP is not the module whose curve this instance holds; "
                      "it gets a curve of its own"):
        trainer(1, callbacks=[callback], limit_train_batches=1, limit_val_batches=0).fit(second, loader())
    for module in (first, second):  # each keeps a curve
        assert any(parametrize.is_parametrized(m) for m in module.modules())
    registered = {id(module) for module in second.modules()}
    assert all(id(curve) in registered for curve in callback.curves.values())
    assert "predictive" not in vars(first)  # the curve ensemble is bound to the module being trained only


def test_polychain_midpoint_is_the_mean_of_its_neighbours(endpoints):
    start, end = endpoints
    module, callback = MAP(mlp(0)), CurveTraining(params="all", curve="polychain", num_bends=3, start=start, end=end)
    callback.setup(trainer(), module, "fit")
    assert polychain(0.25, 3)[0].tolist() == [0.5, 0.5, 0.0]
    callback.remove(module, 0.25)
    a, b = state(start), state(end)
    for name in NAMES:  # the bend starts halfway, so t = 1/4 is a quarter of the way along the line
        torch.testing.assert_close(_get(module, name), 0.75 * a[name] + 0.25 * b[name], rtol=0, atol=1e-15)


class OwnClassifier(LightningModule):
    """A user's module as the README describes one: ``predictive(x, num_samples)`` without a default, and a
    ``test_step`` that returns its own (single-point) Predictive."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = mlp(0)

    def forward(self, x):
        return self.backbone(x)

    def predictive(self, x, num_samples):
        return CategoricalPredictive(self(x).unsqueeze(0))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        return CategoricalPredictive(self(batch[0]).unsqueeze(0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_users_module_is_scored_by_the_curve_ensemble(endpoints):
    """CalibrationMetrics reused the Predictive the module's test_step returned (one point of the curve: MI 0)
    instead of the ensemble CurveTraining binds; and CurveTraining called predictive(x) with one argument."""
    start, end = endpoints
    module = OwnClassifier()
    callback = CurveTraining(params="all", start=start, end=end, ensemble_points=4, js_weight=0.1)
    calibration = CalibrationMetrics()
    fit = trainer(1, callbacks=[callback, calibration], limit_train_batches=2)
    fit.fit(module, loader())
    fit.test(module, loader(batch_size=256))
    x, _ = moons().tensors
    with torch.no_grad():
        expected = callback.predictive(module, x).mutual_information.mean()
    assert float(expected) > 1e-4
    assert calibration.last_metrics["test/cal/mi"] == pytest.approx(float(expected), rel=1e-6)


def test_a_module_without_predictive_whose_outputs_are_not_logits_is_told_what_to_define(endpoints):
    class Regression(OwnClassifier):
        def forward(self, x):
            return self.backbone(x)[:, :1]

        predictive = None  # type: ignore[assignment]

    module = Regression()
    callback = CurveTraining(params="all", start=endpoints[0], end=endpoints[1], ensemble_points=2)
    with pytest.raises(TypeError, match=r"logits \[B, C >= 2\]; got \(256, 1\): define predictive\(x, num_samples\)"):
        trainer(1, callbacks=[callback], limit_train_batches=0).test(module, loader(batch_size=256))


def test_a_batch_norm_curve_fitted_from_loaders_is_tested_from_a_loader(endpoints):
    """Lightning drops the training loader after fit, so testing a BatchNorm curve needed a datamodule
    ("BatchNorm statistics along the curve need training data; none found"); the fit's loader serves now, also
    for the ensemble asked for after the test (it used the training-time statistics at every t)."""
    class Tested(BatchNormClassifier):
        def test_step(self, batch, batch_idx):
            return None

    module = Tested()
    torch.manual_seed(3)
    for name in ("end0.pt", "end1.pt"):
        state = module.state_dict()
        torch.save({n: torch.randn_like(t) if t.is_floating_point() else t for n, t in state.items()}, name)
    callback = CurveTraining(params="all", start="end0.pt", end="end1.pt", ensemble_points=2)
    fit = trainer(1, callbacks=[callback, CalibrationMetrics()], limit_train_batches=2)
    fit.fit(module, loader())
    inside: list[Tensor] = []

    class Inside(Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            inside.append(pl_module.predictive(batch[0]).logits)  # the bound ensemble, BatchNorm refreshed per t

    fit.callbacks.append(Inside())
    fit.test(module, loader(batch_size=256))
    assert math.isfinite(fit.callback_metrics["test/cal/nll"].item())
    x, _ = moons().tensors
    before = {n: b.clone() for n, b in module.named_buffers()}
    outside = callback.predictive(module.eval(), x).logits  # after the stage: the same per-t statistics (1.6 off)
    torch.testing.assert_close(outside, inside[0], rtol=0, atol=1e-12)
    assert all(torch.equal(b, before[n]) for n, b in module.named_buffers())


def test_a_second_validation_or_test_loader_is_refused_before_any_batch(endpoints):
    """The stage's curve sums are one set: a second loader's batches were pooled into the first's; the refusal
    comes as the stage starts (it came at the second loader's first batch, after a whole training epoch)."""
    start, end = endpoints
    module, callback = MAP(mlp(0)), CurveTraining(params="all", start=start, end=end)
    for stage, name in (("validate", "val"), ("test", "test")):
        with pytest.raises(ValueError, match=rf"one {name} loader; got 2: .* own trainer\.{stage} call"):
            getattr(trainer(callbacks=[callback]), stage)(module, [loader(), loader()])
        assert name not in callback._grid_sums  # nothing scored


@pytest.mark.parametrize("kwargs", [{"weight_decay": 0.1}, {"js_weight": 0.1}])
def test_terms_on_whole_control_points_are_refused_under_fsdp2_before_training(endpoints, kwargs):
    """Under FSDP2 (``ModelParallelStrategy``) the weight decay mixed the unsharded end points with the sharded
    control point (torch's "mixed torch.Tensor and DTensor" at the first backward) and the Jensen-Shannon gradient
    reached no sharded parameter in its own step (one step late, lost at a resume): refused at setup, as under
    FSDP1."""
    start, end = endpoints
    module = MAP(mlp(0))
    callback = CurveTraining(params="all", start=start, end=end, **kwargs)
    sharded = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    # the callback's setup, without a fit: a fit would open a process group in this process, whose port the
    # two-process tests after this one could no longer take
    fsdp2 = trainer(callbacks=[callback], strategy=sharded, devices=1)
    with pytest.raises(ValueError, match=rf"{next(iter(kwargs))}=0.1.* under ModelParallelStrategy: .* use DDP"):
        callback.setup(fsdp2, module, "fit")
    assert not callback.curves and not torch.distributed.is_initialized()


def test_parameters_left_off_the_curve_come_from_the_end_points_or_are_refused(endpoints, tmp_path):
    """A curve over ``last_layer`` shares the body among its points: end points sharing it hand it to a fresh
    module (it kept its random initialisation, so t = 0 was not the first solution); end points differing in it
    are refused (the curve's ends could not be both solutions)."""
    start, end = (state(path) for path in endpoints)
    head = [n for n in start if n.startswith("backbone.4.")]
    shared_end = {**start, **{n: end[n] for n in head}}  # the first solution's body, the second's head
    torch.save(shared_end, tmp_path / "shared.pt")
    module = MAP(mlp(0))
    callback = CurveTraining(params="backbone.4.*", start=endpoints[0], end=str(tmp_path / "shared.pt"))
    callback.setup(trainer(), module, "fit")
    for t, expected in ((0.0, start), (1.0, shared_end)):
        callback._move(t)
        for name, value in weights_at(module, list(expected)).items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-12, msg=name)

    with pytest.raises(ValueError, match=r"differ in 4 of them \(e.g. \['backbone.0.weight', .*params='trainable'"):
        CurveTraining(params="backbone.4.*", start=endpoints[0], end=endpoints[1]).setup(trainer(), MAP(mlp(0)), "fit")
