"""Command-line types shared by the benchmark scripts: counts refused by argparse when they cannot be right."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An int >= 1 (steps, repeats, batches, threads, sizes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0 (untimed warm-up steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0; got {text}")
    return value
