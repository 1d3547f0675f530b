"""PicklableGenerator: copies continue the parent's stream, also in a process started by ``spawn`` (how
``ddp_spawn`` sends modules and callbacks; a plain ``torch.Generator`` fails there with 'unable to resize file')."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lightning_bayes.generator import PicklableGenerator


def draw_into(index: int, generator: torch.Generator, path: Path) -> None:
    torch.save(torch.randn(4, generator=generator), path)


def test_copies_continue_the_same_stream() -> None:
    generator = PicklableGenerator().manual_seed(3)
    torch.randn(7, generator=generator)  # away from the seed's start
    for duplicate in (pickle.loads(pickle.dumps(generator)), copy.deepcopy(generator)):
        assert isinstance(duplicate, PicklableGenerator)
        assert torch.equal(duplicate.get_state(), generator.get_state())
    expected = torch.randn(4, generator=copy.deepcopy(generator))
    assert torch.equal(expected, torch.randn(4, generator=torch.Generator().set_state(generator.get_state())))


def test_a_spawned_process_draws_what_the_parent_would(tmp_path: Path) -> None:
    generator = PicklableGenerator().manual_seed(5)
    torch.randn(3, generator=generator)
    mp.start_processes(draw_into, args=(generator, tmp_path / "child.pt"), nprocs=1, start_method="spawn")
    assert torch.equal(torch.load(tmp_path / "child.pt"), torch.randn(4, generator=generator))
