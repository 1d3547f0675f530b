"""FSDP1 (Lightning's ``FSDPStrategy``, every ``nn.Linear`` its own flat unit, full state dicts; a float64 network,
``tests/distributed_run.py``): the SWAG moments (gathered by ``SWASubspace`` with ``summon_full_params``), MAP's and
IVON's parameters and IVON's Hessian follow the plain one-device run on the same global batches, a variational
posterior survives the strategy's checkpoint, and every resumed run ends as an unstopped one.

Each test runs on the CUDA devices (at most 2; marked ``gpu``, skipped without CUDA) and, as its CPU twin, in CPU
processes (gloo; FSDP1 told ``device_id=cpu``): SWAG on two ranks, truly sharded; MAP on one, because on CPU
ranks torch's FSDP1 returns a two-state optimiser's full state wrongly (torch 2.14, ``_optim_utils.
_allgather_orig_param_states``: every state is gathered into one reused buffer and kept as views of it, which the
offload's ``.cpu()`` copies on a GPU but not on a CPU, so AdamW's ``exp_avg`` comes back equal to its ``exp_avg_sq``
and a resumed run diverges; SGD's one momentum buffer comes back right); IVON and VI on one, as on the GPU. FSDP2's two-rank CPU tests are ``test_swa_subspace_distributed.py``, ``test_ivon_fsdp.py``
and ``test_sharded_modules.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_run import (
    assert_swag_moments_close,
    build,
    cuda_devices,
    fit_and_resume,
    fit_distributed,
    fit_in_one_process,
    swa_subspace_state,
)

pytestmark = pytest.mark.slow
WHERE = pytest.mark.parametrize(
    "where",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ],
)
RANKS = {"cpu": 1, "cuda": cuda_devices()}  # the one-rank CPU twins; SWAG's runs on two
# float64 on both sides; two ranks differ from one device only by the summation order of their gradient average
RTOL, ATOL = 1e-9, 1e-12


def _fsdp_runs(
    tmp_path: Path, where: str, method: str, epochs: int = 3, cpu_ranks: int = 1
) -> tuple[dict, dict, dict]:
    """The plain one-device run, the FSDP1 run and an FSDP1 run stopped one epoch early and resumed."""
    single = fit_in_one_process(tmp_path / "single", epochs, method, strategy="single" if where == "cpu" else "cuda")
    strategy = "fsdp" if where == "cuda" else "fsdp_cpu" if cpu_ranks == 1 else "fsdp_cpu2"
    sharded, resumed = fit_and_resume(tmp_path, epochs, method, strategy=strategy)
    return single, sharded, resumed


def _assert_same_parameters(expected: dict, *runs: dict) -> None:
    for run in runs:
        assert list(run["state_dict"]) == list(expected["state_dict"])  # whole tensors under the module's names
        for name, value in expected["state_dict"].items():
            torch.testing.assert_close(run["state_dict"][name], value, rtol=RTOL, atol=ATOL, msg=name)


@WHERE
def test_fsdp1_swag_collects_the_one_device_moments_and_resumes_exactly(tmp_path: Path, where: str) -> None:
    single, sharded, resumed = _fsdp_runs(tmp_path, where, "swa", cpu_ranks=2)
    expected = swa_subspace_state(single)["moments"]
    assert expected["count"].item() == 8  # steps 5..12: the snapshots of epochs 2 and 3
    for run in (sharded, resumed):
        assert_swag_moments_close(run, expected, RTOL, ATOL)
    _assert_same_parameters(single, sharded, resumed)
    for key, value in swa_subspace_state(sharded)["moments"].items():
        assert torch.equal(swa_subspace_state(resumed)["moments"][key], value), key


@WHERE
def test_fsdp1_map_follows_the_one_device_run(tmp_path: Path, where: str) -> None:
    single, sharded, resumed = _fsdp_runs(tmp_path, where, "map", epochs=2)
    _assert_same_parameters(single, sharded, resumed)


@WHERE
def test_fsdp1_ivon_keeps_its_hessian_and_noise_through_the_strategy_checkpoint(tmp_path: Path, where: str) -> None:
    if RANKS[where] > 1:
        pytest.skip("FSDP1 flat shards on several ranks would share one IVON noise draw")
    single, sharded, resumed = _fsdp_runs(tmp_path, where, "ivon")
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


@WHERE
def test_fsdp1_variational_posterior_survives_the_strategy_checkpoint(tmp_path: Path, where: str) -> None:
    if RANKS[where] > 1:
        pytest.skip(
            "checked on one device: the KL reads the variational parameters outside the forward, where FSDP1 has "
            "resharded them on several ranks"
        )
    _, sharded, resumed = _fsdp_runs(tmp_path, where, "vi")
    fresh = build("vi")
    initial = {name: value.clone() for name, value in fresh.state_dict().items()}
    fresh.load_state_dict(sharded["state_dict"])  # strict: a one-process module takes the FSDP1 run's posterior
    for name, value in sharded["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    moved = [n for n, v in sharded["state_dict"].items() if n.endswith("raw_scale") and not torch.equal(v, initial[n])]
    assert moved, "the posterior scales did not train"


@pytest.mark.parametrize(
    "method,refusal",
    [
        ("vi", "VariationalInference does not support FSDP1 .* on 2 processes: .*ModelParallelStrategy"),
        ("ivon", "IVON does not support FSDP1's flat parameters .* on 2 processes"),
    ],
)
def test_fsdp1_on_two_ranks_refuses_what_it_would_compute_on_one_shard(tmp_path: Path, method: str, refusal: str):
    """Run, they end off the one-process run without an error (two CPU ranks: VI's KL gradient scaled down by the
    shards, IVON's posterior 10-30% off); so the library's module and optimiser refuse, naming what to use."""
    with pytest.raises(RuntimeError, match=refusal):
        fit_distributed(tmp_path / "sharded", 1, method, strategy="fsdp_cpu2")

