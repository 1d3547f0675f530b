"""The command line's parser: Lightning's, with the accepted arguments named when a class refuses one.

jsonargparse reports an unknown argument of a ``class_path`` class (``--data.init_args.val_size``, a misspelt key in
a config's ``init_args``) as one line, ``Problem with given class_path 'X': Option 'val_size' is not accepted``,
inside a union-validation message that follows the whole usage text; a value outside a ``Literal``
(``--model.init_args.solver cgg``) likewise. :class:`BayesArgumentParser` adds, for each such line, what ``X``
accepts and the closest accepted names (or values), so the fix is on the last lines printed; a class path naming no
class of its module (``--model lightning_bayes.modules.MAPP``) gets the module's closest class names, a value of the
wrong type (``--model.init_args.num_samples abc``) the type expected, and a class that needs an extra not installed
(timm's, without ``lightning-bayes[vision]``) the command that installs it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

_REFUSED = re.compile(r"Problem with given class_path '(?P<path>[\w.]+)':\s*Option '(?P<key>[^']+)' is not accepted")
_NOT_A_CHOICE = re.compile(
    r"Problem with given class_path '(?P<path>[\w.]+)':\s*Parser key \"(?P<key>[^\"]+)\":\s*"
    r"Expected a typing\.Literal\[(?P<choices>[^\]]*)\]\. Got value: (?P<value>\S+)"
)


_NO_SUCH_CLASS = re.compile(
    r"Problem with given class_path '(?P<path>[\w.]+)':\s*module '(?P<module>[\w.]+)' has no attribute '(?P<name>\w+)'"
)


_WRONG_TYPE = re.compile(
    r"Parser key \"(?P<key>[^\"]+)\":\s*Expected a <class '(?P<type>\w+)'>\. "
    r"Got value: (?P<value>.+?)(?:\. Got value:|\n|$)"
)
_CLASS_PATH = re.compile(r"Problem with given class_path '(?P<path>[\w.]+)'")
_OUTER_KEY = re.compile(r"Parser key \"([^\"]+)\":")
_ARTICLES = {"int": "an int", "float": "a float", "bool": "a bool", "str": "a str"}
_MISSING_EXTRA = re.compile(r"No module named '(?P<module>\w+)': it comes with lightning-bayes' '(?P<extra>\w+)' extra")


def imported_class(class_path: str) -> Any:
    """The class (or any object) a dotted ``class_path`` names; ``None`` when it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def accepted_arguments(class_path: str) -> list[str] | None:
    """The keyword arguments ``class_path``'s constructor names (``None`` when it cannot be imported)."""
    cls = imported_class(class_path)
    if cls is None:
        return None
    parameters = inspect.signature(cls).parameters.values()
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def refused_argument_hints(message: str) -> list[str]:
    """One line per refused argument in a jsonargparse ``message``: the class's accepted arguments, the closest."""
    hints = []
    for match in _REFUSED.finditer(message):
        path, key = match["path"], match["key"]
        accepted = accepted_arguments(path)
        if accepted is None:
            continue
        closest = difflib.get_close_matches(key.rpartition(".")[2], accepted, n=3, cutoff=0.5)
        suggestion = f"; closest: {', '.join(closest)}" if closest else ""
        head = key.partition(".")[0]
        network = {"backbone": "model", "model": "backbone"}.get(head)
        if head not in accepted and network in accepted:  # an overlay or flag written for the other kind of method
            suggestion = f"; its network argument is {network!r}, not {head!r}" + (
                " (the 4-bit overlay of a method whose network argument is 'model' is configs/text/nf4_posthoc.yaml)"
                if network == "model" and "4bit" in key else ""
            )
        name = path.rpartition(".")[2]
        hints.append(f"{name} has no argument {key!r}{suggestion}. It accepts: {', '.join(accepted)}")
    for match in _NO_SUCH_CLASS.finditer(message):
        module, name = match["module"], match["name"]
        try:
            names = [n for n in dir(importlib.import_module(module)) if n[:1].isupper()]
        except ImportError:
            continue
        closest = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        suggestion = f"; closest: {', '.join(f'{module}.{c}' for c in closest)}" if closest else ""
        hints.append(f"{module} has no class {name!r}{suggestion}")
    for match in _NOT_A_CHOICE.finditer(message):
        name, key, choices, value = match["path"].rpartition(".")[2], match["key"], match["choices"], match["value"]
        closest = difflib.get_close_matches(repr(value), [c.strip() for c in choices.split(",")], n=1, cutoff=0.5)
        suggestion = f" (closest: {closest[0]})" if closest else ""
        hints.append(f"{name}'s {key} must be one of {choices}; got {value!r}{suggestion}")
    for match in _WRONG_TYPE.finditer(message):
        owners = list(_CLASS_PATH.finditer(message, 0, match.start()))
        start = owners[-1].end() if owners else 0  # the keys between the class and the value: optimizer.lr
        key = ".".join([*_OUTER_KEY.findall(message, start, match.start()), match["key"]])
        name = f"{owners[-1]['path'].rpartition('.')[2]}'s {key}" if owners else key
        expected = _ARTICLES.get(match["type"], f"a {match['type']}")
        hints.append(f"{name} must be {expected}; got {match['value']!r}")
    for module, extra in dict.fromkeys(_MISSING_EXTRA.findall(message)):  # once each, where unions repeat it
        hints.append(f"{module} is not installed: pip install 'lightning-bayes[{extra}]'")
    return hints


_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<arguments>.*)", re.IGNORECASE)


def unknown_option_hints(message: str, known: list[str]) -> list[str]:
    """One line per ``--option`` an "unrecognized arguments" ``message`` names: the closest ``known`` options."""
    match = _UNRECOGNIZED.search(message)
    if match is None:
        return []
    hints = []
    for token in match["arguments"].split():
        option = token.partition("=")[0]
        closest = difflib.get_close_matches(option, known, n=3, cutoff=0.8) if option.startswith("--") else []
        if closest:
            hints.append(f"{option} is not an option; closest: {', '.join(closest)}")
    return hints


class BayesArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors end with the accepted arguments of a class that refused one, or the
    closest options to one it does not know (``--trainer.max_epocs``)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hints = refused_argument_hints(message) + unknown_option_hints(message, list(self._option_string_actions))
        super().error("\n".join([message, *hints]) if hints else message, ex)
