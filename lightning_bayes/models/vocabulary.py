"""A tokenizer's identity for checking that a datamodule tokenizes for the network it feeds: a hash of its vocabulary
(token -> id), the same for the same tokenizer loaded from a hub id or a local copy."""

from __future__ import annotations

import hashlib
from typing import Any


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """A hash of ``tokenizer.get_vocab()`` (added tokens included)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(repr(items).encode(), digest_size=16).hexdigest()
