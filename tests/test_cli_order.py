"""Options given before a ``--config`` that sets them too: found by key (shorthand included) and refused by the
command line before anything runs (``test --ckpt_path best --config <run>/config.yaml`` scored the untrained model:
the run's ``config.yaml`` holds ``ckpt_path: null``)."""

from pathlib import Path

import pytest
import yaml

from lightning_bayes.cli import run
from lightning_bayes.cli_order import options_a_later_config_replaces

SETTINGS = {
    "ckpt_path": None,
    "trainer": {"max_epochs": 3},
    "model": {"class_path": "lightning_bayes.modules.MAP", "init_args": {"num_samples": 5}},
}


def test_each_option_a_later_config_sets_is_found_and_none_other(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    args = ["test", "--ckpt_path", "best", "--trainer.max_epochs=4", "--model.num_samples", "9",
            "--model.init_args.num_samples=9", "--trainer.max_steps", "5", "--seed_everything", "1",
            "--config", str(config), "--trainer.devices", "1"]  # fmt: skip
    found = options_a_later_config_replaces(args)
    assert found == [(f"--{key}", str(config)) for key in
                     ("ckpt_path", "trainer.max_epochs", "model.num_samples", "model.init_args.num_samples")]
    assert options_a_later_config_replaces(["test", f"--config={config}", "--ckpt_path", "best"]) == []
    for short in (["-c", str(config)], [f"-c={config}"]):  # LightningCLI's short form
        assert options_a_later_config_replaces(["fit", "--trainer.max_epochs", "2", *short]) == [
            ("--trainer.max_epochs", str(config))
        ]
    inline = ["test", "--ckpt_path", "best", "--config", "{ckpt_path: null}"]  # not a file: the parser's to read
    assert options_a_later_config_replaces(inline) == []


def test_the_command_line_refuses_an_option_its_later_config_replaces_before_running(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    with pytest.raises(ValueError, match=rf"^--ckpt_path comes before --config {config}, which sets it too and so "
                       r"replaces it \(the command line applies in order\): give it after --config$"):
        run(["test", "--ckpt_path", "best", "--config", str(config)])
    assert list(tmp_path.iterdir()) == [config]
