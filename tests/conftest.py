"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def smollm2_folder() -> str:
    """The packaged SmolLM2-135M-Instruct as a plain transformers folder, converted from GGUF on first
    use (about 20 s, once per machine: later sessions find it in ``$LIGHTNING_BAYES_HOME/models``)."""
    from lightning_bayes.models import resolve_pretrained

    return resolve_pretrained("smollm2")
