"""A tiny fit on 2 CPU processes (gloo) under FSDP2 (Lightning's ``ModelParallelStrategy``: ``fully_shard`` in
``configure_model``) or DDP, or under FSDP1 (``FSDPStrategy``, every ``nn.Linear`` its own flat unit) on the CUDA
devices (at most 2, NCCL) or in one or two CPU processes (gloo), for the distributed tests; Lightning starts rank 1
by running this script again.

    python distributed_run.py OUT MAX_EPOCHS {swa,ivon,map,vi,ivon_module,probe,part_frozen}
        {fsdp2,ddp,fsdp,fsdp_cpu,fsdp_cpu2} [RESUME]

``swa``: a plain LightningModule trained by SGD with momentum and a :class:`SWASubspace` callback; ``ivon``: the
same module trained by the :class:`IVON` optimiser; ``map``, ``vi`` and ``ivon_module``: the library's
:class:`MAP`, :class:`VariationalInference` and :class:`IVONModule` (sharded by ``BayesianModule.configure_model``);
``probe`` and ``part_frozen``: :class:`MAP` of a pretrained-style base that leaves its frozen part out of checkpoints
(``exclude_frozen_base``), frozen as a whole by a post-hoc :class:`LinearProbe`, or in part when built. Writes
``OUT/last.ckpt`` (a full checkpoint: ``save_distributed_checkpoint=False``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_bayes.callbacks.swa_subspace import SWASubspace, collector_states
from lightning_bayes.models import LinearProbe
from lightning_bayes.models.frozen_base import exclude_frozen_base
from lightning_bayes.modules import MAP, IVONModule, VariationalInference
from lightning_bayes.optim import IVON

from gloo_exit import exit_worker

GLOBAL_BATCH = 8


def network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


class ShardedRegression(LightningModule):
    """A float64 MLP whose two linear layers and root are sharded by FSDP2 when a device mesh exists."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.net = network()

    def configure_model(self) -> None:
        if self.device_mesh is None:  # one process: nothing to shard
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return F.mse_loss(self.net(x)[:, 0], torch.sin(x.sum(1)))

    def configure_optimizers(self):
        if self.optimizer == "ivon":
            return ivon_factory(self.parameters(), ess=RankedPoints.num_train)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class RankedPoints(LightningDataModule):
    """32 fixed points in order, labelled by the sign of their sum: rank r of W takes points r, r + W, ...
    (``DistributedSampler`` unshuffled), so the ranks' batches of ``GLOBAL_BATCH / W`` together are the one-process
    batch of ``GLOBAL_BATCH``."""

    num_train = 32

    def train_dataloader(self) -> DataLoader:
        x = torch.randn(self.num_train, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        data = TensorDataset(x, (x.sum(1) > 0).long())
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def ivon_factory(params, ess: float) -> IVON:
    return IVON(params, ess, lr=0.05, hess_init=0.5, mc_samples=2, seed=0)


def swa_callback() -> SWASubspace:
    return SWASubspace(params="all", start_epoch=1, every_n_steps=1, max_rank=3)


class PretrainedBase(nn.Module):
    """A network "rebuilt from its pretrained source" by its constructor (seed 0), its first layer frozen when
    ``part_frozen``; checkpoints leave out what is frozen (:func:`exclude_frozen_base`)."""

    def __init__(self, part_frozen: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        self.model.register_buffer("scale", torch.ones(4, dtype=torch.float64))
        self.num_features = 4
        if part_frozen:
            self.model[0].requires_grad_(False)
        exclude_frozen_base(self, "model")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.model.scale


def build(method: str) -> LightningModule:
    if method in ("probe", "part_frozen"):
        probe = LinearProbe(PretrainedBase(method == "part_frozen"), num_classes=2, freeze_backbone=method == "probe")
        # momentum: Lightning's FSDP1 loading indexes the first optimiser state (IndexError when there is none)
        return MAP(probe.double(), optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    if method == "map":
        return MAP(network(), optimizer=lambda params: torch.optim.AdamW(params, lr=0.01))
    if method == "vi":
        return VariationalInference(network(), optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    if method == "ivon_module":
        return IVONModule(network(), optimizer=ivon_factory, dataset_size=RankedPoints.num_train, num_samples=4)
    return ShardedRegression(method)


def cuda_devices() -> int:
    """The CUDA devices an FSDP1 run uses: all there are, at most 2."""
    return min(torch.cuda.device_count(), 2)


class Float64FSDPPrecision(FSDPPrecision):
    """FSDP1 keeping the tests' float64 network and data in float64. Lightning's FSDP1 precisions stop at "32-true",
    which casts the module and every batch to float32 (``convert_module``, ``convert_input``: the FSDP1 runs then
    differed from the plain one by 3e-8, float32's rounding) and has FSDP compute in float32; these tests compare with
    1e-9 tolerances, so the plugin's one target dtype is float64 and FSDP gathers, computes and reduces in float64."""

    def __init__(self) -> None:
        super().__init__("32-true")
        self._desired_input_dtype = torch.float64  # what convert_module, convert_input and forward_context use

    @property
    def mixed_precision_config(self) -> MixedPrecision:
        return MixedPrecision(param_dtype=torch.float64, reduce_dtype=torch.float64, buffer_dtype=torch.float64)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP1 strategy in CPU processes, the CUDA tests' twin. FSDP1 runs on a CPU when its
    ``device_id`` is the CPU, but Lightning passes the root device's index (None there, and FSDP then looks for an
    accelerator): the module is wrapped here first, with the strategy's own settings, and Lightning takes it as
    already wrapped (Lightning refuses a CPU accelerator for ``FSDPStrategy`` itself, not for a subclass)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        wrapped = FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, cpu_offload=self.cpu_offload, **self.kwargs,
        )  # fmt: skip
        self.kwargs.pop("auto_wrap_policy")  # applied; Lightning would warn that a wrapped module ignores it
        return super()._setup_model(wrapped)


def strategy_for(name: str) -> tuple[str | Strategy, str, int]:
    """``(strategy, accelerator, devices)`` of a run under ``name``."""
    if name in ("single", "cuda"):  # one process, on the CPU or on one CUDA device
        return "auto", "cpu" if name == "single" else "cuda", 1
    if name == "ddp":
        return "ddp", "cpu", 2
    if name == "fsdp2":
        fsdp2 = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
        return fsdp2, "cpu", 2
    if name in ("fsdp", "fsdp_cpu", "fsdp_cpu2"):  # full state dicts: whole tensors under the module's names
        options: dict[str, Any] = {
            "auto_wrap_policy": {nn.Linear}, "state_dict_type": "full", "precision_plugin": Float64FSDPPrecision()
        }
        if name == "fsdp":
            return FSDPStrategy(**options), "cuda", cuda_devices()
        return CPUFSDPStrategy(**options, process_group_backend="gloo"), "cpu", 2 if name == "fsdp_cpu2" else 1
    raise ValueError(f"strategy must be one of single, cuda, ddp, fsdp2, fsdp, fsdp_cpu, fsdp_cpu2; got {name!r}")


def fit(out: str, max_epochs: int, method: str, resume_from: str | None, strategy_name: str = "single") -> None:
    strategy, accelerator, devices = strategy_for(strategy_name)
    trainer = Trainer(
        max_epochs=max_epochs, accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out, use_distributed_sampler=False,
        callbacks=[*([swa_callback()] if method == "swa" else []), ModelCheckpoint(dirpath=out, save_last=True)],
    )  # fmt: skip
    module = build(method)
    trainer.fit(module, datamodule=RankedPoints(), ckpt_path=resume_from)
    if method == "ivon_module":  # the predictive of the fitted (on several ranks: sharded) module
        probabilities = predictive_probabilities(module)
        if trainer.global_rank == 0:
            torch.save(probabilities, Path(out) / "predictive.pt")


def predictive_probabilities(module: IVONModule) -> torch.Tensor:
    """The model average over ``module.num_samples`` posterior draws at 5 fixed inputs, the draws seeded."""
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(module.device)
    torch.manual_seed(3)
    with torch.no_grad():
        return module.predictive(x).probs.cpu()


def fit_distributed(
    out: Path, max_epochs: int, method: str, resume_from: Path | None = None, strategy: str = "fsdp2"
) -> dict[str, Any]:
    """Run this script (2 CPU processes under "fsdp2", "ddp" or "fsdp_cpu2"; the CUDA devices under "fsdp", one CPU
    process under "fsdp_cpu") and return the checkpoint it wrote."""
    command = [sys.executable, __file__, str(out), str(max_epochs), method, strategy]
    command += [str(resume_from)] if resume_from else []
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, check=False, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return torch.load(out / "last.ckpt", weights_only=False)


def fit_and_resume(folder: Path, max_epochs: int, method: str, strategy: str = "fsdp2") -> tuple[dict, dict]:
    """Checkpoints of a distributed fit (``folder/sharded``) and of one stopped an epoch early and resumed from the
    strategy's checkpoint (``folder/resumed``)."""
    sharded = fit_distributed(folder / "sharded", max_epochs, method, strategy=strategy)
    fit_distributed(folder / "stopped", max_epochs - 1, method, strategy=strategy)
    resumed = fit_distributed(
        folder / "resumed", max_epochs, method, resume_from=folder / "stopped" / "last.ckpt", strategy=strategy
    )
    return sharded, resumed


def swa_subspace_state(run: dict) -> dict:
    """The state of checkpoint ``run``'s one ``SWASubspace`` (keyed by its arguments, as ``ModelCheckpoint``'s)."""
    (state,) = collector_states(run["callbacks"]).values()
    return state


def assert_swag_moments_close(run: dict, expected: dict, rtol: float, atol: float) -> None:
    """The ``SWASubspace`` moments of checkpoint ``run`` equal ``expected`` (a checkpoint's moments)."""
    moments = swa_subspace_state(run)["moments"]
    assert moments["count"].item() == expected["count"].item()
    assert moments["position"].item() == expected["position"].item()
    for key in ("mean", "sq_mean", "deviations"):
        torch.testing.assert_close(moments[key], expected[key], rtol=rtol, atol=atol, msg=key)


def fit_in_one_process(out: Path, max_epochs: int, method: str, strategy: str = "single") -> dict[str, Any]:
    """The same fit in this process ("single": the CPU, "cuda": one CUDA device), on the same global batches;
    returns its checkpoint."""
    fit(str(out), max_epochs, method, None, strategy)
    return torch.load(out / "last.ckpt", weights_only=False)


if __name__ == "__main__":
    fit(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5] if len(sys.argv) > 5 else None, sys.argv[4])
    exit_worker()  # no interpreter finalisation: see gloo_exit.py
