"""`lightning-bayes fit --model.help SSVI` shows a description of every argument.

LightningCLI (jsonargparse) reads each argument's help from the Google-style ``Args:`` section of the class
docstring (or of the base class it forwards the argument to). A docstring it cannot parse (a continuation line
not indented, ``a, b: ...`` for two arguments) leaves every argument of that class without help, silently.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest
from jsonargparse import ArgumentParser
from torchmetrics import Metric

PACKAGES = ["modules", "callbacks", "datamodules", "models", "optim", "metrics"]


def _public_classes() -> list[type]:
    """What the CLI builds: every class the packages export, and the likelihoods ``--model.likelihood`` takes."""
    names = [(f"lightning_bayes.{package}", name) for package in PACKAGES
             for name in importlib.import_module(f"lightning_bayes.{package}").__all__]  # fmt: skip
    names += [("lightning_bayes.inference.likelihoods", "CategoricalLikelihood"),
              ("lightning_bayes.inference.likelihoods", "GaussianLikelihood")]  # fmt: skip
    classes: list[type] = []
    for module, name in names:
        value = getattr(importlib.import_module(module), name)
        if inspect.isclass(value) and value not in classes:
            classes.append(value)
    return classes


def _help_by_argument(cls: type) -> dict[str, str]:
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x", fail_untyped=False)
    helps = {}
    for action in parser._actions:
        name = action.dest.removeprefix("x.")
        if action.dest.startswith("x.") and "." not in name:
            text = (action.help or "").strip()
            helps[name] = "" if text.startswith(("(type", "(required")) else text  # only the type line
    return helps


class _BareMetric(Metric):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def update(self) -> None: ...

    def compute(self) -> None: ...


METRIC_OPTIONS = set(_help_by_argument(_BareMetric))  # torchmetrics' own options, documented by torchmetrics


@pytest.mark.parametrize("cls", _public_classes(), ids=lambda cls: cls.__name__)
def test_every_argument_has_help(cls: type) -> None:
    helps = _help_by_argument(cls)
    undocumented = sorted(name for name, text in helps.items() if not text and name not in METRIC_OPTIONS)
    assert not undocumented, f"{cls.__name__} has no help for {undocumented} (see its docstring's Args section)"


def test_the_check_sees_a_docstring_it_cannot_parse() -> None:
    """The failure this file guards against: one unindented continuation line hides every argument's help."""

    class Broken:
        """A layer.

        Args:
            width: the layer width.
            Others: as in the base class, and this
            line is not indented.
        """

        def __init__(self, width: int = 1) -> None:
            self.width = width

    class Fixed:
        """A layer.

        Args:
            width: the layer width.
        """

        def __init__(self, width: int = 1) -> None:
            self.width = width

    assert _help_by_argument(Broken) == {"width": ""}
    assert _help_by_argument(Fixed)["width"].startswith("the layer width.")
