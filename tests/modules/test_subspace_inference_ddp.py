"""SubspaceInference on 2 CPU processes (gloo) against one process on the same batches: elliptical slice sampling
sums the ranks' log-likelihoods before each accept/shrink decision (every rank makes the same seeded draws), so
the chain is the one-process chain; each sample's BatchNorm statistics are the ranks' average, which with equal
shards of whole batches is the one-process refresh. Float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bayes.inference.swag import SWAGMoments
from lightning_bayes.modules.subspace_inference import SubspaceInference

from ddp_comparison import rank_states, spawn_trainer
from shards import AlternateBatches
from test_subspace_inference import linear_module, regression

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")

BATCH = 10


class Recorder(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"samples": pl_module.samples.clone(), "bn": pl_module.bn_statistics.clone()},
                   self.folder / f"rank{trainer.global_rank}.pt")


def fit(folder: Path, module: SubspaceInference, data: TensorDataset, devices: int, max_epochs: int) -> list[dict]:
    folder.mkdir()
    loader = DataLoader(data, batch_size=BATCH, sampler=AlternateBatches(len(data), BATCH))
    spawn_trainer(devices, [Recorder(folder)], max_epochs=max_epochs).fit(module, loader)
    return rank_states(folder)


def test_ess_on_two_processes_draws_the_one_process_chain(tmp_path: Path) -> None:
    x, y, state = regression()
    data = TensorDataset(x, y)
    single = fit(tmp_path / "single", linear_module(state, method="ess", num_samples=12), data, 1, -1)
    ranks = fit(tmp_path / "ddp", linear_module(state, method="ess", num_samples=12), data, 2, -1)
    assert len(ranks) == 2 and torch.equal(ranks[0]["samples"], ranks[1]["samples"])
    assert single[0]["samples"].abs().min() > 0  # all 12 accepted
    # the log-likelihood summed in another order: float64 round-off
    torch.testing.assert_close(ranks[0]["samples"], single[0]["samples"], rtol=1e-10, atol=1e-12)


def batchnorm_module() -> SubspaceInference:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).double()
    names = ["0.weight", "3.weight"]
    centre = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    moments = SWAGMoments(centre.numel(), 3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        moments.update(centre + 0.3 * torch.randn(centre.numel(), dtype=torch.float64, generator=generator))
    return SubspaceInference(model, swag_state={"names": names, "max_rank": 3, "moments": moments.state_dict()},
                             subspace="pca", rank=2, method="none", likelihood="gaussian", num_samples=3)


def test_batchnorm_statistics_of_each_sample_are_the_one_process_refresh(tmp_path: Path) -> None:
    x, y, _ = regression()
    data = TensorDataset(x, y)
    single = fit(tmp_path / "single", batchnorm_module(), data, 1, 1)[0]
    ranks = fit(tmp_path / "ddp", batchnorm_module(), data, 2, 1)
    assert torch.equal(ranks[0]["bn"], ranks[1]["bn"]) and torch.equal(ranks[0]["samples"], single["samples"])
    assert single["bn"].shape[0] == 3 and not torch.equal(single["bn"][0], single["bn"][1])  # one per sample
    torch.testing.assert_close(ranks[0]["bn"], single["bn"], rtol=1e-12, atol=1e-14)


def test_ess_counts_every_example_once_when_the_sampler_pads(tmp_path: Path) -> None:
    """39 points on 2 processes: Lightning's DistributedSampler repeats one to give both 20; the summed
    log-likelihood leaves the repeat out, so the chain is still the one-process chain."""
    x, y, state = regression()
    data = TensorDataset(x[:39], y[:39])
    chains = []
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        folder.mkdir()
        module = linear_module(state, method="ess", num_samples=8)
        trainer = spawn_trainer(devices, [Recorder(folder)], max_epochs=-1, use_distributed_sampler=True)
        trainer.fit(module, DataLoader(data, batch_size=BATCH))
        chains.append(rank_states(folder))
    (single,), ranks = chains
    assert single["samples"].abs().min() > 0 and torch.equal(ranks[0]["samples"], ranks[1]["samples"])
    torch.testing.assert_close(ranks[0]["samples"], single["samples"], rtol=1e-10, atol=1e-12)
