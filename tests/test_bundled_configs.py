"""The configs ship inside the wheel and ``--config`` finds them by name from any folder."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cli_helpers import ROOT

from lightning_bayes import cli
from lightning_bayes.bundled_configs import (
    bundled_configs, describe_bundled_configs, prerequisite_command, resolve_config, with_bundled_configs,
)

REPOSITORY_CONFIGS = sorted(path.relative_to(ROOT / "configs").as_posix() for path in (ROOT / "configs").rglob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip`` builds from a copy of this checkout's sources (setuptools from the environment: no index
    needed; the copy keeps the build's ``build/`` and ``*.egg-info`` out of the checkout)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source)
    for name in ("lightning_bayes", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)]
    subprocess.run(command, check=True, capture_output=True, cwd=out)
    (built,) = out.glob("lightning_bayes-*.whl")
    return built


def test_the_wheel_ships_every_config_of_the_repository_and_no_tests(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(name.removeprefix("lightning_bayes/configs/") for name in names if name.endswith(".yaml"))
    assert shipped == REPOSITORY_CONFIGS
    assert all(name.startswith(("lightning_bayes/", "lightning_bayes-")) for name in names)
    assert "lightning_bayes/bundled_configs.py" in names
    assert "lightning_bayes/py.typed" in names  # type checkers read the package's annotations (PEP 561)
    (licence,) = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
    assert zipfile.ZipFile(wheel).read(licence) == (ROOT / "LICENSE").read_bytes()


def test_an_installed_wheel_resolves_config_names_to_its_own_files(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    script = "from lightning_bayes.bundled_configs import resolve_config; print(resolve_config('mnist/map'))"
    found = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=tmp_path,
                           env={"PYTHONPATH": str(target), "PATH": ""})
    resolved = Path(found.stdout.strip())
    assert resolved == target / "lightning_bayes" / "configs" / "mnist" / "map.yaml"
    assert resolved.read_text() == (ROOT / "configs" / "mnist" / "map.yaml").read_text()


def test_a_source_checkout_names_its_configs_folder():
    assert sorted(path.relative_to(ROOT / "configs").as_posix() for path in bundled_configs().values()) == REPOSITORY_CONFIGS
    assert bundled_configs()["mnist/map"] == ROOT / "configs" / "mnist" / "map.yaml"


@pytest.mark.parametrize("value", ["mnist/map", "mnist/map.yaml", "configs/mnist/map.yaml", "./configs/mnist/map.yaml"])
def test_a_config_name_resolves_from_any_folder(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(value) == str(ROOT / "configs" / "mnist" / "map.yaml")


def test_a_file_or_inline_yaml_is_kept_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "map").write_text("trainer: {max_epochs: 1}\n")
    assert resolve_config("mnist/map") == "mnist/map"  # the user's own file wins over the shipped one
    assert resolve_config("{trainer: {max_epochs: 1}}") == "{trainer: {max_epochs: 1}}"
    assert resolve_config("trainer:\n  max_epochs: 1") == "trainer:\n  max_epochs: 1"


def test_an_unknown_config_names_the_value_and_the_closest_shipped_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--config 'mnist/mapp': no such file.*closest: mnist/map"):
        resolve_config("mnist/mapp")
    with pytest.raises(FileNotFoundError, match=r"--config 'map': no such file.*closest: digits/map, mnist/map \("):
        resolve_config("map")  # a file name without its folder: the configs of that name


def test_every_config_flag_of_a_command_line_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", "text/map_lora_smollm2", "--config=text/nf4", "--config", "{seed_everything: 1}",
            "--trainer.max_epochs=1"]
    text = ROOT / "configs" / "text"
    assert with_bundled_configs(args) == [
        "fit", "-c", str(text / "map_lora_smollm2.yaml"), f"--config={text / 'nf4.yaml'}", "--config",
        "{seed_everything: 1}", "--trainer.max_epochs=1",
    ]


def test_the_cli_builds_a_shipped_config_by_name_outside_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    built = cli.run(["--config", "digits/map", "--trainer.logger.init_args.save_dir", str(tmp_path)], subcommand=False)
    assert type(built.model).__name__ == "MAP"
    assert type(built.datamodule).__name__ == "DigitsDataModule"
    assert built.config.trainer.max_epochs == 60


def test_the_configs_command_lists_every_config_with_its_summary(monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-bayes", "configs"])
    cli.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [name.removesuffix(".yaml") for name in REPOSITORY_CONFIGS]
    assert "MAP baseline: LeNet-5 on full MNIST" in lines[REPOSITORY_CONFIGS.index("mnist/map.yaml")]
    assert describe_bundled_configs().splitlines() == lines
    # a summary is a sentence or its first clause, not a comment's first line cut mid-sentence ("... trained from")
    summaries = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert summaries["digits/curve"] == "Mode connectivity (Garipov et al. 2018) on 8x8 digits"
    assert summaries["mnist/map"].endswith("Fashion-MNIST as OOD.")
    assert summaries["text/nf4"].endswith("(MAP, BLoB, IVON-LoRA…")
    assert all(len(summary) <= 121 and not summary.endswith((" then", " from")) for summary in summaries.values())


def test_the_configs_command_has_help_and_refuses_arguments(monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-bayes", "configs", "--help"])
    cli.main()
    printed = capsys.readouterr().out
    assert printed.startswith("usage: lightning-bayes configs\n")
    assert printed.endswith(describe_bundled_configs() + "\n")
    monkeypatch.setattr(sys, "argv", ["lightning-bayes", "configs", "mnist"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "lightning-bayes: error: `configs` takes no arguments; got mnist\n"


def test_python_dash_m_runs_the_same_command(tmp_path: Path):
    listed = subprocess.run([sys.executable, "-m", "lightning_bayes", "configs"], check=True, capture_output=True,
                            text=True, cwd=tmp_path)
    assert listed.stdout.strip() == describe_bundled_configs()


@pytest.mark.parametrize(("run_name", "command"), [
    ("digits_map", "lightning-bayes fit --config digits/map"),
    ("digits_map_seed1",  # from curve.yaml's comment
     "lightning-bayes fit --config digits/map --seed_everything 1 --trainer.logger.init_args.name digits_map_seed1"),
    ("text_map_lora_smollm2_seed1",  # a comment's command continued on the next line
     ("lightning-bayes fit --config text/map_lora_smollm2 --seed_everything 1 "
      "--trainer.logger.init_args.name text_map_lora_smollm2_seed1")),
    ("no_such_run", None),
])
def test_the_command_that_makes_a_run_a_shipped_config_reads(run_name: str, command: str | None):
    assert prerequisite_command(run_name) == command


def test_a_post_hoc_config_without_its_map_run_names_the_command_that_trains_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^checkpoint='runs/digits_map/version_\*/checkpoints/best\.ckpt' "
                       r"matches no file .*; train the model first; the shipped config that writes it: "
                       r"lightning-bayes fit --config digits/map$"):
        cli.run(["fit", "--config", "digits/nullspace_laplace"])


def test_testing_a_fitted_post_hoc_run_without_its_map_names_the_flag_that_does_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``test --ckpt_path`` of a fitted run holds the weights: the MAP run need not be trained again."""
    monkeypatch.chdir(tmp_path)
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {}}, tmp_path / "last.ckpt")  # passes the checks
    with pytest.raises(FileNotFoundError, match=r"matches no file .*; train the model first; or, as --ckpt_path holds "
                       r"the fitted weights, add --model.init_args.checkpoint null$"):
        cli.run(["test", "--config", "digits/nullspace_laplace", "--ckpt_path", str(tmp_path / "last.ckpt")])


def test_python_dash_m_names_itself_in_its_usage(tmp_path: Path):
    shown = subprocess.run([sys.executable, "-m", "lightning_bayes", "fit", "--help"], check=True, capture_output=True,
                           text=True, cwd=tmp_path)
    assert shown.stdout.startswith("usage: python -m lightning_bayes [options] fit")


def test_a_reader_that_leaves_the_configs_list_early_gets_no_traceback(tmp_path: Path):
    """``lightning-bayes configs | head``: the reader gone before the list is written (here: a pipe whose reading end
    is closed), Python's advice: exit 1 without a BrokenPipeError traceback."""
    reading, writing = os.pipe()
    os.close(reading)
    try:
        command = [sys.executable, "-m", "lightning_bayes", "configs"]
        piped = subprocess.run(command, stdout=writing, stderr=subprocess.PIPE, text=True, cwd=tmp_path, check=False)
    finally:
        os.close(writing)
    assert (piped.returncode, piped.stderr) == (1, "")


def test_the_console_script_refuses_an_unknown_config_as_a_parser_error(monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-bayes", "fit", "--config", "quickstrat"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert "--config 'quickstrat': no such file" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"]])
def test_the_help_points_at_the_shipped_configs(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-bayes", *args])
    with pytest.raises(SystemExit):
        cli.main()
    help_text = " ".join(capsys.readouterr().out.split())
    assert "or the name of a config shipped with lightning_bayes" in help_text
    assert "`lightning-bayes configs` lists them" in help_text
