"""The ``lightning-bayes`` command: fit-then-test, checkpoints, and nothing overwritten."""

import copy
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_bayes.cli import run, run_checkpoint
from lightning_bayes.cli_resumed_best import keep_best_across_folders
from lightning_bayes.modules import MAP

from cli_helpers import ROOT, quick_args

MAP_CONFIG = ROOT / "configs" / "mnist" / "map.yaml"


def test_checkpoint_round_trip_reproduces_predictions_exactly(tmp_path: Path):
    cli = run(quick_args(MAP_CONFIG, tmp_path, batches=3))
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    restored = MAP.load_from_checkpoint(checkpoint, backbone=type(cli.model.backbone)(num_classes=10))
    x, _ = next(iter(cli.datamodule.test_dataloader()))
    model = cli.model.cpu().eval()
    with torch.no_grad():
        expected = model.predictive(x).logits
        torch.testing.assert_close(restored.eval().predictive(x).logits, expected, rtol=0, atol=0)


def test_second_run_writes_a_new_version_and_keeps_the_first(tmp_path: Path):
    run(quick_args(MAP_CONFIG, tmp_path, batches=1))
    first = next(tmp_path.rglob("metrics.json"))
    content = first.read_text()
    run(quick_args(MAP_CONFIG, tmp_path, batches=1))
    written = sorted(tmp_path.rglob("metrics.json"))
    assert len(written) == 2 and first.read_text() == content
    assert {p.parent.name for p in written} == {"version_0", "version_1"}


def test_a_second_run_into_a_fixed_version_is_refused_before_the_logger_deletes_its_metrics(tmp_path: Path):
    args = [*quick_args(MAP_CONFIG, tmp_path, batches=1), "--trainer.logger.init_args.version=0",
            "--test_after_fit=false"]
    run(args)
    folder = next(tmp_path.rglob("version_0"))
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    assert "metrics.csv" in before
    with pytest.raises(RuntimeError, match=rf"^{folder} holds an earlier run's files \(checkpoints, config.yaml, "
                       r"hparams.yaml, metrics.csv\), and lightning-bayes does not overwrite a run's files: give this "
                       r"run another --trainer.logger.init_args.version"):
        run(args)
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before


def test_without_a_logger_a_second_run_into_the_same_folder_is_refused_saying_what_to_do(tmp_path: Path):
    args = [*quick_args(MAP_CONFIG, tmp_path, batches=1)[:-1], "--trainer.logger=false", "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path}"]
    run(args)
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(RuntimeError, match=rf"^{tmp_path}/config.yaml is there from an earlier run, and lightning-bayes "
                       r"does not overwrite a run's files: .* give this one its own --trainer.default_root_dir"):
        run(args)
    assert (tmp_path / "config.yaml").read_text() == saved


def test_a_run_refused_before_its_loops_leaves_no_version_folder_but_a_failed_step_keeps_its_config(
    tmp_path: Path, monkeypatch
):
    """A method refusing the Trainer's settings in ``on_fit_start`` (VIKING under plain DDP, the null-space Laplace
    under ``max_steps``) took version_0 with only a config.yaml in it, a callback refusing in its setup an empty
    version_0; a run that failed in its loops keeps it."""

    def refuse(self: MAP) -> None:
        raise ValueError("refused in on_fit_start")

    with monkeypatch.context() as patch:
        patch.setattr(MAP, "on_fit_start", refuse)
        with pytest.raises(ValueError, match="refused in on_fit_start"):
            run(quick_args(MAP_CONFIG, tmp_path, batches=1))
    assert not list(tmp_path.iterdir())  # nor the run name's folder that held only that version
    curve = ROOT / "configs" / "digits" / "curve.yaml"  # its MAP checkpoints are not there: refused in a setup
    with pytest.raises(FileNotFoundError, match="matches no file"):
        run([*quick_args(curve, tmp_path, batches=1), f"--trainer.callbacks.init_args.end={tmp_path}/none/*.ckpt"])
    assert not list(tmp_path.iterdir())

    def fail(self: MAP, batch: object, batch_idx: int) -> None:
        raise ValueError("failed in a step")

    with monkeypatch.context() as patch:
        patch.setattr(MAP, "training_step", fail)
        with pytest.raises(ValueError, match="failed in a step"):
            run(quick_args(MAP_CONFIG, tmp_path, batches=1))
    assert [p.relative_to(tmp_path).parts[-2:] for p in tmp_path.rglob("config.yaml")] == [("version_0", "config.yaml")]
    with monkeypatch.context() as patch:  # refused beside an earlier version: the run name's folder stays
        patch.setattr(MAP, "on_fit_start", refuse)
        with pytest.raises(ValueError, match="refused in on_fit_start"):
            run(quick_args(MAP_CONFIG, tmp_path, batches=1))
    assert [p.name for p in tmp_path.rglob("version_*")] == ["version_0"]


def test_test_after_fit_false_skips_the_test_stage(tmp_path: Path):
    run([*quick_args(MAP_CONFIG, tmp_path, batches=1), "--test_after_fit=false"])
    assert not list(tmp_path.rglob("metrics.json"))
    assert list(tmp_path.rglob("last.ckpt"))


def test_a_fit_without_training_batches_is_not_tested(tmp_path: Path):
    """Lightning ends such a fit with a notice; its test would score the untrained network as the run's result."""
    digits = ROOT / "configs" / "digits" / "map.yaml"
    args = [*quick_args(digits, tmp_path, batches=1), "--data.init_args.batch_size=2000",
            "--data.init_args.drop_last=true"]
    with pytest.raises(ValueError, match=r"the fit ran no training batch .*drop_last=True"):
        run(args)
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize("after_resume", [0.9, 0.1])  # worse than the best before the stop; better
def test_a_resumed_fit_keeps_the_earlier_best_checkpoint_unless_it_beats_it(tmp_path: Path, monkeypatch, after_resume):
    """A resumed fit logs under a new version folder, where Lightning restored the best checkpoint's path but not its
    score: its first validation counted as the best whatever it scored (scripted val/nll by epoch here)."""
    scores = {0: 1.0, 1: 0.5, 2: after_resume}
    candidates = ModelCheckpoint._monitor_candidates

    def scripted(self, trainer):
        return {**candidates(self, trainer), "val/nll": torch.tensor(scores[trainer.current_epoch])}

    monkeypatch.setattr(ModelCheckpoint, "_monitor_candidates", scripted)
    digits = ROOT / "configs" / "digits" / "map.yaml"
    run([*quick_args(digits, tmp_path, batches=1), "--trainer.max_epochs=2", "--test_after_fit=false"])
    first = next(tmp_path.rglob("version_0/checkpoints"))
    run([*quick_args(digits, tmp_path, batches=1), "--trainer.max_epochs=3", f"--ckpt_path={first / 'last.ckpt'}"])
    second = next(tmp_path.rglob("version_1/checkpoints"))
    assert (first / "best.ckpt").exists()  # the earlier run's best is never deleted
    assert (second / "best.ckpt").exists() == (after_resume < 0.5)
    best = torch.load(second / "best.ckpt" if after_resume < 0.5 else first / "best.ckpt", weights_only=False)
    assert best["epoch"] == (2 if after_resume < 0.5 else 1)


def test_a_checkpoint_keeping_its_best_across_folders_still_pickles_and_copies():
    """ddp_spawn pickles the callbacks (a closure did not pickle); a deep copy restores into itself, not into the
    original."""
    checkpoint = ModelCheckpoint(monitor="val/nll", filename="best")
    keep_best_across_folders(checkpoint)
    state = {"dirpath": "/earlier", "best_model_path": "/earlier/best.ckpt", "best_model_score": torch.tensor(0.5),
             "best_k_models": {"/earlier/best.ckpt": torch.tensor(0.5)}, "kth_best_model_path": "/earlier/best.ckpt",
             "kth_value": torch.tensor(0.5)}  # fmt: skip
    for restored in (pickle.loads(pickle.dumps(checkpoint)), copy.deepcopy(checkpoint)):
        restored.dirpath = "/resumed"
        restored.load_state_dict(state)
        assert restored.best_model_score == 0.5 and restored.best_k_models == state["best_k_models"]
    assert checkpoint.best_model_score is None


def test_test_subcommand_evaluates_a_checkpoint(tmp_path: Path):
    run([*quick_args(MAP_CONFIG, tmp_path, batches=1), "--test_after_fit=false"])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    args = quick_args(MAP_CONFIG, tmp_path, batches=1)
    args = ["test", *[a for a in args[1:] if "limit_train" not in a and "max_epochs" not in a], f"--ckpt_path={checkpoint}"]
    run(args)
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert 0.0 <= metrics["acc"] <= 1.0 and "ood_auroc" in metrics
    # "last" is the newest last.ckpt of the config's runs (Lightning looked in the new run's empty folder and scored
    # the untrained network); "best" likewise, and none there is refused by name
    named = run([*args[:-1], "--ckpt_path=last"])
    assert named.config["test"].ckpt_path == str(checkpoint)
    assert json.loads(next(tmp_path.rglob("version_2/metrics.json")).read_text()) == metrics
    with pytest.raises(FileNotFoundError, match=r"^--ckpt_path best: no earlier run of this config has one \(.*"
                       r"mnist_map/version_\*/checkpoints/best\.ckpt: no file"):
        run([*args[:-1], "--ckpt_path=best", f"--trainer.logger.init_args.save_dir={tmp_path / 'elsewhere'}"])


def test_a_named_checkpoint_is_the_newest_of_the_configs_runs(tmp_path: Path):
    """Under the logger's ``save_dir/name`` (each logger of a list), a ``ModelCheckpoint``'s own ``dirpath``,
    Lightning's default ``lightning_logs``, or ``checkpoints/`` without a logger; the run's own when the config is
    its ``config.yaml``."""
    for folder in ("runs/digits_map/version_0", "runs/digits_map/version_1", "runs/other/version_2",
                   "root/lightning_logs/version_0", "root", "mine"):
        (tmp_path / folder / "checkpoints").mkdir(parents=True)
        (tmp_path / folder / "checkpoints" / "last.ckpt").touch()
    os.utime(tmp_path / "runs/digits_map/version_0/checkpoints/last.ckpt", (2e9, 2e9))  # the newest, not the highest
    os.utime(tmp_path / "runs/other/version_2/checkpoints/last.ckpt", (3e9, 3e9))  # another config's run
    csv = {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "digits_map"}}
    newest = str(tmp_path / "runs/digits_map/version_0/checkpoints/last.ckpt")
    assert run_checkpoint("last", {"trainer": {"logger": csv}})[0] == newest
    assert run_checkpoint("last", {"trainer": {"logger": [csv]}})[0] == newest
    own = tmp_path / "runs/digits_map/version_1/config.yaml"  # a run's config: its own checkpoint, not the newest
    ran = run_checkpoint("last", {"config": [own], "trainer": {"logger": csv}})[0]
    assert ran == str(own.parent / "checkpoints/last.ckpt")
    mine = {"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "mine/checkpoints")}}
    os.utime(tmp_path / "mine/checkpoints/last.ckpt", (4e9, 4e9))
    elsewhere = run_checkpoint("last", {"trainer": {"logger": csv, "callbacks": [mine]}})[0]
    assert elsewhere == str(tmp_path / "mine/checkpoints/last.ckpt")
    root = str(tmp_path / "root")
    default = run_checkpoint("last", {"trainer": {"logger": True, "default_root_dir": root}})[0]
    assert default == f"{root}/lightning_logs/version_0/checkpoints/last.ckpt"
    without = run_checkpoint("last", {"trainer": {"logger": False, "default_root_dir": root}})[0]
    assert without == f"{root}/checkpoints/last.ckpt"
    assert run_checkpoint("best", {"trainer": {"logger": csv}})[0] is None


def test_a_first_fit_told_to_resume_from_last_starts_afresh_with_a_warning(tmp_path: Path):
    """A job script that always passes ``--ckpt_path last``: its first run finds none and fits from scratch."""
    afresh = r"^--ckpt_path last: no earlier run of this config has one \(.*the fit starts afresh"
    with pytest.warns(UserWarning, match=afresh):
        run([*quick_args(MAP_CONFIG, tmp_path, batches=1), "--test_after_fit=false", "--ckpt_path=last"])
    assert len(list(tmp_path.rglob("last.ckpt"))) == 1


def test_a_checkpoint_of_another_method_or_no_checkpoint_is_refused_before_anything_is_written(tmp_path: Path):
    """LightningCLI alone would build the checkpoint's method (a MAP under the IVON config's run name), score a
    JSON file's unpickling error with advice to load it unsafely, and write a run folder for a missing file."""
    digits = ROOT / "configs" / "digits"
    run([*quick_args(digits / "map.yaml", tmp_path, batches=1), "--test_after_fit=false"])
    checkpoint, before = next(tmp_path.rglob("last.ckpt")), sorted(tmp_path.rglob("*"))
    (tmp_path / "notes.json").write_text("{}")
    another = (rf"^--ckpt_path '{checkpoint}' is a checkpoint of lightning_bayes.modules.MAP, but the config's model "
               r"is lightning_bayes.modules.ivon.IVONModule: pass the config it was trained with")
    not_a_checkpoint = r"^--ckpt_path '.*notes.json' is not a Lightning checkpoint \(torch.load found no checkpoint"
    torch.save({"state_dict": {}, "hyper_parameters": {"optimizer": torch.optim.Adam}}, tmp_path / "python.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"optimizer": torch.optim.Adam}}, tmp_path / "legacy.ckpt",
               _use_new_zipfile_serialization=False)  # torch's older format: not a zip archive
    python_objects = (r"^--ckpt_path '.*python.ckpt' holds Python objects that a weights-only torch.load refuses "
                      r"\(Unsupported global: GLOBAL torch.optim.adam.Adam.*\): a checkpoint saved outside")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("hello")
    for seed in range(8):  # random bytes fail to unpickle in several ways, most as an UnpicklingError
        noise = torch.randint(0, 256, (1024,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        (tmp_path / f"noise{seed}.ckpt").write_bytes(noise.numpy().tobytes())
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    unreadable = r"^--ckpt_path '.*{}' is not a Lightning checkpoint \(torch.load: {}"
    state_dict = (r"^--ckpt_path '.*state_dict.pt' is not a Lightning checkpoint \(a torch.save file without "
                  r"Lightning's keys; it holds \['weight'\]\)")
    cases = [
        (digits / "map.yaml", str(tmp_path / "empty.ckpt"), ValueError, unreadable.format("empty.ckpt", "EOFError")),
        (digits / "map.yaml", str(tmp_path / "text.ckpt"), ValueError, unreadable.format("text.ckpt", "KeyError")),
        *[(digits / "map.yaml", str(tmp_path / f"noise{seed}.ckpt"), ValueError,
           rf"^--ckpt_path '.*noise{seed}.ckpt' is not a Lightning checkpoint \(torch.load") for seed in range(8)],
        (digits / "map.yaml", str(tmp_path / "state_dict.pt"), ValueError, state_dict),
        (digits / "ivon.yaml", str(checkpoint), ValueError, another),
        (digits / "map.yaml", str(tmp_path / "notes.json"), ValueError, not_a_checkpoint),
        (digits / "map.yaml", str(tmp_path / "python.ckpt"), ValueError, python_objects),
        (digits / "map.yaml", str(tmp_path / "legacy.ckpt"), ValueError, python_objects.replace("python", "legacy")),
        (digits / "map.yaml", str(tmp_path / "version_9.ckpt"), FileNotFoundError, r"^--ckpt_path '.*' is not a file$"),
    ]
    for config, path, error, message in cases:
        with pytest.raises(error, match=message):
            run(["test", "--config", str(config), f"--ckpt_path={path}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}"])
    for name in ("notes.json", "empty.ckpt", "text.ckpt", "state_dict.pt", *(f"noise{seed}.ckpt" for seed in range(8))):
        (tmp_path / name).unlink()
    (tmp_path / "python.ckpt").unlink()
    (tmp_path / "legacy.ckpt").unlink()
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, no config.yaml


def test_scoring_without_a_checkpoint_warns_that_the_weights_are_untrained(tmp_path: Path):
    args = ["--config", str(ROOT / "configs" / "digits" / "map.yaml"), "--trainer.limit_test_batches=1",
            "--trainer.limit_predict_batches=1", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    for subcommand in ("test", "predict"):
        with pytest.warns(UserWarning, match=rf"`lightning-bayes {subcommand}` without --ckpt_path scores MAP as "
                          r"built, with the weights it was initialised with"):
            run([subcommand, *args])


def test_a_method_that_cannot_score_unfitted_is_refused_before_its_run_folder(tmp_path: Path):
    """IVON without --ckpt_path has no posterior variance: the refusal came at the first test batch, after the run's
    folder (config.yaml, hparams.yaml) was made."""
    with pytest.raises(RuntimeError, match=r"^`lightning-bayes test` without --ckpt_path: IVONModule has no posterior "
                       r"variance yet: fit it, or load a checkpoint"):
        run(["test", "--config", str(ROOT / "configs" / "digits" / "ivon.yaml"),
             f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert list(tmp_path.rglob("*")) == []


def test_a_fit_runs_saved_config_drives_the_test_subcommand(tmp_path: Path):
    """The ``config.yaml`` a fit writes next to its logs (with fit's ``test_after_fit``) is accepted by ``test``."""
    run([*quick_args(MAP_CONFIG, tmp_path, batches=1), "--test_after_fit=false"])
    saved, checkpoint = next(tmp_path.rglob("config.yaml")), next(tmp_path.rglob("last.ckpt"))
    cli = run(["test", "--config", str(saved), f"--ckpt_path={checkpoint}", "--trainer.limit_test_batches=1"])
    assert cli.config.test.test_after_fit is False  # the fit-only key (false in that run) is carried, not acted on
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert 0.0 <= metrics["acc"] <= 1.0


def test_model_arguments_on_the_command_line_win_over_the_checkpoints(tmp_path: Path):
    """``test --ckpt_path`` builds the model from the checkpoint's hyperparameters, except those given explicitly."""
    config = ROOT / "configs" / "digits" / "ivon.yaml"  # num_samples: 64 in the config, so in the checkpoint
    run([*quick_args(config, tmp_path, batches=1), "--test_after_fit=false"])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    args = ["test", "--config", str(config), f"--ckpt_path={checkpoint}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    args += ["--trainer.limit_test_batches=1"]
    assert run(args).model.num_samples == 64
    assert run([*args, "--model.init_args.num_samples", "3"]).model.num_samples == 3
    assert run([*args, "--model.num_samples", "4"]).model.num_samples == 4  # jsonargparse's init_args shorthand
    nested = run([*args, "--model.init_args.optimizer.init_args.lr=0.5", "--model.optimizer.hess_init", "0.25"])
    optimizer = nested.config.test.model.init_args.optimizer.init_args  # a class inside the model: merged, not replaced
    assert (optimizer.lr, optimizer.hess_init, optimizer.weight_decay) == (0.5, 0.25, 1.0e-3)
    assert nested.model.num_samples == 64
    assert run([*args, "--model.init_args.num_samples=5", "--model.init_args.mean_prediction=true"]).model.mean_prediction


def test_model_arguments_win_over_the_checkpoints_for_a_lora_backbone(tmp_path: Path):
    """The README's BLoB mean model: ``test --ckpt_path ... --model.init_args.mean_prediction true`` on a config whose
    backbone takes a dataclass (``LoraSpec``), which a plain re-parse of the merged namespace refused."""
    config = ROOT / "configs" / "text" / "blob_smollm2.yaml"
    small = ["--data.init_args.batch_size=4", "--data.init_args.max_test=4", "--model.init_args.num_samples=2"]
    run([*quick_args(config, tmp_path, batches=1), *small, "--test_after_fit=false"])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    args = ["test", "--config", str(config), f"--ckpt_path={checkpoint}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    args += ["--trainer.limit_test_batches=1", *small[:2]]
    assert run([*args, "--model.init_args.mean_prediction", "true"]).model.mean_prediction
    restored = run([*args, "--model.init_args.num_samples=3"]).model
    assert restored.num_samples == 3 and not restored.mean_prediction and restored.kl_lr == 0.01


def test_fast_dev_run_leaves_the_working_folder_empty(tmp_path: Path, monkeypatch):
    """Lightning turns loggers and checkpoints off under ``fast_dev_run`` but for ``save_last``'s save at the end
    of training (the digits MAP config has ``save_last: true``): a debug run writes nothing, twice over."""
    monkeypatch.chdir(tmp_path)
    import warnings

    for _ in range(2):
        with warnings.catch_warnings():  # validation ran: no warning that it did not (fast_dev_run saves nothing)
            warnings.filterwarnings("error", message="no checkpoint was chosen")
            run(["fit", "--config", str(ROOT / "configs" / "digits" / "map.yaml"), "--trainer.fast_dev_run=true"])
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("--model.init_args.num_samples=0", "num_samples must be a positive integer; got 0"),
        ("--model.init_args.backbone.init_args.dropout=1.5", r"dropout must lie in \[0, 1\); got 1.5"),
        ("--data.init_args.batch_size=0", "batch_size must be an int >= 1; got 0"),
    ],
)
def test_a_constructor_error_reaches_the_user_as_it_was_raised(tmp_path: Path, argument: str, message: str):
    config = ROOT / "configs" / "digits" / "mc_dropout.yaml"
    with pytest.raises(ValueError, match=f"^{message}$"):
        run(["--config", str(config), f"--trainer.default_root_dir={tmp_path}", argument], subcommand=False)


@pytest.mark.parametrize(
    ("trainer_flag", "message"),
    [
        ("--trainer.gradient_clip_val=0.5", r"gradient_clip_val=0.5 does not reach: clip with --model.init_args.grad"),
        ("--trainer.accumulate_grad_batches=2", r"accumulate_grad_batches=2 does not reach: give a larger batch"),
    ],
)
def test_trainer_clipping_or_accumulation_of_a_method_that_steps_itself_names_what_to_do(
    tmp_path: Path, trainer_flag: str, message: str
):
    """Lightning's own refusal asked BLoB's users to "switch to automatic optimization", which BLoB cannot."""
    blob = ["--model=lightning_bayes.modules.BLoB", "--model.init_args.backbone=lightning_bayes.models.MLP",
            "--model.init_args.backbone.init_args.in_features=64",
            "--model.init_args.backbone.init_args.out_features=10", "--model.init_args.params=all"]
    config = ROOT / "configs" / "digits" / "map.yaml"
    with pytest.raises(ValueError, match=rf"^BLoB steps its optimisers itself, which the Trainer's {message}"):
        run([*quick_args(config, tmp_path), *blob, trainer_flag])


def test_a_method_without_optimiser_steps_is_told_to_leave_clipping_unset_and_others_keep_the_trainers():
    from lightning.pytorch import Trainer
    from torch import nn

    from lightning_bayes.cli import _refuse_trainer_steps_of_manual_optimisation as refuse
    from lightning_bayes.modules import NullSpaceLaplace

    sweep, quiet = NullSpaceLaplace(nn.Sequential(nn.Linear(2, 2))), {"logger": False, "enable_progress_bar": False}
    with pytest.raises(ValueError, match=r"^NullSpaceLaplace takes no optimiser step, which the Trainer's "
                       r"gradient_clip_val=0.5 does not reach: leave --trainer.gradient_clip_val unset$"):
        refuse(Trainer(gradient_clip_val=0.5, **quiet), sweep)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2 does not reach: leave it at 1$"):
        refuse(Trainer(accumulate_grad_batches=2, **quiet), sweep)
    refuse(Trainer(gradient_clip_val=0, **quiet), sweep)  # 0 is no clipping, as Lightning reads it
    refuse(Trainer(gradient_clip_val=0.5, accumulate_grad_batches=2, **quiet), MAP(nn.Linear(2, 2)))  # automatic


def test_the_trained_checkpoint_is_the_best_or_else_any_latest(tmp_path: Path) -> None:
    """The leaderboard's prerequisites start from ``trained_checkpoint``: it read only the first ModelCheckpoint,
    which saved nothing when it monitors a metric that never came (no validation), although the second wrote
    last.ckpt."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_bayes.cli import trained_checkpoint
    from lightning_bayes.datamodules import DigitsDataModule
    from lightning_bayes.models import MLP

    def fit(limit_val_batches: int) -> Trainer:
        best = ModelCheckpoint(tmp_path / str(limit_val_batches), monitor="val/nll", filename="best")
        last = ModelCheckpoint(tmp_path / str(limit_val_batches), filename="last", save_on_train_epoch_end=True)
        trainer = Trainer(
            max_epochs=1, limit_train_batches=2, limit_val_batches=limit_val_batches, callbacks=[best, last],
            logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip
        trainer.fit(MAP(MLP(64, 10)), datamodule=DigitsDataModule())
        return trainer

    assert trained_checkpoint(fit(0)) == str(tmp_path / "0" / "last.ckpt")
    assert trained_checkpoint(fit(2)) == str(tmp_path / "2" / "best.ckpt")


def test_a_fit_that_never_validated_says_it_tests_the_fitted_weights(tmp_path: Path):
    """A monitored checkpoint with no validation has no best file: the test scores the weights as fitted, and says so
    (it did silently)."""
    args = [*quick_args(ROOT / "configs" / "digits" / "map.yaml", tmp_path, batches=1), "--trainer.limit_val_batches=0"]
    with pytest.warns(UserWarning, match=r"no checkpoint was chosen by 'val/nll' \(no validation ran"):
        run(args)
    assert next(tmp_path.rglob("metrics.json")).is_file()
    import warnings

    with warnings.catch_warnings():  # a config that monitors nothing tests its final state without the warning
        warnings.filterwarnings("error", message="no checkpoint was chosen")
        run(quick_args(ROOT / "configs" / "digits" / "swag.yaml", tmp_path / "swag", batches=1))
