"""The README's Python blocks run as printed (a user's first copy and paste), on packaged data, with the Trainer
limited to a few batches; what their comments promise is checked."""

import re
import shlex
import sys
from pathlib import Path

import lightning
import pytest
import torch

from cli_helpers import ROOT

from lightning_bayes import cli

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
# what a fresh checkout lacks stands for what the commands before it write
SAVED_BY_AN_EARLIER_RUN = {"runs/digits_map/version_0/config.yaml": "configs/digits/map.yaml"}


def readme_commands() -> list[list[str]]:
    """Every ``lightning-bayes ...`` line of the README's shell blocks (continuations joined, comments and output
    redirection dropped) as the arguments after the program name."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "lightning-bayes" in words:
                arguments = words[words.index("lightning-bayes") + 1 :]
                arguments = arguments[: arguments.index(">")] if ">" in arguments else arguments
                commands.append([SAVED_BY_AN_EARLIER_RUN.get(word, word) for word in arguments])
    return commands


COMMANDS = readme_commands()


class FewBatchesTrainer(lightning.Trainer):
    """The README's ``L.Trainer(...)`` with its own arguments, on 2 batches per loop and 1 epoch."""

    def __init__(self, **kwargs) -> None:
        kwargs.update(max_epochs=1, limit_train_batches=2, limit_val_batches=2, limit_test_batches=2)
        super().__init__(enable_progress_bar=False, **kwargs)


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(BLOCKS) == 3
    assert "CalibrationMetrics()" in BLOCKS[0] and "reliability_diagram(" in BLOCKS[1]
    assert "NullSpaceLaplace(trained.backbone" in BLOCKS[2]
    assert len(COMMANDS) >= 30 and ["configs"] in COMMANDS


@pytest.mark.parametrize("arguments", COMMANDS, ids=[" ".join(c)[:90] for c in COMMANDS])
def test_every_readme_command_line_parses(
    arguments: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Each command's subcommand, configs and overrides are accepted by the real command line (``--print_config``
    parses and resolves them, then exits; ``configs`` lists the shipped configs): a renamed option, a moved config
    or a stale flag in the README fails here."""
    monkeypatch.chdir(ROOT)
    parse_only = [] if arguments == ["configs"] else ["--print_config"]
    monkeypatch.setattr(sys, "argv", ["lightning-bayes", *arguments, *parse_only])
    try:
        cli.main()
    except SystemExit as exit:
        assert exit.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "mnist/map" in printed if arguments == ["configs"] else printed.startswith(("seed_everything", "# "))


def test_the_readme_python_blocks_run_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lightning, "Trainer", FewBatchesTrainer)
    namespace: dict = {}
    exec(compile(BLOCKS[0], "README.md (own Trainer)", "exec"), namespace)  # noqa: S102 (running the README is the test)
    logged = namespace["trainer"].callback_metrics
    for name in ("test/cal/acc", "test/cal/nll", "test/cal/ece", "test/ood/auroc", "test/ood/fpr95"):
        assert name in logged
    assert 0.0 <= float(logged["test/ood/auroc"]) <= 1.0
    assert float(logged["test/cal/nll"]) > 0.0

    # the second block: a Predictive's API and a plot, with the shapes its comments give
    namespace = {}
    exec(compile(BLOCKS[1], "README.md (predictives and plots)", "exec"), namespace)  # noqa: S102 (the README)
    p, y = namespace["p"], namespace["y"]
    assert p.logits.shape == (20, 64, 10) and p.num_samples == 20 and p.probs.shape == (64, 10)
    for per_example in (p.log_prob(y), p.entropy, p.expected_entropy, p.mutual_information, p.max_prob):
        assert per_example.shape == (64,)
    torch.testing.assert_close(p.entropy, p.expected_entropy + p.mutual_information)  # total = aleatoric + epistemic
    assert (tmp_path / "reliability.png").stat().st_size > 0 and 0.0 <= namespace["bins"].ece <= 1.0

    # the third block: the null-space Laplace on a trained MAP's network, its predictive linearised
    namespace = {}
    lines = BLOCKS[2].strip().splitlines()
    exec(compile("\n".join(lines[:-1]), "README.md (null-space Laplace)", "exec"), namespace)  # noqa: S102 (running the README is the test)
    predictive = eval(compile(lines[-1], "README.md (null-space Laplace)", "eval"), namespace)
    assert type(predictive).__name__ == "CategoricalPredictive"
    assert predictive.logits.shape == (30, 8, 10)  # "logits [30, 8, 10]"
