"""The optional dependencies, named by the ``pyproject.toml`` extra that installs them.

``with needs_extra("vision"): import timm`` turns the bare ``No module named 'timm'`` of an install without that extra
into an error that says what to install (``pip install 'lightning-bayes[vision]'``). Only the packages of that extra
are translated: a missing module of another package (a broken install of the extra itself) is raised as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

EXTRAS = {
    "vision": ("timm", "torchvision"),
    "llm": ("transformers", "peft", "bitsandbytes", "gguf", "safetensors"),
}


@contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """Imports inside need the packages of ``extra`` (a key of :data:`EXTRAS`)."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}; got {extra!r}")
    try:
        yield
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if top not in EXTRAS[extra]:
            raise
        raise ModuleNotFoundError(
            f"No module named {top!r}: it comes with lightning-bayes' {extra!r} extra, "
            f"pip install 'lightning-bayes[{extra}]'",
            name=error.name,
        ) from error
