"""Command-line options that a later ``--config`` replaces.

jsonargparse applies a command line in order, so ``test --ckpt_path best --config runs/x/version_0/config.yaml``
loses ``--ckpt_path``: the run's ``config.yaml`` holds every key (``ckpt_path: null`` among them) and scored the
untrained model. :func:`options_a_later_config_replaces` finds each option given before a config file that sets the
same key, so the command line can refuse it by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

_NOT_OPTIONS = ("--config", "--print_config", "--help", "-h")


def options_a_later_config_replaces(args: list[str]) -> list[tuple[str, str]]:
    """``(option, config)`` for every ``--key`` in ``args`` before a ``--config`` file that sets ``key`` (a dotted
    key; jsonargparse's ``--model.x`` shorthand for ``model.init_args.x`` included). Configs that are not files
    (inline YAML) and files that are not YAML mappings are passed over: the parser reports those."""
    found: list[tuple[str, str]] = []
    earlier: list[str] = []
    for index, arg in enumerate(args):
        short = arg == "-c" or arg.startswith("-c=")  # LightningCLI's short form of --config
        if not (arg.startswith("--") or short):
            continue
        key, equals, value = ("config", *arg[2:].partition("=")[1:]) if short else arg[2:].partition("=")
        if key != "config":
            if not arg.startswith(_NOT_OPTIONS):
                earlier.append(key)
            continue
        path = Path(value if equals else args[index + 1] if index + 1 < len(args) else "")
        settings = _yaml_mapping(path)
        found.extend((f"--{option}", str(path)) for option in earlier if _sets(settings, option.split(".")))
    return found


def _yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _sets(settings: Any, keys: list[str]) -> bool:
    if not keys:
        return True
    if not isinstance(settings, dict):
        return False
    head, rest = keys[0], keys[1:]
    if head in settings:
        return _sets(settings[head], rest)
    return "init_args" in settings and _sets(settings["init_args"], keys)
