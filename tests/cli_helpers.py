"""Running the real CLI quickly from tests."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_args(config: Path, save_dir: Path, batches: int = 2) -> list[str]:
    """CLI overrides that run ``config`` for a few batches and log under ``save_dir``."""
    return [
        "fit",
        "--config",
        str(config),
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={batches}",
        f"--trainer.limit_val_batches={batches}",
        f"--trainer.limit_test_batches={batches}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]
