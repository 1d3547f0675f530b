"""The VIKING step-parts benchmark runs and its floor is the sum of the three parts an exact step runs."""

import sys

import pytest

import viking_step_parts


def test_the_benchmark_prints_every_part_against_the_map_step(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["viking_step_parts.py", "--repeats", "1", "--batch-size", "8", "--threads", "1"])
    viking_step_parts.main()
    rows = {line[:34].strip(): line[34:].split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == ["MAP step", "J_b, no graph", "J_b with its graph", "adjoint: backward through J_b",
                          "adjoint: reverse over forward", "sampled forward/backward", "VIKING step",
                          "exact step floor (the three parts)"]
    assert rows["MAP step"][1] == "1.00"
    parts = ("J_b with its graph", "adjoint: backward through J_b", "sampled forward/backward")
    floor = sum(float(rows[name][0]) for name in parts)
    assert float(rows["exact step floor (the three parts)"][0]) == pytest.approx(floor, abs=0.02)  # printed rounded
