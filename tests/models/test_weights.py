"""Which file a checkpoint argument names, which tensors of it are loaded, and what the errors say."""

import os
import re
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_bayes.models.weights import resolve_checkpoint_path, trained_state_dict


def test_a_pattern_takes_the_newest_match_and_says_which(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A post-hoc config's ``runs/<map>/version_*/...`` pattern: the file taken is said (a run of another config
    under that name was taken silently), as ``--ckpt_path best`` says its own."""
    older, newer = tmp_path / "version_0" / "last.ckpt", tmp_path / "version_1" / "last.ckpt"
    for path in (newer, older):  # written in this order; the modification times below decide
        path.parent.mkdir()
        path.write_bytes(b"")
    now = time.time()
    os.utime(older, (now - 60, now - 60))
    os.utime(newer, (now, now))
    with caplog.at_level("INFO"):
        assert resolve_checkpoint_path(str(tmp_path / "version_*" / "last.ckpt")) == newer
    assert f"version_*/last.ckpt': {newer} (the newest of 2)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        assert resolve_checkpoint_path(str(older)) == older
    assert caplog.text == ""


def test_a_relative_argument_that_names_nothing_says_where_it_was_looked_for(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = re.escape(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"'runs/map/version_\*/last.ckpt' matches no file \(relative to the "
                       rf"working folder {folder}\); train the model first"):
        resolve_checkpoint_path("runs/map/version_*/last.ckpt")
    with pytest.raises(FileNotFoundError, match=rf"'map.ckpt' is not a file \(relative to the working folder {folder}\)"):
        resolve_checkpoint_path("map.ckpt")
    with pytest.raises(FileNotFoundError, match=rf"^checkpoint='{folder}/map.ckpt' is not a file; train the model first$"):
        resolve_checkpoint_path(str(tmp_path / "map.ckpt"))


def _linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def test_the_shortest_whole_prefix_is_loaded_and_equal_ones_are_refused(tmp_path: Path):
    """A method's checkpoint holds its backbone once (plus deeper copies, e.g. an SWA average under a longer
    prefix): the shortest prefix wins. A deep ensemble's members are whole models under prefixes of one length:
    loading any one of them silently (set order once picked by the hash seed) is refused, naming them."""
    backbone, swa = _linear(0), _linear(1)
    single = tmp_path / "map.ckpt"
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"callback.swa.backbone.{k}": v for k, v in swa.state_dict().items()}
    torch.save({"state_dict": state}, single)
    loaded, path = trained_state_dict(_linear(2), str(single))
    assert path == single and all(torch.equal(loaded[k], v) for k, v in backbone.state_dict().items())

    ensemble = tmp_path / "ensemble.ckpt"
    members = {f"members.{m}.{k}": v for m in range(3) for k, v in _linear(m).state_dict().items()}
    torch.save({"state_dict": members}, ensemble)
    with pytest.raises(ValueError, match=r"holds 3 whole Linears, under \['members.0.', 'members.1.', 'members.2.'\] "
                       r"\(e.g. a deep ensemble's members\), so which one to load is ambiguous"):
        trained_state_dict(_linear(2), str(ensemble))
    member = tmp_path / "member.pt"  # the way out the message gives
    saved = torch.load(ensemble)["state_dict"]
    torch.save({k.removeprefix("members.1."): v for k, v in saved.items() if k.startswith("members.1.")}, member)
    loaded, _ = trained_state_dict(_linear(2), str(member))
    assert all(torch.equal(loaded[k], v) for k, v in _linear(1).state_dict().items())


def test_a_variational_posteriors_checkpoint_gives_its_means_with_a_warning(tmp_path: Path):
    """BLoB's and mean-field VI's layers keep ``<name>.mean`` and ``<name>.raw_scale``: a post-hoc method (TFB
    from the BLoB mean, as the spec allows) gets the means; a checkpoint of neither kind is still refused."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
    means = {name: torch.randn_like(t) for name, t in model.state_dict().items()}
    state = {f"backbone.{name}.mean": t for name, t in means.items()}
    state |= {f"backbone.{name}.raw_scale": torch.zeros_like(t) for name, t in means.items()}
    torch.save({"state_dict": state}, tmp_path / "blob.ckpt")
    with pytest.warns(UserWarning, match="holds a variational posterior .* Sequential gets its means"):
        loaded, _ = trained_state_dict(model, str(tmp_path / "blob.ckpt"))
    assert set(loaded) == set(means) and all(torch.equal(loaded[name], means[name]) for name in means)
    torch.save({"state_dict": {"other.weight.mean": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="is not of a Sequential: no prefix holds all of its 4 tensors"):
        trained_state_dict(model, str(tmp_path / "other.ckpt"))


def test_a_checkpoint_with_tensors_the_model_has_no_place_for_is_refused(tmp_path: Path):
    """Only the model's own tensors were looked for: a deeper network's checkpoint loaded into a shallower one, and
    a LoRA on query, key and value into one on query and value (the key adapters dropped), without a word."""
    deep = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in deep.state_dict().items()}}, tmp_path / "deep.ckpt")
    shallow = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"holds 2 tensors under 'backbone\.' that the model has no place for "
                       r"\(e\.g\. \['4\.weight', '4\.bias'\]\)"):
        trained_state_dict(shallow, str(tmp_path / "deep.ckpt"))

    from peft import LoraConfig, get_peft_model

    from lightning_bayes.models.frozen_base import exclude_frozen_base

    def attention(targets: list[str]) -> nn.Module:  # as the library's LLM wrappers: checkpoints hold the adapters
        torch.manual_seed(0)
        layers = nn.ModuleDict({"query": nn.Linear(4, 4), "key": nn.Linear(4, 4), "value": nn.Linear(4, 4)})
        owner = nn.Module()
        owner.model = get_peft_model(nn.Sequential(layers), LoraConfig(r=2, target_modules=targets))
        exclude_frozen_base(owner, "model")
        return owner

    torch.save(attention(["query", "key", "value"]).state_dict(), tmp_path / "qkv.pt")
    with pytest.raises(ValueError, match=r"has no place for .*key\.lora_A"):
        trained_state_dict(attention(["query", "value"]), str(tmp_path / "qkv.pt"))
    state, _ = trained_state_dict(attention(["query", "key", "value"]), str(tmp_path / "qkv.pt"))  # its own: fine
    assert any("key.lora_A" in name for name in state)


def test_extra_state_stored_under_a_weights_name_is_not_an_unplaced_tensor(tmp_path):
    """A 4-bit weight's ``weight.absmax`` (and ``weight.quant_state.*``) belong to the weight."""
    model = nn.Sequential(nn.Linear(2, 2))
    state = {name: value.clone() for name, value in model.state_dict().items()}
    state["0.weight.absmax"] = torch.ones(1)
    torch.save(state, tmp_path / "state.pt")
    loaded, _ = trained_state_dict(model, str(tmp_path / "state.pt"))  # no "has no place for 0.weight.absmax"
    assert torch.equal(loaded["0.weight"], model[0].weight) and torch.equal(loaded["0.bias"], model[0].bias)


def test_a_likelihood_of_another_shape_is_not_loaded():
    """A checkpoint's two-output noise for a one-output likelihood: False, and the initial noise kept (no
    ``load_state_dict`` error)."""
    from lightning_bayes.inference.likelihoods import GaussianLikelihood
    from lightning_bayes.models.weights import load_trained_likelihood

    likelihood = GaussianLikelihood(output_dim=1)
    before = {name: value.clone() for name, value in likelihood.state_dict().items()}
    other = {f"likelihood.{name}": value for name, value in GaussianLikelihood(output_dim=2).state_dict().items()}
    assert not load_trained_likelihood(likelihood, other)
    for name, value in likelihood.state_dict().items():
        assert torch.equal(value, before[name]), name
    same = {f"likelihood.{name}": value + 1 for name, value in before.items()}
    assert load_trained_likelihood(likelihood, same)


def test_a_literal_path_with_brackets_is_a_file_not_a_pattern(tmp_path: Path):
    folder = tmp_path / "run[1]"
    folder.mkdir()
    torch.save(nn.Linear(2, 2).state_dict(), folder / "model.pt")
    assert resolve_checkpoint_path(str(folder / "model.pt")) == folder / "model.pt"


def test_a_prefix_ends_at_a_dot(tmp_path: Path):
    """``backbone.10.weight`` ends with ``0.weight`` but is not ``0.weight`` under ``backbone.1``: that checkpoint is
    of another network (its eleventh layer), not of a one-layer one."""
    deep = nn.Sequential(*[nn.Identity() for _ in range(10)], nn.Linear(3, 2))
    torch.save({f"backbone.{k}": v for k, v in deep.state_dict().items()}, tmp_path / "deep.pt")
    with pytest.raises(ValueError, match=r"is not of a Sequential: no prefix holds all of its 2 tensors"):
        trained_state_dict(nn.Sequential(nn.Linear(3, 2)), str(tmp_path / "deep.pt"))


def test_a_file_that_is_not_a_checkpoint_names_the_argument_as_the_cli_does(tmp_path: Path):
    """A YAML or an empty file raised torch.load's UnpicklingError or EOFError, naming no argument; the check is
    --ckpt_path's (one function)."""
    (tmp_path / "config.yaml").write_text("model:\n  class_path: MAP\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    for name, reason in (("config.yaml", r"torch.load found no checkpoint in it"),
                         ("empty.ckpt", r"torch.load: EOFError"), ("list.pt", r"it holds list")):
        expected = rf"^checkpoint='{re.escape(str(tmp_path / name))}' is not a Lightning checkpoint or state dict \("
        with pytest.raises(ValueError, match=expected + reason):
            trained_state_dict(nn.Linear(3, 2), str(tmp_path / name))
    source = _linear(0)  # hyperparameters holding a class: loaded as before, without weights_only
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": {"optimizer": torch.optim.Adam}},
               tmp_path / "python.ckpt")
    state, _ = trained_state_dict(nn.Linear(3, 2), str(tmp_path / "python.ckpt"))
    torch.testing.assert_close(state["weight"], source.weight.detach())
