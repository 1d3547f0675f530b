"""IVON: improved variational online Newton as a ``torch.optim.Optimizer`` for automatic optimisation.

The posterior is ``q(theta) = N(m, diag sigma^2)`` with ``sigma^2 = 1 / (lambda (h + delta))``, ``lambda = ess``,
``delta = weight_decay`` (the prior ``N(0, I / (lambda delta))``) and ``h`` a running estimate of the diagonal
Hessian of the batch-mean loss. One step draws ``S = mc_samples`` parameters ``theta_s = m + eps_s``,
``eps_s = sigma * n_s``, calls the closure at each (forward and backward) and then updates

    g_hat = mean_s g_s,   h_hat = lambda (h + delta) mean_s g_s * eps_s   ("price"; "gradsq": lambda mean_s g_s^2),
    g_bar <- beta1 g_bar + (1 - beta1) g_hat,
    h     <- beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 (h - h_hat)^2 / (2 (h + delta)),
    m     <- m - lr' clip((g_bar / (1 - beta1^t) + delta m) / (h + delta), -rho, rho),

with ``lr' = lr (h_0 + delta)`` when ``rescale_lr`` (the first step is then SGD with weight decay ``delta``). The
sampling happens inside :meth:`IVON.step`, so Lightning's automatic optimisation (which passes its
training-step-and-backward closure to ``step``) trains a posterior; the mean is restored by copy in a ``finally``.

Reference: Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024 (arXiv 2402.17641).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ..checks import is_int, is_number
from ..params import laid_out_like

HESSIAN_ESTIMATORS = ("price", "gradsq")
_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd: consecutive steps get distinct generator seeds modulo 2^32 and 2^64


def standard_normal_like(tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``n ~ N(0, I)`` of ``tensor``'s global shape and dtype, laid out as ``tensor``: for a DTensor (FSDP2) every
    rank draws the whole ``n`` from the same generator state and keeps its own shard (no communication), so the
    sharded draw is the one-process draw; for a plain tensor, ``n`` itself."""
    noise = torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype)
    return laid_out_like(noise, tensor)


def hessian_update(hess: Tensor, estimate: Tensor, beta2: float, weight_decay: float) -> Tensor:
    """``beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 (h - h_hat)^2 / (2 (h + delta))``: the Riemannian-gradient
    correction (last term) keeps ``h + delta > 0`` for any ``h_hat`` (Shen et al. 2024, Alg. 1; Lin, Schmidt and Khan,
    ICML 2020)."""
    return (
        beta2 * hess + (1.0 - beta2) * estimate
        + (0.5 * (1.0 - beta2) ** 2) * (hess - estimate).square() / (hess + weight_decay)
    )


@contextmanager
def sampled_parameters(
    params: Sequence[Tensor], noise: Sequence[Tensor], means: Sequence[Tensor] | None = None
) -> Iterator[None]:
    """Write ``theta = m + eps`` into ``params`` for the body (``m``: ``means``, e.g. fp32 master copies, else the
    parameters' own values), then copy the values they had back, also when the body raises: bit-exact."""
    means = params if means is None else means
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, m, eps in zip(params, means, noise):
                p.copy_(m + eps)
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


@contextmanager
def posterior_draw(
    params: Sequence[Tensor], variances: Sequence[Tensor], means: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[None]:
    """One draw ``theta = m + sigma * n``, ``n ~ N(0, I)`` (from ``generator``, else torch's default one), written
    into ``params`` for the body and undone afterwards (see :func:`sampled_parameters`)."""
    noise = [standard_normal_like(v, generator) * v.sqrt() for v in variances]
    with sampled_parameters(params, noise, means):
        yield


@contextmanager
def posterior_draws(
    params: Sequence[Tensor], variances: Sequence[Tensor], generator: torch.Generator | None = None
) -> Iterator[Callable[[], None]]:
    """For many draws (a predictive): each call of the yielded function writes a new ``theta = m + sigma * n`` into
    ``params`` (``m``: their values on entry), with one ``randn`` for all of them (``n`` is one standard normal
    vector split in ``params`` order, from ``generator`` or torch's default one; a DTensor keeps its shard of the
    whole draw) and ``sigma`` computed once; ``m`` is copied back on exit, also when the body raises: bit-exact."""
    with torch.no_grad():
        means = [p.detach().clone() for p in params]
        scales = [v.sqrt() for v in variances]
    sizes = [s.numel() for s in scales]

    def draw() -> None:
        with torch.no_grad():
            flat = torch.randn(sum(sizes), generator=generator, device=scales[0].device, dtype=scales[0].dtype)
            for p, m, s, n in zip(params, means, scales, flat.split(sizes), strict=True):
                p.copy_(torch.addcmul(m, s, laid_out_like(n.to(s.device, s.dtype).view(s.shape), s)))

    try:
        yield draw
    finally:
        with torch.no_grad():
            for p, m in zip(params, means):
                p.copy_(m)


def _check(name: str, value: Any, valid: bool, expected: str) -> None:
    if not valid:
        raise ValueError(f"IVON: {name} must be {expected}; got {value!r}")


class IVON(Optimizer):
    """Improved variational online Newton (Shen et al., 2024) with sampling inside ``step(closure)``.

    Args:
        params: parameters or parameter groups; every group hyperparameter below may be set per group.
        ess: effective sample size ``lambda``, normally the training-set size ``N`` (other values temper). It comes
            before the keyword-only ``lr`` so that a factory ``(params, ess) -> IVON`` can be configured without it
            (:class:`~lightning_bayes.modules.ivon.IVONModule` fills in ``N``); ``ivon-opt``'s positional
            ``IVON(params, lr, ess)`` raises a ``TypeError`` here instead of swapping the two.
        lr: learning rate (``>= 0``).
        hess_init: ``h_0 > 0``, the initial Hessian estimate (so the initial ``sigma^2 = 1 / (lambda (h_0 + delta))``).
        beta1: decay of the gradient momentum, in ``[0, 1)``.
        beta2: decay of the Hessian estimate, in ``[0, 1]``.
        weight_decay: ``delta >= 0``, the prior precision per example.
        mc_samples: ``S``, closure calls (forward and backward) per step.
        hess_approx: ``"price"`` (reparameterisation / Stein estimator) or ``"gradsq"`` (squared gradients).
        clip_radius: ``rho > 0``, elementwise clip of the preconditioned step.
        debias: divide the momentum by ``1 - beta1^t``.
        rescale_lr: scale ``lr`` by ``h_0 + delta``.
        seed: seed of the training noise (``None``: drawn from torch's default generator). The noise of step ``t``
            depends only on ``(seed, t)``, both stored in :meth:`state_dict`, so a resumed run draws what an
            uninterrupted one would; under ``torch.distributed`` rank 0's seed is used on every rank, so that DDP
            averages gradients taken at one and the same ``theta``.

    The state of each parameter lives in ``self.state[p]`` in the parameter's precision or float32, whichever is
    wider: ``hess`` (``h``), ``momentum`` (``g_bar``) and, for half-precision parameters, ``mean`` (an fp32 master
    copy of ``m`` so that updates below the half-precision resolution are kept). Lightning moves and checkpoints
    it like Adam's. Under FSDP2 (DTensor parameters, Lightning's ``ModelParallelStrategy``) the state is sharded like
    the parameters and each rank keeps its shard of the one-process noise, so a sharded run follows the one-process
    run. FSDP2 keeps the root unit's gathered parameters after a forward without gradients (validation), where a
    draw written into the shards would not reach the next forward: a module that runs such forwards between steps
    reshards the units of :func:`lightning_bayes.params.fsdp2_units` first (``IVONModule``'s predictive does).
    FSDP1's flat parameters (``FSDPStrategy``) on several processes are refused at the first step: every rank would
    draw the same noise for its own shard, correlated across shards.

    Each closure call starts from cleared gradients (every sample's gradient is its own), and gradients left from
    a backward outside ``step`` (gradient accumulation, where Lightning runs the first micro-batches at the mean)
    are refused. There is no ``sync`` (``ivon-opt``'s all-reduce of ``g`` and ``h`` estimates): under DDP every
    rank draws the same noise and DDP averages the gradients, so the estimates agree already.
    """

    def __init__(
        self,
        params: Iterable[Any],
        ess: float,
        *,
        lr: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = math.inf,
        debias: bool = True,
        rescale_lr: bool = True,
        seed: int | None = None,
    ) -> None:
        _check("mc_samples", mc_samples, is_int(mc_samples) and mc_samples >= 1, "an int >= 1")
        _check("hess_approx", hess_approx, hess_approx in HESSIAN_ESTIMATORS, f"one of {HESSIAN_ESTIMATORS}")
        valid_seed = seed is None or (is_int(seed) and 0 <= seed < 2**63)
        _check("seed", seed, valid_seed, "None or an int in [0, 2^63)")
        defaults = {"lr": lr, "ess": ess, "hess_init": hess_init, "beta1": beta1, "beta2": beta2,
                    "weight_decay": weight_decay, "clip_radius": clip_radius}
        super().__init__(params, defaults)
        self.mc_samples, self.hess_approx, self.debias, self.rescale_lr = mc_samples, hess_approx, debias, rescale_lr
        self.seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        self.steps = 0  # completed updates t
        self._seed_agreed = False
        self._generators: dict[torch.device, torch.Generator] = {}
        self._grads_left: dict[int, weakref.ref[Tensor]] = {}  # each parameter's gradient as the last step left it

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name, valid, expected in (
            ("lr", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            ("ess", lambda v: 0 < v < math.inf, "a finite number > 0 (the training-set size, normally)"),
            ("hess_init", lambda v: 0 < v < math.inf, "a finite number > 0"),
            ("beta1", lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("beta2", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            ("weight_decay", lambda v: 0 <= v < math.inf, "a finite number >= 0 (the prior precision per example)"),
            ("clip_radius", lambda v: v > 0, "a number > 0 (math.inf: no clipping)"),
        ):
            value = group[name]
            _check(name, value, is_number(value) and valid(value), expected)
        for p in group["params"]:  # h and g_bar from the start: sharded checkpoint loading expects state to exist
            self._start_state(p, group)

    # ----------------------------------------------------------------------------------------------- the posterior
    def _start_state(self, p: Tensor, group: dict[str, Any]) -> None:
        """``h = h_0`` and ``g_bar = 0`` of ``p`` in its precision or float32, whichever is wider."""
        dtype = torch.promote_types(p.dtype, torch.float32)
        state = self.state[p]
        state["hess"] = torch.full_like(p, group["hess_init"], dtype=dtype, memory_format=torch.contiguous_format)
        state["momentum"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)

    def _parameter_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """``self.state[p]``: ``h`` and ``g_bar`` are created with ``p``'s group (like ``p``: on its device, sharded
        if it is), the fp32 master ``m`` of a half-precision ``p`` at first use (from ``p``'s value then)."""
        state = self.state[p]
        if "hess" not in state:
            self._start_state(p, group)
        if state["hess"].dtype != p.dtype and "mean" not in state:
            state["mean"] = p.detach().to(state["hess"].dtype)
        return state

    def _mean(self, p: Tensor) -> Tensor:
        """``m`` of ``p``: its fp32 master copy if it has one, else ``p`` itself."""
        return self.state[p].get("mean", p)

    def _posterior_variance(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """``sigma^2 = 1 / (lambda (h + delta))`` of ``p`` (``h = h_0`` before the first step)."""
        return 1.0 / (group["ess"] * (self._parameter_state(p, group)["hess"] + group["weight_decay"]))

    def posterior_variances(self) -> dict[Tensor, Tensor]:
        """``sigma^2`` of every parameter (:meth:`_posterior_variance`)."""
        return {p: self._posterior_variance(p, group) for group in self.param_groups for p in group["params"]}

    def below_resolution(self) -> float:
        """The share of the half-precision parameters' entries whose posterior std is below half the spacing of their
        dtype at the mean (``|m| eps / 2``): a draw ``m + sigma n`` rounds back to ``m`` there, so the Hessian estimate
        ``g n / sigma`` sees no noise and sinks toward 0 (0.006 for a true 4 in bf16 at sigma = 5e-4, m = 1). 0 when no
        parameter is half precision."""
        below, total = 0, 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.bfloat16, torch.float16):
                    continue
                std = self._posterior_variance(p, group).sqrt()
                below += int((std < self._mean(p).abs() * torch.finfo(p.dtype).eps / 2).sum())
                total += p.numel()
        return below / total if total else 0.0

    @contextmanager
    def sampled_params(self, generator: torch.Generator | None = None) -> Iterator[None]:
        """Parameters set to one posterior draw ``m + sigma * n`` for the body (e.g. one predictive sample), the
        mean restored by copy afterwards; ``n`` from ``generator`` or torch's default generator."""
        variances = self.posterior_variances()
        params = list(variances)
        with posterior_draw(params, [variances[p] for p in params], [self._mean(p) for p in params], generator):
            yield

    # ------------------------------------------------------------------------------------------------------ noise
    def _agree_on_seed(self) -> None:
        """Broadcast rank 0's seed once per process, so every rank draws the same noise (DDP); refuse FSDP1's flat
        shards there, on which that one noise would repeat across shards."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.fsdp._common_utils import _is_fsdp_flattened

            if any(_is_fsdp_flattened(p) for p in self._all_params()):
                raise ValueError(
                    f"IVON does not support FSDP1's flat parameters (FSDPStrategy) on {dist.get_world_size()} "
                    "processes: every rank would draw the same noise for its own shard, correlated across shards; use "
                    "Lightning's ModelParallelStrategy (FSDP2, whose sharded noise follows the one-process run) or DDP"
                )
            device = self.param_groups[0]["params"][0].device
            seed = torch.tensor(self.seed, dtype=torch.int64, device=device)
            dist.broadcast(seed, src=0)
            self.seed = int(seed)
        self._seed_agreed = True

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator of ``device``, seeded from ``(seed, t)`` at the first draw of step ``t``."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _reseed(self) -> None:
        step_seed = (self.seed + self.steps * _SEED_STRIDE) % 2**64
        for p in self._all_params():
            self._generator(p.device)
        for generator in self._generators.values():
            generator.manual_seed(step_seed)

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # ------------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Draw ``mc_samples`` parameters, call ``closure`` (zero_grad, forward, backward) at each, update ``h``,
        ``g_bar`` and ``m``. Returns the mean of the closure's losses; a closure returning ``None`` (Lightning's
        skipped step) leaves the posterior unchanged and returns ``None``."""
        if closure is None:
            raise ValueError(
                "IVON.step needs a closure that computes the loss and its gradients (it samples the weights before "
                "each call); with Lightning use automatic optimisation in precision '32-true', 'bf16-mixed', "
                "'bf16-true' or '16-true' ('16-mixed' calls the closure outside step), or call step(closure) yourself"
            )
        if not self._seed_agreed:
            self._agree_on_seed()
        entries = [(p, group, self._parameter_state(p, group)) for group in self.param_groups for p in group["params"]]
        params = [p for p, _, _ in entries]
        self._refuse_gradients_from_outside(params)
        means = [self._mean(p) for p in params]
        grad_sums = [torch.zeros_like(state["hess"]) for _, _, state in entries]
        curvature_sums = [torch.zeros_like(state["hess"]) for _, _, state in entries]
        self._reseed()
        losses = []
        for _ in range(self.mc_samples):
            noise = [
                standard_normal_like(state["hess"], self._generators[p.device])
                / (group["ess"] * (state["hess"] + group["weight_decay"])).sqrt()
                for p, group, state in entries
            ]
            with sampled_parameters(params, noise, means):
                for p in params:  # each sample's gradient its own, whether or not the closure zeroes them
                    p.grad = None
                with torch.enable_grad():
                    loss = closure()
                if loss is None:
                    return None
                for p, eps, grad_sum, curvature_sum in zip(params, noise, grad_sums, curvature_sums):
                    if p.grad is None:
                        continue  # a parameter the loss does not reach: zero gradient
                    grad = p.grad.to(grad_sum.dtype)
                    grad_sum.add_(grad)
                    curvature_sum.add_(grad * eps if self.hess_approx == "price" else grad.square())
            losses.append(loss.detach() if isinstance(loss, Tensor) else loss)
        self.steps += 1
        self._grads_left = {id(p): weakref.ref(p.grad) for p in params if p.grad is not None}
        for (p, group, state), grad_sum, curvature_sum in zip(entries, grad_sums, curvature_sums):
            self._update(p, group, state, grad_sum / self.mc_samples, curvature_sum / self.mc_samples)
        return sum(losses) / len(losses)

    def _refuse_gradients_from_outside(self, params: list[Tensor]) -> None:
        """Non-zero gradients that ``step`` did not leave (one sync, only when such tensors exist): a backward run
        outside the closure, as under gradient accumulation, where Lightning runs the first micro-batches'
        backward at the mean weights, not at IVON's draws."""
        foreign = [
            p.grad for p in params
            if p.grad is not None and (id(p) not in self._grads_left or self._grads_left[id(p)]() is not p.grad)
        ]
        if foreign and bool(torch.stack([g.detach().abs().sum().float().cpu() for g in foreign]).sum() > 0):
            raise RuntimeError(
                f"IVON.step found gradients computed outside its closure on {len(foreign)} parameters (gradient "
                "accumulation, or a backward before step): IVON draws the weights inside step and computes every "
                "gradient there, so it cannot accumulate across steps; use accumulate_grad_batches=1 with a larger "
                "batch or mc_samples, and zero the gradients (or let the closure do it) before step"
            )

    def _update(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], grad: Tensor, curvature: Tensor
    ) -> None:
        """Momentum, Hessian (updated first) and mean of one parameter; ``curvature``: mean ``g eps`` or ``g^2``."""
        beta1, ess, decay = group["beta1"], group["ess"], group["weight_decay"]
        hess, momentum = state["hess"], state["momentum"]
        momentum.copy_(beta1 * momentum + (1.0 - beta1) * grad)
        estimate = (curvature * (hess + decay) if self.hess_approx == "price" else curvature) * ess
        hess.copy_(hessian_update(hess, estimate, group["beta2"], decay))
        lr = group["lr"] * (group["hess_init"] + decay) if self.rescale_lr else group["lr"]
        debias = 1.0 - beta1 ** float(self.steps) if self.debias else 1.0
        mean = self._mean(p)
        radius = group["clip_radius"]
        direction = ((momentum / debias + decay * mean) / (hess + decay)).clamp(-radius, radius)
        new_mean = mean - lr * direction
        if "mean" in state:
            state["mean"].copy_(new_mean)
        p.copy_(new_mean)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimiser state plus the noise's ``seed`` and step count ``t`` in every parameter group (where
        sharded checkpointing, which keeps only ``state`` and ``param_groups``, preserves them)."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group.update(noise_seed=self.seed, noise_steps=self.steps)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` into the state a fresh run at the parameters' precision would hold: ``h``,
        ``g_bar`` and a master ``m`` in float32 or the parameter's dtype, whichever is wider (torch casts floating state
        to the parameter's dtype, which would round the fp32 master copy of a bf16 parameter). A master saved for a
        narrower parameter than this one (a bf16 run resumed in float32) becomes the parameter's value."""
        groups = state_dict.get("param_groups") or [{}]
        if "noise" in state_dict:  # checkpoints written before the noise moved into the groups
            seed, steps = state_dict["noise"]["seed"], state_dict["noise"]["steps"]
        elif "noise_seed" in groups[0]:
            seed, steps = groups[0]["noise_seed"], groups[0]["noise_steps"]
        else:
            raise ValueError("IVON.load_state_dict: expected a state dict saved by IVON (with the noise seed and step "
                             f"in its parameter groups); got keys {sorted(state_dict)}, group keys {sorted(groups[0])}")
        state_dict = {k: v for k, v in state_dict.items() if k != "noise"}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("noise_seed", None)
            group.pop("noise_steps", None)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for index, p in zip(saved_ids, self._all_params()):
            if index in state_dict["state"]:
                wide = torch.promote_types(p.dtype, torch.float32)
                state = {k: v.to(p.device, wide if v.is_floating_point() else v.dtype)
                         for k, v in state_dict["state"][index].items()}  # fmt: skip
                if wide == p.dtype and "mean" in state:  # p holds the mean itself now
                    with torch.no_grad():
                        p.copy_(state.pop("mean"))
                self.state[p] = state
        self.seed, self.steps = int(seed), int(steps)
