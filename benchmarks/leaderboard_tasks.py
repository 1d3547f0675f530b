"""What the leaderboard runs per task: our methods as their configs in ``configs/``, and the anchors.

An :class:`Entry` is one row (or a hidden prerequisite run such as the second MAP a curve needs). Our
methods run ``lightning-bayes fit --config <config>`` with the listed extra arguments; an entry that
starts from other runs' checkpoints names them in ``needs`` and the arguments that receive their
checkpoint (:func:`lightning_bayes.cli.trained_checkpoint`: ``best.ckpt`` where a run monitors a metric, else
``last.ckpt``) in ``checkpoint_args`` (in the same order). Anchors (other libraries, see
``leaderboard_anchors.py``) copy the model, data and budget of ``config`` and, when they are post hoc,
start from the checkpoints in ``needs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["baseline", "ours", "anchor", "prerequisite"]
TASK_NAMES = ("digits", "mnist", "regression", "text")

_CHECKPOINT = ("--model.init_args.checkpoint",)
_CURVE_ENDS = ("--trainer.callbacks.init_args.start", "--trainer.callbacks.init_args.end")
# a second, independently seeded MAP for the curve's other end
_SECOND_SEED = 1000


@dataclass(frozen=True)
class Entry:
    """One leaderboard run.

    Args:
        name: row label (unique within a task).
        kind: ``baseline`` (MAP, MC dropout, deep ensemble), ``ours``, ``anchor`` (another library) or
            ``prerequisite`` (a run others start from; not a row of its own).
        config: the YAML under ``configs/`` it runs (ours) or copies model, data and budget from (anchors).
        needs: names of the entries whose trained checkpoint it starts from.
        checkpoint_args: CLI arguments that receive those checkpoints, one per need (ours only).
        args: extra CLI arguments (ours) or ``key=value`` options (anchors).
        quick: extra CLI arguments under ``--quick``.
        seed_offset: added to the run's seed (a second, independent MAP).
        anchor: the anchor's name in ``leaderboard_anchors.ANCHORS``.
        note: what the row is, for the report.
    """

    name: str
    kind: Kind
    config: str
    needs: tuple[str, ...] = ()
    checkpoint_args: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    seed_offset: int = 0
    anchor: str | None = None
    note: str = ""
    options: dict[str, str] = field(default_factory=dict)


def _classification(folder: str, *, bernstein: bool, quick_args: dict[str, tuple[str, ...]]) -> list[Entry]:
    """The classification rows shared by digits and MNIST (``folder`` of configs; ``quick_args`` by config name)."""

    def quick(name: str) -> tuple[str, ...]:
        return quick_args.get(name, ())

    entries = [
        Entry("MAP", "baseline", f"{folder}/map.yaml", quick=quick("map"), note="AdamW, best validation NLL"),
        Entry("MAP (second seed)", "prerequisite", f"{folder}/map.yaml", quick=quick("map"), seed_offset=_SECOND_SEED),
        Entry("MC dropout", "baseline", f"{folder}/mc_dropout.yaml", quick=quick("mc_dropout")),
        Entry("Deep ensemble (5)", "baseline", f"{folder}/deep_ensemble.yaml", quick=quick("deep_ensemble")),
        Entry("VBLL", "ours", f"{folder}/vbll.yaml", quick=quick("vbll"), note="discriminative, dense"),
        Entry("MFVI", "ours", f"{folder}/mfvi.yaml", quick=quick("mfvi"), note="all layers"),
        Entry("SSVI (10%)", "ours", f"{folder}/ssvi.yaml", quick=quick("ssvi")),
        Entry("IVON", "ours", f"{folder}/ivon.yaml", quick=quick("ivon")),
        Entry("VIKING", "ours", f"{folder}/viking.yaml", quick=quick("viking")),
        Entry(
            "Null-space Laplace",
            "ours",
            f"{folder}/nullspace_laplace.yaml",
            needs=("MAP",),
            checkpoint_args=_CHECKPOINT,
            quick=quick("nullspace_laplace"),
            note="all layers, post hoc",
        ),
        Entry("SWAG collection", "prerequisite", f"{folder}/swag.yaml", quick=quick("swag")),
        Entry(
            "SWAG", "ours", f"{folder}/swag_predictive.yaml", needs=("SWAG collection",), checkpoint_args=_CHECKPOINT
        ),
        Entry(
            "Subspace ESS",
            "ours",
            f"{folder}/subspace_ess.yaml",
            needs=("SWAG collection",),
            checkpoint_args=_CHECKPOINT,
            note="PCA rank 5",
        ),
        Entry(
            "Curve ensemble",
            "ours",
            f"{folder}/curve.yaml",
            needs=("MAP", "MAP (second seed)"),
            checkpoint_args=_CURVE_ENDS,
            quick=quick("curve"),
            note="Bezier, 11 points",
        ),
    ]
    if folder == "mnist":  # the MNIST VIKING config starts from the MAP
        entries = [
            Entry(e.name, e.kind, e.config, ("MAP",), _CHECKPOINT, quick=e.quick, note="from the MAP")
            if e.name == "VIKING"
            else e
            for e in entries
        ]
    if bernstein:
        entries.append(
            Entry(
                "Bernstein VI",
                "ours",
                f"{folder}/bernstein_vi.yaml",
                quick=quick("bernstein_vi"),
                note="last layer, M = 10",
            )
        )
    entries += [
        Entry(
            "laplace-torch LL-KFAC",
            "anchor",
            f"{folder}/map.yaml",
            needs=("MAP",),
            anchor="laplace_torch",
            options={"subset": "last_layer", "structure": "kron"},
        ),
        Entry(
            "laplace-torch diag",
            "anchor",
            f"{folder}/map.yaml",
            needs=("MAP",),
            anchor="laplace_torch",
            options={"subset": "all", "structure": "diag"},
        ),
        Entry(
            "laplace-torch KFAC",
            "anchor",
            f"{folder}/map.yaml",
            needs=("MAP",),
            anchor="laplace_torch",
            options={"subset": "all", "structure": "kron"},
        ),
        Entry("vbll package", "anchor", f"{folder}/vbll.yaml", anchor="vbll_package", quick=quick("vbll")),
        Entry("ivon-opt loop", "anchor", f"{folder}/ivon.yaml", anchor="ivon_manual", quick=quick("ivon")),
    ]
    return entries


def _regression() -> list[Entry]:
    return [
        Entry("MAP", "baseline", "regression/map_mcycle.yaml", note="heteroscedastic Gaussian"),
        Entry(
            "MAP (homoscedastic)",
            "baseline",
            "regression/map_mcycle.yaml",
            args=_HOMOSCEDASTIC,
            note="one learned noise: what laplace-torch starts from",
        ),
        Entry("VBLL", "ours", "regression/vbll_mcycle.yaml"),
        Entry(
            "laplace-torch LL-KFAC",
            "anchor",
            "regression/map_mcycle.yaml",
            needs=("MAP (homoscedastic)",),
            args=_HOMOSCEDASTIC,
            anchor="laplace_torch",
            options={"subset": "last_layer", "structure": "kron"},
        ),
        Entry(
            "laplace-torch KFAC",
            "anchor",
            "regression/map_mcycle.yaml",
            needs=("MAP (homoscedastic)",),
            args=_HOMOSCEDASTIC,
            anchor="laplace_torch",
            options={"subset": "all", "structure": "kron"},
        ),
        Entry("vbll package", "anchor", "regression/vbll_mcycle.yaml", anchor="vbll_package"),
    ]


def _text() -> list[Entry]:
    quick = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=0.25")
    return [
        Entry("MAP-LoRA", "baseline", "text/map_lora_smollm2.yaml", quick=quick),
        Entry(
            "MAP-LoRA (second seed)",
            "prerequisite",
            "text/map_lora_smollm2.yaml",
            quick=quick,
            seed_offset=_SECOND_SEED,
        ),
        Entry("LoRA ensemble (5)", "baseline", "text/deep_ensemble_lora_smollm2.yaml", quick=quick),
        Entry("BLoB", "ours", "text/blob_smollm2.yaml", quick=quick),
        Entry("IVON-LoRA", "ours", "text/ivon_lora_smollm2.yaml", quick=quick),
        Entry("TFB", "ours", "text/tfb_smollm2.yaml", needs=("MAP-LoRA",), checkpoint_args=_CHECKPOINT),
        Entry(
            "Null-space Laplace (LoRA)",
            "ours",
            "text/nullspace_laplace_lora.yaml",
            needs=("MAP-LoRA",),
            checkpoint_args=_CHECKPOINT,
            quick=("--trainer.max_epochs=1",),
        ),
        Entry(
            "LoRA curve",
            "ours",
            "text/lora_curve.yaml",
            needs=("MAP-LoRA", "MAP-LoRA (second seed)"),
            checkpoint_args=_CURVE_ENDS,
            quick=("--trainer.max_epochs=1",),
        ),
        Entry("VBLL (SmolLM2)", "ours", "text/vbll_smollm2.yaml", quick=quick),
        Entry(
            "Laplace-LoRA (laplace-torch KFAC)",
            "anchor",
            "text/map_lora_smollm2.yaml",
            needs=("MAP-LoRA",),
            anchor="laplace_torch",
            options={"subset": "all", "structure": "kron"},
            note="LoRA weights only",
        ),
    ]


# laplace-torch 0.3 models regression noise as one scalar: its rows start from a homoscedastic MAP
_HOMOSCEDASTIC = (
    "--model.init_args.backbone.init_args.out_features=1",
    "--model.init_args.likelihood.init_args.heteroscedastic=false",
)


def _epochs(epochs: int, *more: str) -> tuple[str, ...]:
    return (f"--trainer.max_epochs={epochs}", *more)


_COSINE = "--model.init_args.lr_scheduler.init_args.T_max"
# --quick budgets (an anchor gets the quick arguments of the config it copies): digits halves its two 100-epoch
# VI runs; MNIST trains every network for 3 epochs (SSVI 6, the SWAG collection 6 with 3 collecting, VIKING one
# scale and one ELBO epoch from the 3-epoch MAP, null-space Laplace 2 sweeps), about an hour on 2 CPU cores
_QUICK_DIGITS = {"mfvi": _epochs(50), "ssvi": _epochs(50, f"{_COSINE}=50")}
_QUICK_MNIST = {
    "map": _epochs(3),
    "mc_dropout": _epochs(3),
    "deep_ensemble": _epochs(3),
    "vbll": _epochs(3),
    "mfvi": _epochs(3, "--model.init_args.kl_warmup_epochs=1"),
    "ivon": _epochs(3, f"{_COSINE}=3", "--trainer.check_val_every_n_epoch=1"),
    "ssvi": _epochs(
        6, f"{_COSINE}=6", "--model.init_args.kl_warmup_epochs=3", "--trainer.check_val_every_n_epoch=3"
    ),
    "swag": _epochs(6, "--trainer.callbacks.init_args.start_epoch=3"),
    "viking": _epochs(2, "--model.init_args.phase_epochs=[0, 1, 1]"),
    "curve": _epochs(2, f"{_COSINE}=2"),
    "nullspace_laplace": _epochs(2, "--model.init_args.scale=line_search"),
}


def task_entries(task: str) -> list[Entry]:
    """The entries of ``task`` in run order (every need before the entries that use it)."""
    if task == "digits":
        return _classification("digits", bernstein=True, quick_args=_QUICK_DIGITS)
    if task == "mnist":
        return _classification("mnist", bernstein=False, quick_args=_QUICK_MNIST)
    if task == "regression":
        return _regression()
    if task == "text":
        return _text()
    raise ValueError(f"task must be one of {TASK_NAMES}; got {task!r}")
