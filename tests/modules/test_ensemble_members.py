"""A deep ensemble's members: a list of networks as given, or copies of one whose re-drawn start is checked against
the original's; through the Python API and the CLI."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_bayes.cli import run
from lightning_bayes.models import MLP
from lightning_bayes.modules import DeepEnsemble

from cli_helpers import ROOT, quick_args


def mlp(hidden: int = 8, seed: int | None = None) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def test_a_list_of_networks_is_the_members_as_given_and_its_predictive_averages_theirs() -> None:
    torch.manual_seed(0)
    networks = [mlp(), mlp(), mlp()]
    ensemble = DeepEnsemble(networks, vectorize=True)  # one structure: vectorised
    assert ensemble.num_members == 3 and all(a is b for a, b in zip(ensemble.members, networks))
    assert ensemble.vectorized()
    x = torch.randn(5, 4)
    expected = torch.stack([net(x).softmax(-1) for net in networks]).mean(0)
    torch.testing.assert_close(ensemble.predictive(x).probs, expected, rtol=1e-6, atol=1e-7)
    assert DeepEnsemble(mlp()).num_members == 5  # one network: 5 members unless told


@pytest.mark.parametrize("odd", [0, 1, 2])
def test_members_of_different_shapes_run_in_a_loop_and_vectorize_true_is_warned(odd: int) -> None:
    torch.manual_seed(0)
    networks = [mlp(12) if index == odd else mlp() for index in range(3)]
    with pytest.warns(UserWarning, match=r"vectorize=True\) runs its members in a loop: the members are not one"):
        ensemble = DeepEnsemble(networks, vectorize=True)
    assert not ensemble.vectorized()
    x = torch.randn(5, 4)
    torch.testing.assert_close(ensemble(x), torch.stack([net(x) for net in networks]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("backbone", "num_members", "message"),
    [
        (lambda: [mlp()], None, r"at least 2, and num_members \(or None\) must match; got 1 networks"),
        (lambda: [mlp(), mlp()], 3, r"must match; got 2 networks and num_members=3"),
        (lambda: [mlp(), "mlp"], None, "backbone must be a network or a list of networks; got list"),
        (lambda: "mlp", None, "backbone must be a network or a list of networks; got str"),
        (lambda: mlp(), 1, "num_members must be an int >= 2 for an ensemble; got 1"),
        (lambda: [mlp(), mlp().requires_grad_(False)], None, r"needs a backbone\[1\] with trainable parameters"),
    ],
)
def test_bad_members_are_refused_by_name(backbone, num_members, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeepEnsemble(backbone(), num_members=num_members)


def test_the_same_network_twice_is_refused_and_equal_starts_warn() -> None:
    net = mlp()
    with pytest.raises(ValueError, match="holds one network more than once"):
        DeepEnsemble([net, mlp(), net])
    with pytest.warns(UserWarning, match=r"backbone\[0\] and backbone\[2\] start with the same trainable weights"):
        DeepEnsemble([mlp(seed=3), mlp(seed=4), mlp(seed=3)])


def test_one_network_with_its_own_initialisation_warns_naming_what_the_copies_redraw_otherwise() -> None:
    """The copies re-draw through ``reset_parameters``; the original's zeroed weight (timm's last BatchNorm of a
    block), 3x-scaled weight (a fan-out initialiser) and zeroed bias are not draws of that, the untouched layer is."""
    torch.manual_seed(0)  # 64 elements and more are compared by scale, 2 and more by constancy
    net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[2].weight.mul_(3.0)  # 64 elements
        net[4].bias.zero_()  # 2 elements
    with pytest.warns(UserWarning, match=r"differ in scale for 3 trainable parameters \(e.g. \['0.weight', "
                      r"'2.weight', '4.bias'\]\).*Pass backbone as a list"):
        DeepEnsemble(net, num_members=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a network initialised by its layers: no warning
        DeepEnsemble(MLP(64, 10, hidden=[32]), num_members=3)


def test_a_yaml_list_of_members_trains_through_the_cli_and_its_checkpoint_tests(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "configs" / "digits" / "deep_ensemble.yaml").read_text())
    member = {"class_path": "lightning_bayes.models.MLP", "init_args": {"in_features": 64, "out_features": 10,
                                                                       "hidden": [16]}}
    config["model"]["init_args"].pop("num_members")
    config["model"]["init_args"]["backbone"] = [member, member, member]
    path = tmp_path / "members.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run([*quick_args(path, tmp_path, batches=2), "--test_after_fit=false"])
    members = cli.model.members
    assert len(members) == 3 and not torch.equal(members[0].head.weight, members[1].head.weight)
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    tested = run(["test", "--config", str(path), f"--ckpt_path={checkpoint}", "--trainer.limit_test_batches=1",
                  f"--trainer.logger.init_args.save_dir={tmp_path}"])
    for trained, restored in zip(members, tested.model.members):
        for a, b in zip(trained.parameters(), restored.parameters()):
            assert torch.equal(a.cpu(), b.cpu())


def test_a_module_list_is_a_list_of_members_and_a_meta_network_builds_without_value_checks() -> None:
    networks = nn.ModuleList([mlp(seed=1), mlp(seed=2)])
    ensemble = DeepEnsemble(networks)
    assert ensemble.num_members == 2 and ensemble.members[1] is networks[1]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no scale warning from values that do not exist
        on_meta = DeepEnsemble(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3)), num_members=3)
        listed = DeepEnsemble([mlp(), mlp()])
    assert next(on_meta.members[2].parameters()).is_meta and next(listed.members[1].parameters()).is_meta


@pytest.mark.parametrize("other", [nn.ReLU(), nn.Dropout(0.5)])
def test_members_of_equal_shapes_but_other_modules_compute_their_own_outputs(other: nn.Module) -> None:
    """Vectorised, every member would run through the first's modules: a member with another activation or another
    dropout rate (same parameter shapes) loops, so its own function computes its outputs."""
    torch.manual_seed(0)
    networks = [nn.Sequential(nn.Linear(4, 8), other, nn.Linear(8, 3)), nn.Sequential(nn.Linear(4, 8), nn.Tanh(),
                                                                                     nn.Linear(8, 3))]
    with pytest.warns(UserWarning, match="runs its members in a loop: the members are not one network"):
        ensemble = DeepEnsemble(networks, vectorize=True).eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(ensemble(x), torch.stack([net.eval()(x) for net in networks]), rtol=0, atol=0)
