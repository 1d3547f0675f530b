"""An argument a class refuses is answered with what that class accepts and the closest names (or values)."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_bayes.cli import main
from lightning_bayes.cli_parser import accepted_arguments, refused_argument_hints, unknown_option_hints


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


def test_a_value_outside_a_literal_is_answered_with_the_choices() -> None:
    message = (
        "Parser key \"model\":\n  Does not validate against any of the Union subtypes\n  Errors:\n"
        "    - Problem with given class_path 'lightning_bayes.modules.VIKING':\n        Parser key \"solver\":\n"
        "          Expected a typing.Literal['dense', 'cg']. Got value: cgg\n    - Expected a <class 'NoneType'>\n"
    )
    expected = "VIKING's solver must be one of 'dense', 'cg'; got 'cgg' (closest: 'cg')"
    assert refused_argument_hints(message) == [expected]
    far = message.replace("cgg", "lsmr")
    assert refused_argument_hints(far) == ["VIKING's solver must be one of 'dense', 'cg'; got 'lsmr'"]


def test_a_class_its_module_lacks_is_answered_with_the_closest_class_names() -> None:
    message = (
        "    - Problem with given class_path 'lightning_bayes.modules.VIKNG':\n"
        "        module 'lightning_bayes.modules' has no attribute 'VIKNG'\n"
    )
    assert refused_argument_hints(message) == [
        "lightning_bayes.modules has no class 'VIKNG'; closest: lightning_bayes.modules.VIKING"
    ]
    far = message.replace("VIKNG", "Zzzzzz")
    assert refused_argument_hints(far) == ["lightning_bayes.modules has no class 'Zzzzzz'"]
    submodule = message.replace("VIKNG", "subspace_inferenc")  # classes are suggested, not the module's submodules
    assert refused_argument_hints(submodule) == [
        "lightning_bayes.modules has no class 'subspace_inferenc'; closest: lightning_bayes.modules.SubspaceInference"
    ]
    missing = message.replace("lightning_bayes.modules", "no_such_package_xyz")  # a module that cannot be imported
    assert refused_argument_hints(missing) == []


def test_a_value_of_the_wrong_type_is_answered_with_the_type_expected() -> None:
    message = (
        "    - Problem with given class_path 'lightning_bayes.modules.ivon.IVONModule':\n"
        "        Parser key \"optimizer\":\n          Type collections.abc.Callable[...] expects a function or a "
        "callable class: Parser key \"lr\":\n            Expected a <class 'float'>. Got value: fast. Got value: "
        "Namespace(class_path='lightning_bayes.optim.IVON', init_args=Namespace(lr='fast'))\n"
        "    - Expected a <class 'NoneType'>\n"
    )
    assert refused_argument_hints(message) == ["IVONModule's optimizer.lr must be a float; got 'fast'"]
    batch = "Parser key \"batch_size\":\n  Expected a <class 'int'>. Got value: 1.5\n"
    assert refused_argument_hints(batch) == ["batch_size must be an int; got '1.5'"]  # no class around it


def test_an_unknown_option_is_answered_with_the_closest_known_ones() -> None:
    known = ["--trainer.max_epochs", "--trainer.min_epochs", "--data.batch_size"]
    message = "unrecognized arguments: --trainer.max_epocs 3 --data.batchsize=8 --zzz"
    assert unknown_option_hints(message, known) == [
        "--trainer.max_epocs is not an option; closest: --trainer.max_epochs, --trainer.min_epochs",
        "--data.batchsize is not an option; closest: --data.batch_size",
    ]
    assert unknown_option_hints("Parser key \"model\": ...", known) == []


def test_accepted_arguments_are_the_constructor_keywords() -> None:
    assert accepted_arguments("lightning_bayes.models.MLP") == ["in_features", "out_features", "hidden", "dropout",
                                                                "activation"]
    assert accepted_arguments("lightning_bayes.models.NoSuchModel") is None


@pytest.mark.parametrize(
    ("config", "override", "hint"),
    [
        ("digits/map", "--data.init_args.batch_sise=8",
         "DigitsDataModule has no argument 'batch_sise'; closest: batch_size."),
        ("digits/map", "--model.init_args.backbone.init_args.hiden=[4]",
         "MLP has no argument 'hiden'; closest: hidden."),
        ("digits/viking", "--model.init_args.solver=cgg", "VIKING's solver must be one of 'dense', 'cg'; got 'cgg'"),
        ("digits/map", "--trainer.max_epocs=3", "--trainer.max_epocs is not an option; closest: --trainer.max_epochs"),
        ("digits/map", "--model=lightning_bayes.modules.MAPP",
         "lightning_bayes.modules has no class 'MAPP'; closest: lightning_bayes.modules.MAP"),
        ("digits/map", "--model.init_args.backbone=lightning_bayes.models.LeNet",
         "lightning_bayes.models has no class 'LeNet'; closest: lightning_bayes.models.LeNet5"),
        ("digits/ivon", "--model.init_args.num_samples=abc", "IVONModule's num_samples must be an int; got 'abc'"),
        ("digits/nullspace_laplace", "--config=text/nf4",
         ("NullSpaceLaplace has no argument 'backbone.init_args.load_in_4bit'; its network argument is 'model', not "
         "'backbone' (the 4-bit overlay of a method whose network argument is 'model' is "
         "configs/text/nf4_posthoc.yaml).")),
    ],
)
def test_the_command_line_ends_with_the_hint(
    config: str, override: str, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In this process through the console script's entry point (one command line runs below as a process)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-bayes", "fit", "--config", config, override])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.rstrip().splitlines()[-1].startswith(hint)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_a_command_line_process_ends_with_the_hint(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lightning_bayes", "fit", "--config", "digits/map", "--trainer.max_epocs=3"]
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.rstrip().splitlines()[-1].startswith(
        "--trainer.max_epocs is not an option; closest: --trainer.max_epochs"
    )
    assert not list(tmp_path.iterdir())

