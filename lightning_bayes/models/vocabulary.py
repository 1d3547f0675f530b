"""A tokenizer's identity for checking that a datamodule tokenizes for the network it feeds: a hash of its vocabulary
(token -> id), the same for the same tokenizer loaded from a hub id or a local copy."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..extras import needs_extra

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """A hash of ``tokenizer.get_vocab()`` (added tokens included)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(repr(items).encode(), digest_size=16).hexdigest()


def folder_vocabulary(folder: str) -> str | None:
    """The fingerprint of the tokenizer saved with a model (a local folder or a hub id); ``None`` for a local folder
    without tokenizer files (``save_pretrained`` of the model alone), where transformers would build a stub of
    special tokens: nothing to check the datamodule's tokenizer against."""
    local = Path(folder).expanduser()
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        return None
    with needs_extra("llm"):
        from transformers import AutoTokenizer

    return vocabulary_fingerprint(AutoTokenizer.from_pretrained(folder))
