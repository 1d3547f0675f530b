"""Matrix-free Jacobian algebra of a network as a function of a flat parameter vector.

The selected parameters are one vector ``theta in R^P`` (:class:`FlatParameters`); the rest of the
module (unselected parameters, buffers) is held fixed. :class:`ParameterFunction` evaluates the
per-example *constraint values* ``g(theta, x_n, y_n) in R^m`` (the logits, the per-example loss, or
any per-example map of the outputs), stacked over a micro-batch into ``M_b = B m`` rows, and gives

* ``J_b v`` (``jvp``, forward mode) and ``J_b^T w`` (``vjp``, one reverse pass reused for every ``w``),
  vmapped over a stack of vectors in chunks;
* ``GGN v`` and ``H v`` of the summed loss (``ggn_vp``, ``hvp``), for curvature-based methods;
* ``J_b`` itself (``[M_b, P]``), built from per-example reverse-mode Jacobians (``vmap(jacrev)``), so
  one micro-batch costs ``M_b`` single-example backward passes whatever the number of samples;
* the Gram matrix ``G_b = J_b J_b^T`` in float64 and its pseudo-inverse factor
  (:class:`GramFactor`, eigh with a relative cutoff), from which
  :mod:`~lightning_bayes.inference.kernel_projection` projects onto ``ker J_b``: ``v - J_b^T G_b^+ J_b v``.

Everything is ``torch.func`` (``functional_call``, ``jvp``, ``vjp``, ``jacrev``, ``vmap``); nothing
``P x P`` is ever formed. The network runs in eval mode (BatchNorm running statistics, no dropout).
Reference: Miani, Roy & Hauberg, "Bayes without Underfitting", AISTATS 2025, section 3 and appendix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from ..checks import check_flags, is_int
from ..compilation import compiled, compiled_by
from ..params import ParamSelector, select_parameters
from .likelihoods import Likelihood

ConstraintFn = Callable[[Tensor, Tensor], Tensor]


class FlatParameters:
    """The parameters of ``module`` selected by ``params`` as one flat vector (registration order)."""

    def __init__(self, module: nn.Module, params: ParamSelector = "all") -> None:
        selected = select_parameters(module, params)
        self.names = list(selected)
        self.shapes = [p.shape for p in selected.values()]
        self.numels = [p.numel() for p in selected.values()]
        self.size = sum(self.numels)

    def flatten(self, module: nn.Module) -> Tensor:
        """The current values of the selected parameters of ``module``, concatenated, detached."""
        named = dict(module.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of ``theta`` (length P) shaped as the selected parameters, keyed by name."""
        if theta.shape != (self.size,):
            raise ValueError(f"theta must have shape ({self.size},); got {tuple(theta.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes)}


def output_constraint(outputs: Tensor, y: Tensor) -> Tensor:
    """Output kernel: every output of the example (e.g. all logits) must stay fixed."""
    return outputs.reshape(-1)


class LossConstraint:
    """Loss kernel: the per-example loss ``l(f(theta, x_n), y_n)`` must stay fixed (one row per example)."""

    def __init__(self, likelihood: Likelihood) -> None:
        self.likelihood = likelihood

    def __call__(self, outputs: Tensor, y: Tensor) -> Tensor:
        return self.likelihood.loss(outputs.unsqueeze(0), y.unsqueeze(0)).reshape(1)


def _unsqueeze(x: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)


class ParameterFunction:
    """``theta -> f(theta, x)`` and ``theta -> g(theta, x, y)`` for a module with a selected parameter subset.

    Args:
        model: the network; evaluated in eval mode with the unselected parameters and buffers fixed at
            their current values.
        params: which parameters form ``theta`` (see :func:`lightning_bayes.params.select_parameters`).
        constraint: per-example map ``(outputs, y) -> [m]`` (:func:`output_constraint`,
            :class:`LossConstraint` or any callable).
        chunk_size: vectors per vmapped chunk in ``jvp``/``vjp``/per-example Jacobians (``None``: all).
        vectorize: per-example Jacobians with ``vmap``, tried on two examples at the first Jacobian (a model
            whose forward has data-dependent control flow that ``vmap`` rejects falls back to a loop over
            examples, with a warning); ``False`` loops from the start.
        compile_jacobian: build the vectorised per-example Jacobians under ``torch.compile``
            (:func:`compiled_per_example_jacobian`); their backward (a projection's parameter gradient) is then
            compiled too.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSelector = "all",
        constraint: ConstraintFn = output_constraint,
        chunk_size: int | None = None,
        vectorize: bool = True,
        compile_jacobian: bool = False,
    ) -> None:
        check_flags(compile_jacobian=compile_jacobian)
        if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
        quantised = [name for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
        if quantised:
            raise ValueError(
                f"model has {len(quantised)} bitsandbytes 4-bit weights (e.g. {quantised[0]}); the torch.func "
                "transforms of Jacobian products do not run through 4-bit layers (libtorch crashed on them), so "
                "this method needs a base in float32 or bfloat16 (load_in_4bit=False)"
            )
        self.model = model
        self.flat = FlatParameters(model, params)
        self.constraint = constraint
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self.compile_jacobian = compile_jacobian
        self._vmap_checked = not vectorize
        self._one_row = False  # one constraint per example (the loss kernel): ``grad`` instead of ``jacrev``

    @property
    def size(self) -> int:
        return self.flat.size

    def theta(self) -> Tensor:
        """The model's current selected parameters as a flat vector."""
        return self.flat.flatten(self.model)

    def _fixed(self) -> dict[str, Tensor]:
        """Detached unselected parameters that would otherwise carry gradients, and the buffers; frozen parameters
        stay the module's own (a 4-bit weight's detached copy would lose its quantisation state)."""
        selected = set(self.flat.names)
        fixed = {n: p.detach() for n, p in self.model.named_parameters() if n not in selected and p.requires_grad}
        fixed.update(dict(self.model.named_buffers()))
        return fixed

    def outputs(self, theta: Tensor, x: Any) -> Tensor:
        """``f(theta, x)``: the model's outputs with the selected parameters replaced by ``theta``."""
        if self.model.training:
            self.model.eval()
        return functional_call(self.model, {**self._fixed(), **self.flat.unflatten(theta)}, (x,))

    def constraints(self, theta: Tensor, x: Any, y: Tensor) -> Tensor:
        """``g(theta, x, y)`` stacked over the batch, flattened to ``[M_b]``."""
        outputs = self.outputs(theta, x)
        return vmap(self.constraint)(outputs, y).reshape(-1)

    def _example_constraint(self, theta: Tensor, x_n: Any, y_n: Tensor) -> Tensor:
        return self.constraint(self.outputs(theta, _unsqueeze(x_n))[0], y_n)

    def _example_scalar(self, theta: Tensor, x_n: Any, y_n: Tensor) -> Tensor:
        return self._example_constraint(theta, x_n, y_n)[0]

    def jacobian(self, x: Any, y: Tensor, theta: Tensor | None = None) -> Tensor:
        """``J_b = d g(theta, x, y) / d theta`` as a dense ``[M_b, P]`` matrix, row block per example."""
        theta = self.theta() if theta is None else theta
        if not self._vmap_checked:
            self._check_vmap(theta, x, y)
        if self.vectorize and self.compile_jacobian:
            rows = compiled_per_example_jacobian(self, theta, x, y)
        elif self.vectorize:
            rows = self.per_example_jacobian(theta, x, y)
        else:
            rows = torch.stack(
                [jacrev(self._example_constraint)(theta, tree_map(lambda t, n=n: t[n], x), y[n]) for n in range(len(y))]
            )
        return rows.reshape(-1, self.size)

    def per_example_jacobian(self, theta: Tensor, x: Any, y: Tensor) -> Tensor:
        """The per-example Jacobians ``[B, m, P]`` (``[B, P]`` for one row) by ``vmap`` over examples: ``grad`` of a
        one-row constraint skips ``jacrev``'s vmap over its output basis (-17% on LeNet-5)."""
        per_example = grad(self._example_scalar) if self._one_row else jacrev(self._example_constraint)
        return vmap(per_example, in_dims=(None, 0, 0), chunk_size=self.chunk_size)(theta, x, y)

    def _check_vmap(self, theta: Tensor, x: Any, y: Tensor) -> None:
        """Try a vmapped per-example Jacobian on two examples; fall back to a loop (with a warning) if vmap fails
        and the loop does not: an error the loop meets too (inputs in another dtype than the weights) is the
        model's own, raised as it is."""
        self._vmap_checked = True
        try:
            rows = vmap(jacrev(self._example_constraint), in_dims=(None, 0, 0))(theta, take_examples(x, 2), y[:2])
            self._one_row = rows.shape[1] == 1
        except (RuntimeError, NotImplementedError, ValueError) as error:
            for n in range(min(2, len(y))):
                jacrev(self._example_constraint)(theta, tree_map(lambda t, n=n: t[n], x), y[n])
            warnings.warn(
                f"vmap over examples failed through {type(self.model).__name__} ({error}); "
                "per-example Jacobians fall back to a Python loop over examples",
                stacklevel=3,
            )
            self.vectorize = False

    def jvp(self, x: Any, tangents: Tensor, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(f(theta, x), [J(x) v_s]_s)`` for tangents ``[S, P]``; one forward-mode pass per tangent
        (scaled-dot-product attention runs on its math backend, the one with forward-mode AD)."""
        theta = self.theta() if theta is None else theta

        def one(v: Tensor) -> tuple[Tensor, Tensor]:
            output, product = jvp(lambda t: self.outputs(t, x), (theta,), (v,))[:2]
            return output, product

        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no forward-mode AD
            outputs, products = vmap(one, chunk_size=self.chunk_size)(tangents)
        return outputs[0], products

    def vjp(self, x: Any, y: Tensor, theta: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """``w -> J_b^T w`` for cotangents ``[S, M_b]``: one forward pass, then one backward per cotangent."""
        theta = self.theta() if theta is None else theta
        pullback = vjp(lambda t: self.constraints(t, x, y), theta)[1]

        def apply(cotangents: Tensor) -> Tensor:
            return vmap(pullback, chunk_size=self.chunk_size)(cotangents)[0]

        return apply

    def constraint_jvp(self, x: Any, y: Tensor, tangents: Tensor, theta: Tensor | None = None) -> Tensor:
        """``J_b v_s`` for tangents ``[S, P]`` -> ``[S, M_b]``: forward mode through the constraint map."""
        theta = self.theta() if theta is None else theta

        def one(v: Tensor) -> Tensor:
            return jvp(lambda t: self.constraints(t, x, y), (theta,), (v,))[1]

        with sdpa_kernel(SDPBackend.MATH):
            return vmap(one, chunk_size=self.chunk_size)(tangents)

    def bilinear_gradient(self, x: Any, y: Tensor, left: Tensor, right: Tensor, theta: Tensor | None = None) -> Tensor:
        """``grad_theta sum_k left_k^T J_b(theta) right_k`` for ``left [K, M_b]``, ``right [K, P]`` held fixed,
        i.e. ``sum_k H_k right_k`` with ``H_k`` the Hessian of ``<left_k, g(theta)>``: reverse over forward,
        nothing ``P x P`` formed (the parameter derivative of a projection's KKT system)."""
        theta = self.theta() if theta is None else theta

        def form(t: Tensor) -> Tensor:
            return (left * self.constraint_jvp(x, y, right, t)).sum()

        return grad(form)(theta)

    def loss(self, theta: Tensor, x: Any, y: Tensor, likelihood: Likelihood) -> Tensor:
        """The summed negative log-likelihood ``sum_n l(f(theta, x_n), y_n)`` (the likelihood's mean times B)."""
        return likelihood.loss(self.outputs(theta, x), y) * len(y)

    def hvp(self, x: Any, y: Tensor, vectors: Tensor, likelihood: Likelihood, theta: Tensor | None = None) -> Tensor:
        """``H v`` for the Hessian of the summed loss in ``theta``, vectors ``[S, P]``: forward over reverse
        (``jvp`` of ``grad``), nothing ``P x P`` formed."""
        theta = self.theta() if theta is None else theta
        gradient = grad(lambda t: self.loss(t, x, y, likelihood))

        def one(v: Tensor) -> Tensor:
            return jvp(gradient, (theta,), (v,))[1]

        with sdpa_kernel(SDPBackend.MATH):
            return vmap(one, chunk_size=self.chunk_size)(vectors)

    def ggn_vp(self, x: Any, y: Tensor, vectors: Tensor, likelihood: Likelihood, theta: Tensor | None = None) -> Tensor:
        """``GGN v = sum_n J_n^T H_n J_n v`` for vectors ``[S, P]``, with ``H_n`` the Hessian of the loss in the
        outputs, exact (softmax: ``diag(p) - p p^T``; homoscedastic Gaussian: ``1/sigma^2``; a heteroscedastic Gaussian's
        includes its scale output and need not be positive semi-definite): a JVP, an output-space HVP, a VJP."""
        theta = self.theta() if theta is None else theta
        outputs, tangents = self.jvp(x, vectors, theta)
        output_gradient = grad(lambda z: likelihood.loss(z, y) * len(y))
        curved = vmap(lambda u: jvp(output_gradient, (outputs,), (u,))[1])(tangents)
        pullback = vjp(lambda t: self.outputs(t, x), theta)[1]
        return vmap(pullback, chunk_size=self.chunk_size)(curved)[0]

    def check_forward_mode(self, x: Any) -> None:
        """Run one JVP; raise a clear error if some layer (e.g. a fused attention kernel) lacks forward AD."""
        theta = self.theta()
        try:
            self.jvp(take_examples(x, 1), torch.zeros(1, self.size, dtype=theta.dtype, device=theta.device), theta)
        except (RuntimeError, NotImplementedError) as error:
            raise RuntimeError(
                f"forward-mode AD (torch.func.jvp) failed through {type(self.model).__name__}: {error}. "
                "A custom autograd.Function needs a jvp staticmethod; attention needs a kernel with forward AD "
                "(attn_implementation='eager', or the math scaled-dot-product backend)."
            ) from error


def compiled_per_example_jacobian(function: ParameterFunction, theta: Tensor, x: Any, y: Tensor) -> Tensor:
    """:meth:`ParameterFunction.per_example_jacobian` under ``torch.compile``: the vmapped forward and per-example
    backward as one graph and, when ``theta`` requires grad, the second-order backward through them as another (a
    projection's parameter gradient, ``kernel_projection.DenseSystem.bilinear_gradient``).
    Eager ``torch.func`` dispatches every operation through its transform layers, which is most of the cost of a small
    network's step (``benchmarks/viking_overhead.py --compile``: LeNet-5, batch 32, 2 CPU threads, VIKING's epoch
    6.5x -> 5.1x a MAP epoch, a sweep 1.6x -> 1.1x). Compiled once per process (seconds; a C++ compiler on a CPU,
    Triton on a GPU), again for each batch shape and for gradient mode on or off; networks of one architecture share
    the code, and a process past dynamo's recompile limit (8) runs further ones eagerly, with dynamo's warning.
    Without donated buffers, so the backward may run more than once on one graph (``DenseSystem`` keeps it for
    repeated calls, e.g. ``gradcheck``), and with static shapes: torch 2.14's lazily compiled dynamic-shape backward
    still refuses a second run (its donated-buffer list is left ``None``, not empty)."""
    with compiled_by("compile_jacobian"), torch._functorch.config.patch(donated_buffer=False):
        return compiled(ParameterFunction.per_example_jacobian, dynamic=False)(function, theta, x, y)


def take_examples(x: Any, n: int) -> Any:
    """The first ``n`` examples of a batch (a tensor, or a dict or tuple of tensors)."""
    return tree_map(lambda t: t[:n] if isinstance(t, Tensor) else t, x)


@dataclass(frozen=True)
class GramFactor:
    """Pseudo-inverse of a Gram matrix ``G = V diag(lambda) V^T`` kept as ``(V, lambda^+)`` in float64.

    Eigenvalues at or below the cutoff (``rtol * lambda_max``, or ``atol`` when given) count as zero.
    """

    eigenvectors: Tensor
    inverse_eigenvalues: Tensor

    @classmethod
    def of(cls, gram: Tensor, rtol: float = 1e-5, atol: float | None = None) -> GramFactor:
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gram must be a square matrix; got shape {tuple(gram.shape)}")
        values, vectors = _small_eigh(gram.double())
        cutoff = atol if atol is not None else rtol * values.max().clamp_min(0.0)
        keep = values > cutoff
        inverse = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)), torch.zeros_like(values))
        return cls(vectors, inverse)

    @property
    def rank(self) -> int:
        return int((self.inverse_eigenvalues > 0).sum())

    def solve(self, rhs: Tensor) -> Tensor:
        """``G^+ r`` for right-hand sides ``[S, M]`` (float64)."""
        return ((rhs.double() @ self.eigenvectors) * self.inverse_eigenvalues) @ self.eigenvectors.T


HOST_EIGH_ROWS = 256  # accelerator Gram matrices up to this size are decomposed by the CPU's LAPACK


def _small_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of a small matrix by LAPACK on one CPU thread, moved back to the matrix's device.

    Multi-threaded LAPACK on a few hundred rows gains nothing and, on a busy machine, waits on its threads for up to
    a second per call (seen on 2 shared cores). On a GPU, ``eigh`` synchronises with the host anyway, and cuSOLVER's
    small-matrix path is slow (a 32 x 32 matrix in milliseconds against LAPACK's 50 us; pytorch/pytorch#10172, and
    #183806 for torch 2.11 + CUDA 13): a micro-batch's Gram matrix (a few kilobytes) makes the round trip instead.
    """
    if matrix.shape[-1] > (512 if matrix.device.type == "cpu" else HOST_EIGH_ROWS):
        return torch.linalg.eigh(matrix)
    if matrix.device.type != "cpu":
        values, vectors = _small_eigh(matrix.cpu())
        return values.to(matrix.device), vectors.to(matrix.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)


GRAM_BLOCK = 4096  # columns per float32 block product of :func:`gram`


def gram(jacobian: Tensor) -> Tensor:
    """``J J^T`` in float64 from a dense ``[M, P]`` Jacobian.

    On a CPU with full-precision float32 products (``torch.get_float32_matmul_precision() == "highest"``, the
    default) a float32 (or lower) ``J`` is multiplied in float32 over blocks of ``GRAM_BLOCK`` columns whose
    products are summed in float64, so the rounding error does not grow with ``P``: measured 5e-8 and 1.5e-8 of
    ``|J_i| |J_j|`` at ``P`` = 44,426 and 1e6 (one float32 product: 5e-7 and 2.8e-6), far below the
    pseudo-inverse's ``1e-5`` cutoff, 3x faster than converting ``J`` to float64 (LeNet-5, ``32 x 44,426``: 1.1
    against 3.1 ms plus the conversion). Otherwise (a float64 ``J``, a GPU, whose float32 products may run in
    TF32, or a lowered matmul precision) the product is taken in float64. Where every row's squared norm is below
    ``2^-64`` (the loss Jacobian of a batch fitted to 1e-20), or one overflows, the float32 products are taken again
    on ``J`` divided by the power of two just above its largest entry (exact), so that they do not sink into float32's
    subnormals: such a Gram matrix was 88% off at rows of 1e-23.
    """
    if jacobian.device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        jacobian = jacobian.double()
    if jacobian.dtype == torch.float64:
        return jacobian @ jacobian.T
    jacobian = jacobian.float()
    product = _blockwise_gram(jacobian, 1.0)
    largest = float(product.diagonal().max()) if len(product) else 1.0
    entry = float(jacobian.abs().max()) if not 2.0**-64 <= largest < math.inf else 0.0  # 0: J = 0, or no need
    if entry > 0:
        scale = 2.0 ** math.frexp(entry)[1]  # the largest entry / scale in [0.5, 1)
        product = _blockwise_gram(jacobian, scale) * scale**2
    return product


def _blockwise_gram(jacobian: Tensor, scale: float) -> Tensor:
    """``(J / scale) (J / scale)^T`` of a float32 ``J``, float32 products over column blocks summed in float64."""
    product = torch.zeros(len(jacobian), len(jacobian), dtype=torch.float64, device=jacobian.device)
    for block in jacobian.split(GRAM_BLOCK, dim=1):
        block = block / scale if scale != 1.0 else block
        product += (block @ block.T).double()
    return product

