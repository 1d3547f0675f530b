"""The YAML configs of the repository's ``configs/`` folder, shipped inside the package.

The wheel holds them as ``lightning_bayes/configs/`` (``setup.py`` maps the folder), so a user who only ran
``pip install lightning-bayes`` can still run ``lightning-bayes fit --config mnist/map`` from any folder;
``lightning-bayes configs`` lists them. A ``--config`` value that names a file keeps naming that file.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

_CONFIG_FLAGS = ("-c", "--config")


def bundled_configs_root() -> Path:
    """``lightning_bayes/configs`` in an installed wheel, else the ``configs/`` folder of a source checkout (an
    editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def bundled_configs() -> dict[str, Path]:
    """Every shipped config by name: its path under the configs folder without ``.yaml`` (``mnist/map``)."""
    root = bundled_configs_root()
    return {path.relative_to(root).with_suffix("").as_posix(): path for path in sorted(root.rglob("*.yaml"))}


def describe_bundled_configs() -> str:
    """One line per shipped config: its name and the first sentence of its leading comment (which may wrap over
    several comment lines, up to a command line)."""
    configs = bundled_configs()
    width = max(map(len, configs), default=0)
    return "\n".join(f"{name.ljust(width)}  {_summary(path.read_text())}".rstrip() for name, path in configs.items())


def _summary(text: str, width: int = 120) -> str:
    """The first sentence of the comment that opens ``text`` (a full stop before a capital letter or the end); one
    longer than ``width`` characters up to its first clause (``: `` or ``; `` outside parentheses, from 40
    characters on), else up to a word, with an ellipsis."""
    prose = []
    for line in text.splitlines():
        words = line.removeprefix("#").strip()
        if not line.startswith("#") or not words or line.startswith("#  ") or words.startswith("lightning-bayes"):
            break
        prose.append(words)
    joined = " ".join(prose)
    end = re.search(r"\.(?=\s+[A-Z(]|$)", joined)
    sentence = joined[: end.end()] if end else joined
    if len(sentence) <= width:
        return sentence
    depth = 0
    for index, char in enumerate(sentence[:width]):
        depth += (char == "(") - (char == ")")
        if depth == 0 and index >= 40 and sentence[index : index + 2] in (": ", "; "):
            return sentence[:index]
    return sentence[: sentence.rfind(" ", 0, width)].rstrip(",;:") + "…"


def prerequisite_command(run_name: str) -> str | None:
    """The command that makes the run folder ``runs/<run_name>`` a shipped config reads (a post-hoc method's MAP, a
    curve's second endpoint): the shipped config that logs under that name, else a ``lightning-bayes fit`` line of a
    config's leading comment that names it (``--trainer.logger.init_args.name digits_map_seed1``); ``None``."""
    commands = []
    for name, path in bundled_configs().items():
        text = path.read_text()
        logger = (yaml.safe_load(text) or {}).get("trainer", {}).get("logger") or {}
        if isinstance(logger, dict) and (logger.get("init_args") or {}).get("name") == run_name:
            return f"lightning-bayes fit --config {name}"
        comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
        flag = re.compile(rf"--trainer\.logger\.init_args\.name {re.escape(run_name)}(?=\s|$)")
        for command in comment.replace(" \\ ", " ").split("lightning-bayes fit")[1:]:  # continuation lines joined
            found = flag.search(command)
            if found is not None:
                commands.append("lightning-bayes fit" + command[: found.end()])
    if not commands:
        return None
    return re.sub(r"--config configs/(\S+)\.yaml", r"--config \1", commands[0])  # the shipped config's name


def resolve_config(value: str) -> str:
    """``value`` of a ``--config`` argument as the parser should read it: an existing file or inline YAML as given,
    else the shipped config it names (``quickstart``, ``mnist/map``, ``mnist/map.yaml``,
    ``configs/mnist/map.yaml``). Raises ``FileNotFoundError`` naming the value and the closest shipped names."""
    if Path(value).expanduser().exists() or _is_inline_yaml(value):
        return value
    configs = bundled_configs()
    name = value.removeprefix("./").removeprefix("configs/").removesuffix(".yaml").removesuffix(".yml")
    if name in configs:
        return str(configs[name])
    same_file = [config for config in configs if config.rpartition("/")[2] == name]  # "map": digits/map, mnist/map
    close = same_file or difflib.get_close_matches(name, list(configs), n=3)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise FileNotFoundError(
        f"--config {value!r}: no such file, and no config of that name ships with lightning_bayes{hint} "
        "(`lightning-bayes configs` lists them)"
    )


def with_bundled_configs(args: list[str]) -> list[str]:
    """A command line with every ``-c/--config`` value passed through :func:`resolve_config`."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg in _CONFIG_FLAGS and index + 1 < len(resolved):
            resolved[index + 1] = resolve_config(resolved[index + 1])
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + resolve_config(arg.removeprefix("--config="))
    return resolved


def _is_inline_yaml(value: str) -> bool:
    """jsonargparse also takes the config itself as the value (``--config '{trainer: {max_epochs: 1}}'``)."""
    try:
        parsed: Any = yaml.safe_load(value)
    except yaml.YAMLError:
        return False
    return isinstance(parsed, dict)
