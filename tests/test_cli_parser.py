"""An argument a class refuses is answered with what that class accepts and the closest names."""

import subprocess
import sys

import pytest

from lightning_bayes.cli_parser import accepted_arguments, refused_argument_hints


def test_hints_name_the_class_its_arguments_and_the_closest() -> None:
    message = (
        "Parser key \"data\":\n  Does not validate against any of the Union subtypes\n  Errors:\n"
        "    - Problem with given class_path 'lightning_bayes.datamodules.DigitsDataModule':\n"
        "        Option 'val_size' is not accepted\n"
        "    - Problem with given class_path 'lightning_bayes.models.MLP':\n        Option 'hiden' is not accepted\n"
        "    - Problem with given class_path 'no.such.Class':\n        Option 'x' is not accepted\n"
    )
    digits, mlp = refused_argument_hints(message)  # nothing for a class that cannot be imported
    assert digits.startswith("DigitsDataModule has no argument 'val_size'; closest: batch_size, val_fraction.")
    accepted = accepted_arguments("lightning_bayes.datamodules.DigitsDataModule")
    assert digits.endswith("It accepts: " + ", ".join(accepted))
    assert mlp.startswith("MLP has no argument 'hiden'; closest: hidden.")
    assert refused_argument_hints("error: something else") == []


def test_accepted_arguments_are_the_constructor_keywords() -> None:
    assert accepted_arguments("lightning_bayes.models.MLP") == ["in_features", "out_features", "hidden", "dropout",
                                                                "activation"]
    assert accepted_arguments("lightning_bayes.models.NoSuchModel") is None


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("--data.init_args.batch_sise=8", "DigitsDataModule has no argument 'batch_sise'; closest: batch_size."),
        ("--model.init_args.backbone.init_args.hiden=[4]", "MLP has no argument 'hiden'; closest: hidden."),
    ],
)
def test_the_command_line_ends_with_the_hint(override: str, hint: str, tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_bayes", "fit", "--config", "digits/map", override]
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.rstrip().splitlines()[-1].startswith(hint)
    assert not list(tmp_path.iterdir())  # nothing was written

