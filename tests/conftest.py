"""Shared fixtures."""

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test body starts from one global random state, whatever ran before it: a test drawing from the global
    generators without its own seed sees the same numbers alone, in a subset or in the whole suite (a refusal
    message printed -1 for -0.9998 one run in three). Draws at import or in wider-scoped fixtures are not covered."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_folder() -> str:
    """The packaged SmolLM2-135M-Instruct as a plain transformers folder, converted from GGUF on first
    use (about 20 s, once per machine: later sessions find it in ``$LIGHTNING_BAYES_HOME/models``)."""
    from lightning_bayes.models import resolve_pretrained

    return resolve_pretrained("smollm2")


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for tests of tiny tensors, where thread hand-offs dominate on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's compiled code cleared before and after: a test of a compiled path compiles it itself, and never runs
    eagerly because earlier tests used up the recompile limit of a shared function."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
