"""``CurveTraining``: train a low-loss curve between trained solutions, for any LightningModule.

In ``setup`` the selected tensors of the module become points ``theta(t) = sum_k c_k(t) theta_k`` on a
Bezier, segmented Bezier or polychain curve (:mod:`lightning_bayes.inference.curves`, through
``torch.nn.utils.parametrize``), whose endpoints (and interior anchors) come from checkpoints and
whose interior control points start on the straight line. Each training batch draws
``t ~ U(0, 1)``, so the module's own loss is ``E_t loss(theta(t))`` in expectation (Garipov et al., 2018).
The callback adds to the control points' gradients

* weight decay on the curve point, ``d/d theta_k (wd/2 ||theta(t)||^2) = wd c_k(t) theta(t)`` (set the
  optimiser's own weight decay to 0: it would decay the control points instead),
* optionally the LoRA-Curve regulariser ``-lambda JS(p_{t_1}, ..., p_{t_J})`` at ``J`` further draws of
  ``t`` on the same batch (Dold et al., 2026): minimising it raises the curve ensemble's mutual information.
  The reference's objective is ``mean_j NLL(theta(t_j)) - lambda JS`` over one set of ``J`` draws; here the NLL
  part stays the module's own ``training_step`` at its one ``t`` (the same expectation over ``t``, and what lets
  the callback serve any module untouched), so a step runs ``J + 1`` forward passes. The ``J`` passes run in the
  module's training mode (dropout active; BatchNorm statistics, which every evaluated ``t`` re-estimates anyway,
  updated).

During validation, test and predict ``pl_module.predictive`` is the curve ensemble (``ensemble_points`` values of
``t`` at the midpoints of equal cells of [0, 1], pooled by :func:`lightning_bayes.predictive.concatenate`),
so ``CalibrationMetrics`` scores the ensemble, its mutual information included; the plain predictive is
restored afterwards. Validation and test also evaluate NLL and error on a grid of ``t`` along the curve and along
the straight line between the endpoints, log ``curve/{stage}_max_{nll,error}``, ``line/...`` and the
endpoints' values, and write ``loss_along_curve_{stage}.png`` and ``.json`` into the log folder (never
overwriting) after fitting and testing. Modules with BatchNorm get running statistics re-estimated by
:func:`~lightning_bayes.inference.batchnorm.refresh_batchnorm` on the training data at every
evaluated ``t``.

:meth:`CurveTraining.remove` bakes ``theta(t)`` into the plain tensors, leaving the module as it was
before the callback touched it. Modules without ``predictive`` are read as logits (``forward(x)``).
Under DDP every rank draws the same ``t`` (one seeded generator, resumed from the checkpoint), the added
gradients are averaged like the loss's and the grid sums are pooled; under FSDP (1 or 2) the curve trains
but ``weight_decay`` and ``js_weight`` are refused (they need whole control points); after ``ddp_spawn`` the
main process's module is not parametrised, so read the trained curve from the checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ..batches import BatchLayout
from ..checks import check_flags, check_seed, is_finite, is_int
from ..datamodules import side_pass
from ..datamodules.sampler_padding import real_examples, stage_loaders
from ..generator import PicklableGenerator
from ..inference.curve_parametrization import (
    CurveParametrization,
    CurvePosition,
    combine,
    register_curve,
    remove_curve,
)
from ..inference.curves import (
    linear_initialisation,
    polychain,
    segmented_bezier,
    straight_line,
)
from ..inference.batchnorm import batchnorm_buffers, refresh_batchnorm, running_statistics
from ..inference.jensen_shannon import jensen_shannon
from ..modes import predictive_as_written
from ..inference.lora_gauge import balanced_lora_tensors
from ..models.weights import trained_state_dict
from ..params import ParamSelector, select_parameters
from ..plots.curve import loss_along_curve
from ..predictive import CategoricalPredictive, Predictive, concatenate
from .run_files import run_folder, unique_path, write_json

CurveType = Literal["bezier", "polychain"]
_CURVES = ("bezier", "polychain")
_STAGES = ("val", "test")


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _plain_predictive(pl_module: LightningModule, as_written: bool = False) -> Callable[..., Predictive]:
    """The module's own ``predictive(x, num_samples)`` (called ``(x, None)``: the module's default samples), or
    its forward output read as classifier logits ``[B, C]``; ``as_written``: in the module's modes (the eval mode
    of a :class:`~lightning_bayes.modules.base.BayesianModule`'s predictive left out)."""
    own = predictive_as_written(pl_module) if as_written else getattr(type(pl_module), "predictive", None)
    if callable(own):
        return functools.partial(own, pl_module)

    def logits(x: Any, num_samples: int | None = None) -> Predictive:
        outputs = pl_module(x)
        if not isinstance(outputs, Tensor) or outputs.ndim != 2 or outputs.shape[-1] < 2:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise TypeError(
                f"CurveTraining reads {type(pl_module).__name__}'s forward output as classifier logits [B, C >= 2]; "
                f"got {shape}: define predictive(x, num_samples) returning a Predictive (e.g. a GaussianPredictive "
                "for regression)"
            )
        return CategoricalPredictive(outputs.unsqueeze(0))

    return logits


def _statistics_copy(module: nn.Module) -> dict[str, Tensor]:
    """The BatchNorm buffers, copied: the running statistics and the batch counts (a refresh moves both)."""
    return {name: value.clone() for name, value in batchnorm_buffers(module).items()}


class CurveTraining(Callback):
    """Turns ``params`` of the module into a curve between trained solutions and trains its control points.

    Args:
        params: the tensors on the curve (``"trainable"``, ``"lora"``, globs; see ``params.py``).
        curve: ``"bezier"`` (``segments`` Bezier pieces of degree ``num_bends - 1``) or ``"polychain"``
            (piecewise linear through ``num_bends`` points).
        num_bends: control points per segment, endpoints included (3: one bend, a quadratic Bezier).
        segments: Bezier segments joined at anchors (LoRA-Curve); 1 for Garipov's curves.
        start: checkpoint (a glob picks the newest file) holding the first endpoint's solution; ``None`` keeps the
            module's current tensors.
        end: the same for the second endpoint.
        anchors: ``segments - 1`` checkpoints for the interior junctions; ``None`` starts them on the line.
        fix_anchors: freeze the endpoints and the given anchors (the anchored configuration); ``False``
            trains every control point (the free configuration).
        canonical_lora: bring every anchor's LoRA pairs (``lora_A`` / ``lora_B`` of one layer, both selected)
            into the balanced SVD form of :mod:`lightning_bayes.inference.lora_gauge` before the curve is
            built, so that anchors differing only by the ``GL(r)`` gauge coincide.
        weight_decay: ``wd`` of the penalty ``wd/2 ||theta(t)||^2`` on the curve point.
        js_weight: ``lambda >= 0`` of the ``-lambda JS`` regulariser; 0 switches it off. Both gradients are added
            after each backward, scaled as Lightning scales the loss (``1 / accumulate_grad_batches``); under manual
            optimisation in full at every ``manual_backward``, so a module accumulating over several backward passes
            per step divides these weights by their number.
        samples_per_step: ``J >= 2`` draws of ``t`` for the JS term.
        ensemble_points: points of the curve ensemble used as the predictive at validation and test.
        grid_points: how many values of ``t`` are evaluated along the curve and line at validation.
        test_grid_points: how many at test.
        line: also evaluate the straight line between the endpoints.
        seed: seed of the draws of ``t``.
        plots: write the loss-along-curve PNG next to its JSON.
        target_key: for dict batches, the target's key (e.g. ``"label"``); without it a dict batch is refused
            along the curve (and, for the JS term and BatchNorm refreshes, the whole dict is the input).
        input_key: for dict batches, the input's key; without it every entry but the target, as a dict.
    """

    def __init__(
        self,
        params: ParamSelector = "trainable",
        curve: CurveType = "bezier",
        num_bends: int = 3,
        segments: int = 1,
        start: str | None = None,
        end: str | None = None,
        anchors: Sequence[str] | None = None,
        fix_anchors: bool = True,
        canonical_lora: bool = False,
        weight_decay: float = 0.0,
        js_weight: float = 0.0,
        samples_per_step: int = 2,
        ensemble_points: int = 11,
        grid_points: int = 11,
        test_grid_points: int = 61,
        line: bool = True,
        seed: int = 0,
        plots: bool = True,
        target_key: str | None = None,
        input_key: str | None = None,
    ) -> None:
        super().__init__()
        self.layout = BatchLayout(target_key, input_key)
        if curve not in _CURVES:
            raise ValueError(f"curve must be one of {_CURVES}; got {curve!r}")
        _positive_int("num_bends", num_bends, 2)
        _positive_int("segments", segments)
        if curve == "polychain" and (segments != 1 or anchors):
            raise ValueError(
                f"a polychain has no segments or anchors (its bends are its pieces); got segments={segments}, "
                f"anchors={anchors!r}"
            )
        if anchors is not None and (isinstance(anchors, str) or not isinstance(anchors, Sequence)):
            raise ValueError(f"anchors must be a list of checkpoint paths; got {anchors!r}")
        if anchors is not None and len(anchors) != segments - 1:
            raise ValueError(
                f"anchors must list segments - 1 = {segments - 1} checkpoints (the interior junctions); "
                f"got {len(anchors)}"
            )
        if not (is_finite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
        if not (is_finite(js_weight) and js_weight >= 0):
            raise ValueError(f"js_weight must be a finite number >= 0; got {js_weight!r}")
        check_flags(fix_anchors=fix_anchors, canonical_lora=canonical_lora, line=line, plots=plots)
        _positive_int("samples_per_step", samples_per_step, 2)
        _positive_int("ensemble_points", ensemble_points)
        _positive_int("grid_points", grid_points, 2)
        _positive_int("test_grid_points", test_grid_points, 2)
        self.params = params
        self.curve = curve
        self.num_bends = num_bends
        self.segments = segments
        self.start, self.end = start, end
        self.anchors = list(anchors) if anchors is not None else None
        self.fix_anchors = fix_anchors
        self.canonical_lora = canonical_lora
        self.weight_decay = float(weight_decay)
        self.js_weight = float(js_weight)
        self.samples_per_step = samples_per_step
        self.ensemble_points = ensemble_points
        self.grid_points = {"val": grid_points, "test": test_grid_points}
        self.line = line
        check_seed(seed)
        self.seed = seed
        self.plots = plots
        self.generator = PicklableGenerator().manual_seed(seed)  # ddp_spawn pickles callbacks
        self.t = 0.0
        self.curves: dict[str, CurveParametrization] = {}
        self.position: CurvePosition | None = None
        self.grid_values: dict[str, dict[str, list[float]]] = {}
        self._batch_x: Any = None
        self._bound: LightningModule | None = None
        self._fit_loader: Any = None  # the training loader of the last fit (runtime only)
        self._grid_sums: dict[str, Tensor] = {}
        self._batch_norm_at: dict[tuple[float, ...], dict[str, Tensor]] = {}
        self._batch_norm_saved: dict[str, Tensor] = {}

    # ---- the curve -------------------------------------------------------------------------------

    @property
    def num_points(self) -> int:
        """Control points ``K + 1`` of the whole curve."""
        return self.segments * (self.num_bends - 1) + 1 if self.curve == "bezier" else self.num_bends

    def coefficients(self, t: float | Tensor) -> Tensor:
        """``c(t)``, ``[T, K + 1]`` (float64), of this curve."""
        if self.curve == "polychain":
            return polychain(t, self.num_bends)
        return segmented_bezier(t, self.num_bends - 1, self.segments)

    def _frozen(self) -> list[bool]:
        """Which control points stay fixed: with ``fix_anchors`` the endpoints and the given anchors
        (every ``num_bends - 1``-th point of a segmented Bezier), else none."""
        frozen = [False] * self.num_points
        if self.fix_anchors:
            junctions = range(0, self.num_points, self.num_bends - 1) if self.anchors else (0, self.num_points - 1)
            for index in junctions:
                frozen[index] = True
        return frozen

    def _anchor_tensors(self, pl_module: LightningModule, names: list[str]) -> list[dict[str, Tensor]]:
        checkpoints = [self.start, *(self.anchors or []), self.end]
        states = [None if c is None else self._checkpoint_state(pl_module, c) for c in checkpoints]
        self._share_unselected(pl_module, names, states)
        current = {name: tensor.detach().clone() for name, tensor in pl_module.named_parameters() if name in names}
        points = [current if state is None else {name: state[name] for name in names} for state in states]
        if self.canonical_lora:
            points = [balanced_lora_tensors(tensors) for tensors in points]
        if self.anchors is not None:
            return points
        first, last = points[0], points[-1]
        junctions = self.segments if self.curve == "bezier" else 1
        return [{n: torch.lerp(first[n], last[n], m / junctions) for n in names} for m in range(junctions + 1)]

    @staticmethod
    def _checkpoint_state(pl_module: LightningModule, checkpoint: str) -> dict[str, Tensor]:
        state, path = trained_state_dict(pl_module, checkpoint)
        rank_zero_info(f"CurveTraining: anchor from {path}")
        return state

    def _share_unselected(
        self, pl_module: LightningModule, names: list[str], states: list[dict[str, Tensor] | None]
    ) -> None:
        """Every point of the curve shares the parameters ``params`` leaves out, so its end points (and anchors) must
        agree on them, or the curve's ends would not be the given solutions; when they do, the module takes their
        values (a freshly built module holds an initialisation, not the checkpoints' shared layers)."""
        if all(state is None for state in states):
            return
        chosen = set(names)
        others = {name: p.detach() for name, p in pl_module.named_parameters() if name not in chosen}
        sources = [others if state is None else state for state in states]
        differing, loaded = [], {}
        for name, tensor in others.items():
            values = [source[name] for source in sources if name in source]
            if any(not _equal(values[0], value) for value in values[1:]):
                differing.append(name)
            elif values and not _equal(tensor, values[0]):
                loaded[name] = values[0]
        if differing:
            ends = [c if c is not None else "the module's own" for c in (self.start, *(self.anchors or []), self.end)]
            raise ValueError(
                f"CurveTraining(params={self.params!r}) puts only the selected parameters on the curve; the others are "
                f"shared by all its points, but its end points ({', '.join(ends)}) differ in {len(differing)} of them "
                f"(e.g. {differing[:5]}), so the curve's ends would not be those solutions: select them too (e.g. "
                "params='trainable'), or train the end points from one network sharing them"
            )
        if loaded:
            with torch.no_grad():
                for name, value in loaded.items():
                    others[name].copy_(value)
            rank_zero_info(
                f"CurveTraining: {len(loaded)} parameters outside params={self.params!r} (e.g. {list(loaded)[:3]}) "
                "come from the end points' checkpoints, which share them"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.curves:
            registered = {id(module) for module in pl_module.modules()}
            if all(id(curve) in registered for curve in self.curves.values()):
                return
            rank_zero_warn(
                f"CurveTraining: this {type(pl_module).__name__} is not the module whose curve this instance holds; it "
                "gets a curve of its own, and the other module keeps its curve where it is (one instance trains one "
                "module's curve at a time: make one per module, e.g. inside a loop over seeds)"
            )
            if self._bound is not None:
                self._unbind(self._bound)
            self.curves, self.position, self.grid_values = {}, None, {}
            self._grid_sums, self._batch_norm_at, self._batch_norm_saved = {}, {}, {}
        sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        if sharded and (self.weight_decay or self.js_weight):
            raise ValueError(
                f"CurveTraining(weight_decay={self.weight_decay}, js_weight={self.js_weight}) under "
                f"{type(trainer.strategy).__name__}: a sharded curve trains, but these add gradients to whole control "
                "points, which FSDP shards; set both to 0 or use DDP"
            )
        names = list(select_parameters(pl_module, self.params))
        anchors = self._anchor_tensors(pl_module, names)
        degree = self.num_bends - 1
        points = {name: linear_initialisation([a[name] for a in anchors], degree) for name in names}
        self.position = CurvePosition(self.num_points)
        trainable = [not frozen for frozen in self._frozen()]
        self.curves = register_curve(pl_module, points, trainable, self.position)
        self._move(self.t)

    def _move(self, t: float) -> None:
        assert self.position is not None
        self.position.set(self.coefficients(t)[0])

    def remove(self, pl_module: LightningModule, t: float, batches: Iterable[Any] | None = None) -> None:
        """Bake ``theta(t)`` into the module's plain tensors and drop the curve (the module is plain again); BatchNorm
        statistics recomputed at ``theta(t)`` from ``batches`` (e.g. the training loader; without them, a module with
        BatchNorm keeps the training's, a mixture over random ``t``, with a warning)."""
        if not self.curves:
            raise ValueError("CurveTraining.remove: no curve is registered (setup has not run or remove ran before)")
        self._unbind(pl_module)
        self._move(t)
        remove_curve(pl_module, list(self.curves))
        self.curves, self.position = {}, None
        if batches is not None:
            refresh_batchnorm(pl_module, batches, pl_module.device, self.layout)
        elif running_statistics(pl_module):
            rank_zero_warn(
                f"CurveTraining.remove: without batches the BatchNorm layers keep the training's statistics (a mixture "
                f"over random t), not those of theta({t}); pass batches=<the training loader> to recompute them"
            )

    # ---- training --------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_loader = trainer.train_dataloader  # BatchNorm along the curve at a later test (Lightning drops it)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        points = {id(p) for curve in self.curves.values() for p in curve.parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if group.get("weight_decay", 0.0) and any(id(p) in points for p in group["params"]):
                    rank_zero_warn(
                        f"CurveTraining: the optimiser decays the control points (weight_decay="
                        f"{group['weight_decay']}); set it to 0 and pass weight_decay to CurveTraining, which "
                        f"decays the curve point theta(t) instead"
                    )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.t = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        self._move(self.t)
        if self.js_weight > 0:
            self._batch_x = self.layout.input(batch)

    def _gradient_scale(self, trainer: Trainer) -> float:
        """Lightning's loss scaling: ``1 / accumulate_grad_batches``, times a mixed-precision grad scaler's scale."""
        automatic = trainer.lightning_module.automatic_optimization
        scale = 1.0 / trainer.accumulate_grad_batches if automatic else 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scale * float(scaler.get_scale()) if scaler is not None else scale

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        scale = self._gradient_scale(trainer)
        if self.weight_decay > 0:
            self._add_weight_decay(scale)
        if self.js_weight > 0 and self._batch_x is not None:
            self._add_jensen_shannon(trainer, pl_module, scale)

    def _add_weight_decay(self, scale: float) -> None:
        assert self.position is not None
        coefficients = self.position.coefficients
        with torch.no_grad():
            for curve in self.curves.values():
                points = curve.points()
                point = combine(points, coefficients)
                for k, (control, trainable) in enumerate(zip(points, curve.trainable)):
                    if trainable and coefficients[k] != 0.0:
                        step = point * (self.weight_decay * coefficients[k] * scale)
                        control.grad = step if control.grad is None else control.grad.add_(step)

    def _add_jensen_shannon(self, trainer: Trainer, pl_module: LightningModule, scale: float) -> None:
        predictive_fn = _plain_predictive(pl_module, as_written=True)  # in training mode, as the step's own pass
        draws = torch.rand(self.samples_per_step, generator=self.generator, dtype=torch.float64)
        members = []
        with trainer.precision_plugin.train_step_context():
            for t in draws.tolist():
                self._move(t)
                predictive = predictive_fn(self._batch_x, None)
                if not isinstance(predictive, CategoricalPredictive):
                    raise TypeError(f"js_weight > 0 needs a CategoricalPredictive; got {type(predictive).__name__}")
                members.append(predictive.log_probs_per_sample)
        self._move(self.t)
        self._batch_x = None
        js = jensen_shannon(torch.cat(members)).mean()
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(-self.js_weight * scale * js, trainable, allow_unused=True)
        with torch.no_grad():
            for parameter, grad in zip(trainable, grads):
                if grad is None:
                    continue
                if trainer.world_size > 1:  # the main loss's gradients are already averaged over ranks
                    grad = trainer.strategy.reduce(grad, reduce_op="mean")
                parameter.grad = grad if parameter.grad is None else parameter.grad.add_(grad)
        pl_module.log("curve/train_js", js.detach(), on_step=True, on_epoch=True, sync_dist=True)

    # ---- the curve ensemble ----------------------------------------------------------------------

    def ensemble_times(self, num_points: int | None = None) -> Tensor:
        """``t_i = (i + 1/2) / N``: the midpoint rule for ``E_{t ~ U(0, 1)}``."""
        n = _positive_int("num_points", self.ensemble_points if num_points is None else num_points)
        return (torch.arange(n, dtype=torch.float64) + 0.5) / n

    def predictive(
        self,
        pl_module: LightningModule,
        x: Any,
        num_points: int | None = None,
        num_samples: int | None = None,
    ) -> Predictive:
        """The curve ensemble: the module's predictive at each ``t`` of :meth:`ensemble_times`, pooled. Called
        outside a validation or test (e.g. after the fit), a module with BatchNorm gets its statistics re-estimated
        at every ``t`` too, from the fit's training loader (and restored afterwards)."""
        if not self.curves:
            raise ValueError("CurveTraining.predictive: no curve is registered (run setup first)")
        predictive_fn = _plain_predictive(pl_module)
        outside = not self._batch_norm_saved and bool(_statistics_copy(pl_module))
        if outside:
            self._batch_norm_at, self._batch_norm_saved = {}, _statistics_copy(pl_module)
        try:
            members = []
            for row in self.coefficients(self.ensemble_times(num_points)):
                members.append(self._at(pl_module, row, lambda: predictive_fn(x, num_samples)))
        finally:
            if outside:
                pl_module.load_state_dict(self._batch_norm_saved, strict=False)
                self._batch_norm_saved, self._batch_norm_at = {}, {}
            self._move(self.t)
        return concatenate(members)

    def _at(self, pl_module: LightningModule, row: Tensor, compute: Callable[[], Any]) -> Any:
        """``compute()`` with the module at coefficients ``row`` (and its BatchNorm statistics there)."""
        assert self.position is not None
        self.position.set(row)
        key = self.position.coefficients
        if self._batch_norm_saved:
            if key not in self._batch_norm_at:
                refresh_batchnorm(pl_module, self._training_data(pl_module), pl_module.device, self.layout)
                self._batch_norm_at[key] = _statistics_copy(pl_module)
            pl_module.load_state_dict(self._batch_norm_at[key], strict=False)
        return compute()

    def _training_data(self, pl_module: LightningModule) -> Any:
        trainer = pl_module._trainer
        loader = (trainer.train_dataloader if trainer is not None else None) or self._fit_loader
        datamodule = getattr(trainer, "datamodule", None)
        if loader is None and datamodule is not None:
            loader = datamodule.train_dataloader()
        if loader is None:
            raise ValueError(
                "CurveTraining: BatchNorm statistics along the curve need training data; none found: fit first with "
                "this callback, or pass a datamodule with a train_dataloader to test/validate/predict"
            )
        return side_pass(loader)  # a validation inside an epoch must not reset the fit's own iterator

    def _bind(self, pl_module: LightningModule) -> None:
        if self._bound is None and self.curves:
            pl_module.predictive = functools.partial(  # type: ignore[assignment]  # torch types it Tensor | Module
                self._bound_predictive, pl_module
            )
            self._bound = pl_module

    def _bound_predictive(self, pl_module: LightningModule, x: Any, num_samples: int | None = None) -> Predictive:
        return self.predictive(pl_module, x, num_samples=num_samples)

    def _unbind(self, pl_module: LightningModule) -> None:
        if self._bound is pl_module:
            del pl_module.predictive
            self._bound = None

    # ---- evaluation along the curve and the line --------------------------------------------------

    def _rows(self, stage: str) -> tuple[Tensor, Tensor]:
        """The evaluated ``t`` and the coefficient rows: the curve's, then (with ``line``) the line's."""
        times = torch.linspace(0.0, 1.0, self.grid_points[stage], dtype=torch.float64)
        rows = [self.coefficients(times)]
        if self.line:
            rows.append(straight_line(times, self.num_points))
        return times, torch.cat(rows)

    def _stage_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loaders = len(stage_loaders(trainer, stage)) if stage in _STAGES and self.curves else 0
        if loaders > 1:  # one set of sums per stage: a second loader would be pooled into the first's
            raise ValueError(
                f"CurveTraining scores the curve on one {stage} loader; got {loaders}: score the others in their own "
                f"trainer.{'validate' if stage == 'val' else 'test'} call"
            )
        self._grid_sums.pop(stage, None)
        self._batch_norm_at = {}
        self._batch_norm_saved = _statistics_copy(pl_module)
        self._bind(pl_module)

    def _stage_end(self, pl_module: LightningModule) -> None:
        if self._batch_norm_saved:
            pl_module.load_state_dict(self._batch_norm_saved, strict=False)
        self._batch_norm_saved, self._batch_norm_at = {}, {}
        self._unbind(pl_module)
        if self.position is not None:
            self._move(self.t)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stage_start(trainer, pl_module, "val")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stage_end(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stage_start(trainer, pl_module, "test")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stage_end(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stage_start(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stage_end(pl_module)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and self.curves:
            self._accumulate(trainer, pl_module, batch, "val", batch_idx, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.curves:
            self._accumulate(trainer, pl_module, batch, "test", batch_idx, dataloader_idx)

    def _accumulate(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: str, batch_idx: int, dataloader_idx: int
    ) -> None:
        """Add this batch's summed NLL, error count and size at every grid row to the stage's sums ``[R, 3]``, without
        a ``DistributedSampler``'s repeats (the ranks' sums are added: each example counts once)."""
        x, y = self.layout.split(batch, "CurveTraining (scoring the curve)")
        keep = real_examples(batch_idx, len(y), stage_loaders(trainer, stage)[dataloader_idx])
        _, rows = self._rows(stage)
        predictive_fn = _plain_predictive(pl_module)
        context = (
            trainer.precision_plugin.val_step_context()
            if stage == "val"
            else trainer.precision_plugin.test_step_context()
        )
        sums = torch.zeros(len(rows), 3, dtype=torch.float64, device=pl_module.device)
        with torch.no_grad(), context:
            for index, row in enumerate(rows):  # every rank runs every forward (FSDP gathers in it), then cuts
                predictive = self._at(pl_module, row, lambda: predictive_fn(x, None))
                sums[index, 0] = -predictive.log_prob(y)[:keep].double().sum()
                if isinstance(predictive, CategoricalPredictive):
                    sums[index, 1] = (predictive.probs.argmax(-1) != y)[:keep].sum()
                sums[index, 2] = keep
        self._move(self.t)
        self._grid_sums[stage] = self._grid_sums[stage] + sums if stage in self._grid_sums else sums

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._summarise(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._summarise(trainer, pl_module, "test")
        self._write(trainer, "test")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, "val")

    def _summarise(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        sums = self._grid_sums.pop(stage, None)
        if sums is None:
            return
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        times, _ = self._rows(stage)
        n = len(times)
        nll, error = (sums[:, 0] / sums[:, 2]).cpu(), (sums[:, 1] / sums[:, 2]).cpu()
        values = {
            "t": times.tolist(),
            "curve_nll": nll[:n].tolist(),
            "curve_error": error[:n].tolist(),
        }
        if self.line:
            values.update(line_nll=nll[n:].tolist(), line_error=error[n:].tolist())
        self.grid_values[stage] = values
        summary = {
            f"curve/{stage}_max_nll": max(values["curve_nll"]),
            f"curve/{stage}_max_error": max(values["curve_error"]),
            f"curve/{stage}_endpoint_error": max(values["curve_error"][0], values["curve_error"][-1]),
            f"curve/{stage}_endpoint_nll": max(values["curve_nll"][0], values["curve_nll"][-1]),
        }
        if self.line:
            summary[f"line/{stage}_max_nll"] = max(values["line_nll"])
            summary[f"line/{stage}_max_error"] = max(values["line_error"])
        for name, value in summary.items():  # pooled over ranks already: the mean of equal values, unwarned
            pl_module.log(name, value, sync_dist=True)

    def _write(self, trainer: Trainer, stage: str) -> None:
        values = self.grid_values.get(stage)
        if values is None:
            return
        folder = run_folder(trainer)
        if folder is None or not trainer.is_global_zero:
            return
        png = unique_path(folder, f"loss_along_curve_{stage}", ".png", ".json")  # a pair under one free stem
        write_json(folder, png.stem, values)
        if self.plots:
            loss_along_curve(
                values["t"],
                values["curve_nll"],
                png,
                curve_error=values["curve_error"],
                line_nll=values.get("line_nll"),
                line_error=values.get("line_error"),
            )

    # ---- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "t": self.t}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.t = float(state_dict["t"])
        if self.position is not None:
            self._move(self.t)


def _equal(tensor: Tensor, other: Tensor) -> bool:
    """Whether ``other`` (a checkpoint's, wherever it was loaded) holds ``tensor``'s values."""
    return tensor.shape == other.shape and torch.equal(tensor, other.to(tensor.device, tensor.dtype))
