"""A class that needs an extra not installed says which extra installs it."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_bayes.cli_parser import refused_argument_hints
from lightning_bayes.extras import needs_extra


def test_a_missing_package_of_the_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # what an install without timm meets on import
    message = r"^No module named 'timm': it comes with lightning-bayes' 'vision' extra, pip install 'lightning-bayes"
    with pytest.raises(ModuleNotFoundError, match=message) as raised, needs_extra("vision"):
        import timm  # noqa: F401
    assert raised.value.name == "timm"


def test_a_missing_module_of_another_package_is_raised_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModuleNotFoundError, match=r"^import of timm halted"), needs_extra("llm"):  # not llm's
        import timm  # noqa: F401
    unknown = r"^extra must be one of \['llm', 'vision'\]; got 'vison'$"
    with pytest.raises(ValueError, match=unknown), needs_extra("vison"):
        pass


def test_the_command_line_ends_with_the_extra_to_install(tmp_path: Path) -> None:
    """The vision config's TimmImageModel without timm: jsonargparse's union message carries the error, and its last
    line is the install command."""
    program = "import sys; sys.modules['timm'] = None; from lightning_bayes.cli import main; main()"
    command = [sys.executable, "-c", program, "fit", "--config", "vision/map_efficientnet"]
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.rstrip().splitlines()[-1] == "timm is not installed: pip install 'lightning-bayes[vision]'"
    assert not list(tmp_path.iterdir())


def test_the_hint_is_given_once_however_often_the_unions_repeat_it() -> None:
    line = ("No module named 'transformers': it comes with lightning-bayes' 'llm' extra, "
            "pip install 'lightning-bayes[llm]'")
    assert refused_argument_hints(f"- {line}\n  - {line}\n") == [
        "transformers is not installed: pip install 'lightning-bayes[llm]'"
    ]


def test_every_package_an_extra_names_is_in_that_extra_of_pyproject() -> None:
    """``extras.EXTRAS`` repeats pyproject's extras by hand: a package moved from one to another there would send a
    user to the wrong extra."""
    import re
    import tomllib

    from cli_helpers import ROOT
    from lightning_bayes.extras import EXTRAS

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        names = {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in declared[extra]}
        assert set(packages) <= names, (extra, set(packages) - names)
