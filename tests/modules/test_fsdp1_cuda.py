"""FSDP1 (Lightning's ``FSDPStrategy``, every ``nn.Linear`` its own flat unit, full state dicts) on the CUDA devices
(at most 2; ``tests/distributed_run.py``): the SWAG moments (gathered by ``SWASubspace`` with
``summon_full_params``), MAP's and IVON's parameters and IVON's Hessian follow the plain one-device run on the same
global batches, a variational posterior survives the strategy's checkpoint, and every resumed run ends as an
unstopped one. FSDP1 needs CUDA, so these skip on a CPU; their CPU twins are the FSDP2 tests
(``test_swa_subspace_distributed.py``, ``test_ivon_fsdp.py``, ``test_sharded_modules.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_run import assert_swag_moments_close, build, cuda_devices, fit_and_resume, fit_in_one_process

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs a CUDA device"),
]
# float64 on both sides; two ranks differ from one device only by the summation order of their gradient average
RTOL, ATOL = 1e-9, 1e-12


def _fsdp_runs(tmp_path: Path, method: str, epochs: int = 3) -> tuple[dict, dict, dict]:
    """The plain one-device run, the FSDP1 run and an FSDP1 run stopped one epoch early and resumed."""
    single = fit_in_one_process(tmp_path / "single", epochs, method, strategy="cuda")
    sharded, resumed = fit_and_resume(tmp_path, epochs, method, strategy="fsdp")
    return single, sharded, resumed


def _assert_same_parameters(expected: dict, *runs: dict) -> None:
    for run in runs:
        assert list(run["state_dict"]) == list(expected["state_dict"])  # whole tensors under the module's names
        for name, value in expected["state_dict"].items():
            torch.testing.assert_close(run["state_dict"][name], value, rtol=RTOL, atol=ATOL, msg=name)


def test_fsdp1_swag_collects_the_one_device_moments_and_resumes_exactly(tmp_path: Path) -> None:
    single, sharded, resumed = _fsdp_runs(tmp_path, "swa")
    expected = single["callbacks"]["SWASubspace"]["moments"]
    assert expected["count"].item() == 8  # steps 5..12: the snapshots of epochs 2 and 3
    for run in (sharded, resumed):
        assert_swag_moments_close(run, expected, RTOL, ATOL)
    _assert_same_parameters(single, sharded, resumed)
    for key, value in sharded["callbacks"]["SWASubspace"]["moments"].items():
        assert torch.equal(resumed["callbacks"]["SWASubspace"]["moments"][key], value), key


def test_fsdp1_map_follows_the_one_device_run(tmp_path: Path) -> None:
    single, sharded, resumed = _fsdp_runs(tmp_path, "map", epochs=2)
    _assert_same_parameters(single, sharded, resumed)


@pytest.mark.skipif(cuda_devices() > 1, reason="FSDP1 flat shards on several ranks would share one IVON noise draw")
def test_fsdp1_ivon_keeps_its_hessian_and_noise_through_the_strategy_checkpoint(tmp_path: Path) -> None:
    single, sharded, resumed = _fsdp_runs(tmp_path, "ivon")
    _assert_same_parameters(single, sharded, resumed)
    expected = single["optimizer_states"][0]
    assert expected["param_groups"][0]["noise_steps"] == 12  # 3 epochs of 4 steps
    for run in (sharded, resumed):
        optimizer = run["optimizer_states"][0]  # Lightning re-keys FSDP's full state by parameter position
        group = optimizer["param_groups"][0]
        assert (group["noise_seed"], group["noise_steps"]) == (0, 12)
        for index, state in expected["state"].items():
            for key in ("hess", "momentum"):
                torch.testing.assert_close(optimizer["state"][index][key], state[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.skipif(
    cuda_devices() > 1,
    reason="checked on one device: the KL reads the variational parameters outside "
    "the forward, where FSDP1 has resharded them on several ranks",
)
def test_fsdp1_variational_posterior_survives_the_strategy_checkpoint(tmp_path: Path) -> None:
    _, sharded, resumed = _fsdp_runs(tmp_path, "vi")
    fresh = build("vi")
    initial = {name: value.clone() for name, value in fresh.state_dict().items()}
    fresh.load_state_dict(sharded["state_dict"])  # strict: a one-process module takes the FSDP1 run's posterior
    for name, value in sharded["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    moved = [n for n, v in sharded["state_dict"].items() if n.endswith("raw_scale") and not torch.equal(v, initial[n])]
    assert moved, "the posterior scales did not train"
