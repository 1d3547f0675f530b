"""The leaderboard's anchors: the libraries a user would pick instead, used the way their documentation shows.

Each anchor takes the instantiated config it copies (``lightning_bayes.cli.run(..., subcommand=False)``: the
same backbone, datamodule, split, optimiser, epochs and batch size as our run) and returns a function from a
test batch's inputs to a :class:`~lightning_bayes.predictive.Predictive`, so that every row is scored by the
same metrics. Anchors that train follow the config's learning-rate schedule and test what our run tests: the
epoch of best validation NLL when its ``ModelCheckpoint`` monitors one, else the last.

* ``laplace_torch`` (laplace-torch 0.3): ``Laplace(model, likelihood, subset_of_weights, hessian_structure)``
  on the MAP's trained network (regression: a homoscedastic MAP, its learned noise as ``sigma_noise``), ``fit``
  on the training loader, ``optimize_prior_precision(method="marglik")``,
  GLM predictive with the probit link (classification) or the closed-form GLM variance (regression); on a LoRA
  network (text) its trainable weights are the adapters, so this is Laplace-LoRA, fed the dict batches
  laplace-torch documents for Hugging Face models;
* ``vbll_package`` (vbll 0.4.9): our VBLL config's backbone with ``vbll.DiscClassification`` /
  ``vbll.Regression`` as head, trained with its ``train_loss_fn``;
* ``ivon_manual`` (ivon-opt 0.1.3): our IVON config's network and hyperparameters in the package's manual
  loop (``with optimizer.sampled_params(train=True): loss.backward()`` then ``optimizer.step()``), predictive
  from ``num_samples`` ``sampled_params()`` draws.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from lightning_bayes.inference.likelihoods import GaussianLikelihood
from lightning_bayes.models import load_trained_weights
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive, Predictive

Predict = Callable[[Tensor], Predictive]


def _init_args(cli: LightningCLI, *keys: str) -> dict[str, Any]:
    """``cli.config`` at ``model.init_args.<keys>.init_args`` as a plain dict."""
    node: Any = cli.config["model"]["init_args"]
    for key in keys:
        node = node[key]
    return dict(vars(node["init_args"]))


def _batches(loader: Any, device: torch.device) -> Iterator[tuple[Any, Tensor]]:
    for x, y in loader:
        yield move_data_to_device(x, device), y.to(device)


def _train_as_configured(
    cli: LightningCLI,
    model: nn.Module,
    stateful: list[Any],
    step: Callable[[Tensor, Tensor], None],
    validation_nll: Callable[[], float],
    optimizer: torch.optim.Optimizer,
) -> None:
    """``cli.trainer.max_epochs`` epochs of ``step`` over the training loader (``limit_train_batches`` of it), the
    config's learning-rate scheduler stepped after each epoch; then, when the config's ``ModelCheckpoint`` monitors,
    the state of ``stateful`` (modules, and an optimiser that holds a posterior) restored at the epoch of best
    validation NLL among those validated (every ``check_val_every_n_epoch``), as our run tests its best checkpoint;
    otherwise the last epoch's, as ours tests ``last.ckpt``."""
    device = next(model.parameters()).device
    trainer = cli.trainer
    scheduler = _lr_scheduler(cli, optimizer)
    selects_best = any(getattr(callback, "monitor", None) for callback in trainer.checkpoint_callbacks)
    every = trainer.check_val_every_n_epoch or 1
    best, best_state = math.inf, None
    for epoch in range(cast(int, trainer.max_epochs)):  # set by the copied configs (None would fail here as before)
        model.train()
        loader = cli.datamodule.train_dataloader()
        for x, y in itertools.islice(_batches(loader, device), _batch_limit(trainer.limit_train_batches, loader)):
            step(x, y)
        if scheduler is not None:
            scheduler.step()
        if not selects_best or (epoch + 1) % every:
            continue
        model.eval()
        nll = validation_nll()
        if nll < best:
            best, best_state = nll, [copy.deepcopy(item.state_dict()) for item in stateful]
    if best_state is not None:
        for item, state in zip(stateful, best_state, strict=True):
            item.load_state_dict(state)
    model.eval()


def _batch_limit(limit: float | None, loader: Any) -> int | None:
    """Lightning's ``limit_train_batches``: a count, or a fraction of the loader's batches (at least one)."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return None
    return int(limit) if isinstance(limit, int) else max(1, int(limit * len(loader)))


def _lr_scheduler(cli: LightningCLI, optimizer: torch.optim.Optimizer) -> Any:
    """The config's ``model.init_args.lr_scheduler`` over ``optimizer`` (None without one)."""
    spec = cli.config["model"]["init_args"].get("lr_scheduler")
    if not spec:
        return None
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)(optimizer, **dict(vars(spec["init_args"])))


def _mean_validation_nll(cli: LightningCLI, predict: Predict, device: torch.device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in _batches(cli.datamodule.val_dataloader(), device):
            predictive = predict(x)
            total += float(-predictive.log_prob(y).sum())
            count += len(y)
    return total / count


# ----- laplace-torch ---------------------------------------------------------------------------------------
class HFStyleNetwork(nn.Module):
    """A network on dict inputs, called the way laplace-torch calls Hugging Face models: with the whole batch
    dict, targets under ``labels`` (dropped before the network sees it)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, data: Mapping[str, Tensor]) -> Tensor:
        return self.network({key: value for key, value in data.items() if key != "labels"})


class HFStyleBatches:
    """A loader of ``(dict, y)`` batches as laplace-torch's dict batches (``{**x, "labels": y}``) on ``device``;
    ``dataset`` is the loader's (laplace-torch reads N from it)."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device, self.dataset = loader, device, loader.dataset

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for x, y in _batches(self.loader, self.device):
            yield {**x, "labels": y}

    def __len__(self) -> int:
        return len(self.loader)


def glm_probabilities(la: Any, x: Any) -> Tensor:
    """laplace-torch's GLM predictive with the probit link. Dict (text) batches go one example per call:
    its Jacobian takes one backward pass per row of the batch's ``[B, C]`` outputs, each through the whole
    batch, so a batch costs ``B`` times its per-example calls and holds ``B C`` activation gradients at once."""
    if not isinstance(x, Mapping):
        return la(x, pred_type="glm", link_approx="probit")
    rows = len(next(iter(x.values())))
    examples = ({key: value[n : n + 1] for key, value in x.items()} for n in range(rows))
    return torch.cat([la(example, pred_type="glm", link_approx="probit") for example in examples])


def laplace_torch(cli: LightningCLI, checkpoints: list[str], options: dict[str, str], device: torch.device) -> Predict:
    """laplace-torch on the MAP's network (post hoc): KFAC / diag GGN, marginal-likelihood prior, GLM predictive.
    Over a LoRA network only the trainable (adapter) weights are in the posterior: Laplace-LoRA (Yang et al.,
    ICLR 2024) with laplace-torch's Hugging Face batches."""
    from laplace import Laplace

    network = cli.model.backbone
    load_trained_weights(cli.model, checkpoints[0])
    network.to(device).eval()
    loader = cli.datamodule.train_dataloader()
    if isinstance(next(iter(loader))[0], Mapping):  # tokenised text: laplace-torch's dict batches
        network, loader = HFStyleNetwork(network), HFStyleBatches(loader, device)
    regression = isinstance(cli.model.likelihood, GaussianLikelihood)
    if regression and cli.model.likelihood.heteroscedastic:
        raise NotImplementedError(
            "laplace-torch 0.3 models regression noise as one scalar sigma; this MAP is heteroscedastic "
            "(GaussianLikelihood(heteroscedastic=True))"
        )
    noise: dict[str, Any] = {}  # extra keyword arguments of Laplace(...), passed on to its backend class
    if regression:  # the MAP's learned noise standard deviation, read through its likelihood
        _, variance = cli.model.likelihood.mean_and_variance(torch.zeros(1, 1, device=device))
        noise["sigma_noise"] = float(variance.sqrt())
    la = Laplace(
        network,
        "regression" if regression else "classification",
        subset_of_weights=options["subset"],
        hessian_structure=options["structure"],
        **noise,
    )
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")

    def predict(x: Tensor) -> Predictive:
        if regression:
            mean, variance = la(x, pred_type="glm")
            noise = la.sigma_noise.square()
            return GaussianPredictive(mean.unsqueeze(0), (variance.diagonal(dim1=-2, dim2=-1) + noise).unsqueeze(0))
        probs = glm_probabilities(la, x)
        return CategoricalPredictive(probs.double().clamp_min(1e-300).log().unsqueeze(0))

    return predict


# ----- vbll ------------------------------------------------------------------------------------------------
def vbll_package(cli: LightningCLI, checkpoints: list[str], options: dict[str, str], device: torch.device) -> Predict:
    """Our VBLL config's backbone with the ``vbll`` package's head, trained with its loss."""
    import vbll

    ours = cli.model
    backbone = ours.backbone.to(device)
    width = ours.head.in_features if hasattr(ours.head, "in_features") else backbone.num_features
    dataset_size = cli.datamodule.num_train
    settings = cli.config["model"]["init_args"]
    num_samples = int(settings.get("num_samples", 20))
    regression = type(ours).__name__ == "VBLLRegressor"
    if regression:
        head = vbll.Regression(
            width, int(settings["out_features"]), 1.0 / dataset_size, parameterization=settings["parameterization"],
            prior_scale=settings["prior_scale"], wishart_scale=settings["wishart_scale"],
        )  # fmt: skip
    else:
        head = vbll.DiscClassification(
            width, int(settings["num_classes"]), 1.0 / dataset_size, parameterization=settings["parameterization"],
            prior_scale=settings["prior_scale"], wishart_scale=settings["wishart_scale"], dof=settings["dof"],
        )  # fmt: skip
    model = nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    # the backbone with the config's weight decay, the head with none: the package's recipe, as our module groups it
    optimizer = _optimizer(cli, [{"params": backbone.parameters()}, {"params": head.parameters(), "weight_decay": 0.0}])
    clip = cli.trainer.gradient_clip_val

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        out = head(backbone(x))
        out.train_loss_fn(y).backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    def predict(x: Tensor) -> Predictive:
        features = backbone(x)
        if regression:
            normal = head(features).predictive
            return GaussianPredictive(normal.mean.unsqueeze(0), normal.variance.unsqueeze(0))
        logits = head.logit_predictive(features).rsample(torch.Size([num_samples]))
        return CategoricalPredictive(logits)

    _train_as_configured(cli, model, [model], step, lambda: _mean_validation_nll(cli, predict, device), optimizer)
    return predict


# ----- ivon-opt --------------------------------------------------------------------------------------------
def ivon_manual(cli: LightningCLI, checkpoints: list[str], options: dict[str, str], device: torch.device) -> Predict:
    """Our IVON config's network and hyperparameters in ivon-opt's documented manual training loop."""
    import ivon

    network = cli.model.backbone.to(device)
    likelihood = cli.model.likelihood
    settings = _init_args(cli, "optimizer")
    kl_weight = float(cli.config["model"]["init_args"].get("kl_weight", 1.0))
    ess = float(cli.config["model"]["init_args"].get("dataset_size") or cli.datamodule.num_train) / kl_weight
    train_samples = int(settings.pop("mc_samples", 1))
    settings.pop("seed", None)
    optimizer = ivon.IVON(network.parameters(), ess=ess, mc_samples=train_samples, **settings)
    num_samples = int(cli.config["model"]["init_args"].get("num_samples", 10))

    def step(x: Tensor, y: Tensor) -> None:
        for _ in range(train_samples):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad(set_to_none=True)
                likelihood.loss(network(x), y).backward()
        optimizer.step()

    def predict(x: Tensor) -> Predictive:
        draws = []
        for _ in range(num_samples):
            with optimizer.sampled_params():
                draws.append(network(x))
        return CategoricalPredictive(torch.stack(draws))

    validation_nll = lambda: _mean_validation_nll(cli, predict, device)
    _train_as_configured(cli, network, [network, optimizer], step, validation_nll, optimizer)
    return predict


def _optimizer(cli: LightningCLI, parameters: Any) -> torch.optim.Optimizer:
    spec = cli.config["model"]["init_args"]["optimizer"]
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)(parameters, **dict(vars(spec["init_args"])))


ANCHORS: dict[str, Callable[[LightningCLI, list[str], dict[str, str], torch.device], Predict]] = {
    "laplace_torch": laplace_torch,
    "vbll_package": vbll_package,
    "ivon_manual": ivon_manual,
}
PACKAGES = {"laplace_torch": "laplace-torch==0.3", "vbll_package": "vbll==0.4.9", "ivon_manual": "ivon-opt==0.1.3"}
