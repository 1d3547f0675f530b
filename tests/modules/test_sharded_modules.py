"""Our modules under FSDP2 (``BayesianModule.configure_model`` under Lightning's ``ModelParallelStrategy``; 2 CPU
processes, gloo; ``tests/distributed_run.py``): MAP follows the one-process run on the same global batches; variational
inference keeps its variational parameters in the strategy's (gathered) checkpoint, which a one-process module
loads, and a resumed run ends as an unstopped one; methods that need whole parameters refuse by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_run import build, fit_and_resume, fit_distributed, fit_in_one_process, predictive_probabilities
from torch import nn

from lightning_bayes.modules import MAP, SSVI, DeepEnsemble, NullSpaceLaplace, VariationalInference

distributed = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")


@pytest.mark.slow
@distributed
def test_sharded_map_follows_the_one_process_run(tmp_path: Path) -> None:
    single = fit_in_one_process(tmp_path / "single", 2, "map")
    sharded = fit_distributed(tmp_path / "sharded", 2, "map")
    assert list(sharded["state_dict"]) == list(single["state_dict"])  # full tensors under the module's own names
    for name, value in single["state_dict"].items():
        torch.testing.assert_close(sharded["state_dict"][name], value, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
@distributed
def test_sharded_variational_inference_checkpoints_its_posterior_and_resumes_exactly(tmp_path: Path) -> None:
    sharded, resumed = fit_and_resume(tmp_path, 3, "vi")
    fresh = build("vi")
    expected = {name: value.clone() for name, value in fresh.state_dict().items()}
    assert set(sharded["state_dict"]) == set(expected)
    for name, value in sharded["state_dict"].items():
        assert value.shape == expected[name].shape, name  # gathered, not one rank's shard
        assert torch.equal(resumed["state_dict"][name], value), name
    fresh.load_state_dict(sharded["state_dict"])  # strict: the one-process module takes the sharded run's posterior
    moved = [n for n, v in sharded["state_dict"].items() if n.endswith("raw_scale") and not torch.equal(v, expected[n])]
    assert moved, "the posterior scales did not train"


@pytest.mark.slow
@distributed
def test_sharded_ivon_module_keeps_the_one_process_posterior_and_predictive(tmp_path: Path) -> None:
    single = fit_in_one_process(tmp_path / "single", 3, "ivon_module")
    sharded, resumed = fit_and_resume(tmp_path, 3, "ivon_module")

    variance = single["state_dict"]["posterior_variance"]
    assert torch.isfinite(variance).all() and variance.numel() == 32  # sigma^2 of all 32 weights, gathered
    for run in (sharded, resumed):  # means and sigma^2 up to the summation order of the ranks' gradient average
        assert list(run["state_dict"]) == list(single["state_dict"])
        for name, value in single["state_dict"].items():
            torch.testing.assert_close(run["state_dict"][name], value, rtol=1e-9, atol=1e-12, msg=name)
    for name, value in sharded["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    # the sharded module's sampled predictive draws the one-process noise, each rank its shard
    expected = torch.load(tmp_path / "single" / "predictive.pt")
    torch.testing.assert_close(torch.load(tmp_path / "sharded" / "predictive.pt"), expected, rtol=1e-9, atol=1e-12)
    fresh = build("ivon_module")
    fresh.load_state_dict(sharded["state_dict"])  # strict: a one-process module takes the sharded posterior
    torch.testing.assert_close(predictive_probabilities(fresh), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "module",
    [
        lambda: DeepEnsemble(nn.Linear(2, 2), num_members=2),
        lambda: NullSpaceLaplace(nn.Linear(2, 2)),
        lambda: SSVI(nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2)), dataset_size=4),  # crashed at its first mask
    ],
)
def test_methods_that_need_whole_parameters_refuse_sharding_by_name(module) -> None:
    instance = module()
    instance._device_mesh = object()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(ValueError, match=f"{type(instance).__name__} does not support sharded .*'ddp'"):
        instance.configure_model()


def test_no_device_mesh_leaves_the_module_unsharded() -> None:
    for module in (MAP(nn.Linear(2, 2)), VariationalInference(nn.Sequential(nn.Linear(2, 2)), dataset_size=4)):
        module.configure_model()
        assert all(type(p) is nn.Parameter for p in module.parameters())


@pytest.mark.slow
@distributed
@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp_cpu2"])
def test_a_base_frozen_after_it_was_built_checkpoints_and_resumes_under_sharding(tmp_path: Path, strategy: str) -> None:
    """A post-hoc probe's base, frozen after the constructor built it: deciding at save time whether it still held
    the pretrained weights hashed the parameters, which crashed on FSDP2's DTensors and, under FSDP1, read a nested
    state dict that only rank 0 fills. Sharded, the base is kept; the checkpoint loads into one process."""
    saved = fit_distributed(tmp_path / "run", 1, "probe", strategy=strategy)
    single = build("probe")
    single.load_state_dict(saved["state_dict"])  # strict
    assert {"backbone.head.weight", "backbone.head.bias"} <= set(saved["state_dict"])


@pytest.mark.slow
@distributed
def test_an_fsdp1_run_with_a_base_frozen_when_built_resumes(tmp_path: Path) -> None:
    """The frozen part stays out of checkpoints; loading one under FSDP1 named the missing keys with FSDP1's wrapper
    segments, which the check that accepts their absence did not match: every resume failed."""
    sharded, resumed = fit_and_resume(tmp_path, 2, "part_frozen", strategy="fsdp_cpu2")
    assert not any(".model.0." in name for name in sharded["state_dict"]), "the frozen layer stays out"
    assert sharded["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in sharded["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-12, atol=0, msg=name)
