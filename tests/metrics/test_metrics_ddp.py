"""Under DDP (2 CPU processes, gloo) every metric equals its single-process value on the pooled data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_bayes.metrics import classification_metrics, ood_metrics, regression_metrics
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive

WORLD_SIZE = 2
RANK_ZERO_SHARE = 70  # of 111 examples: uneven shards exercise the padded gather of ``cat`` states


def problem() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(1, 111, 1, generator=generator, dtype=torch.float64) * 5
    return {
        "logits": torch.randn(3, 111, 4, generator=generator, dtype=torch.float64) * scale,
        "labels": torch.randint(0, 4, (111,), generator=generator),
        "is_ood": torch.rand(111, generator=generator) < 0.3,
        "mean": torch.randn(3, 111, 2, generator=generator, dtype=torch.float64),
        "variance": 0.1 + torch.rand(3, 111, 2, generator=generator, dtype=torch.float64),
        "targets": torch.randn(111, 2, generator=generator, dtype=torch.float64),
    }


def evaluate(data: dict[str, torch.Tensor], indices: torch.Tensor) -> dict[str, float]:
    """All metrics over ``indices``, in batches of 16."""
    collections = [
        classification_metrics("cal/").set_dtype(torch.float64),
        ood_metrics("ood/").set_dtype(torch.float64),
        regression_metrics("reg/").set_dtype(torch.float64),
    ]
    for batch in indices.split(16):
        categorical = CategoricalPredictive(data["logits"][:, batch])
        collections[0].update(categorical, data["labels"][batch])
        collections[1].update(categorical, data["is_ood"][batch])
        gaussian = GaussianPredictive(data["mean"][:, batch], data["variance"][:, batch])
        collections[2].update(gaussian, data["targets"][batch])
    return {name: value.item() for collection in collections for name, value in collection.compute().items()}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        shard = torch.arange(RANK_ZERO_SHARE) if rank == 0 else torch.arange(RANK_ZERO_SHARE, 111)
        values = evaluate(problem(), shard)
        if rank == 0:
            torch.save(values, out_file)
    finally:
        dist.destroy_process_group()


def test_two_process_values_equal_single_process_values(tmp_path: Path) -> None:
    out_file = tmp_path / "ddp_values.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD_SIZE, join=True)
    distributed = torch.load(out_file)
    single = evaluate(problem(), torch.arange(111))
    assert set(distributed) == set(single) and len(single) == 14
    half = evaluate(problem(), torch.arange(RANK_ZERO_SHARE))
    assert any(abs(half[name] - single[name]) > 1e-3 for name in single)  # a rank alone would differ
    for name, value in single.items():
        # float64 states; only the order of summation differs
        assert distributed[name] == pytest.approx(value, rel=1e-12, abs=1e-14), name
