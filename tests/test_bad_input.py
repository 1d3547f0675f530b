"""Bad constructor and update arguments get an error naming the argument, the value and what was expected, instead of
being accepted (a ``True`` read as the training-set size 1, an infinite scale giving NaN weights, ``"no"`` read as
true) or crashing deep inside torch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bayes.callbacks import CoefficientPosterior, CurveTraining, SWASubspace
from lightning_bayes.checks import check_seed
from lightning_bayes.datamodules import DigitsDataModule, RottenTomatoesDataModule
from lightning_bayes.datamodules.base import check_split_fractions
from lightning_bayes.inference.subspace import DiagonalGaussian
from lightning_bayes.inference.likelihoods import CategoricalLikelihood, GaussianLikelihood
from lightning_bayes.inference.training_free_bayes import Bisection
from lightning_bayes.metrics import ExpectedCalibrationError, IntervalCoverage, OODAUROC, regression_metrics
from lightning_bayes.models import MLP
from lightning_bayes.modules import (
    MAP,
    SSVI,
    VIKING,
    BernsteinVI,
    BLoB,
    DeepEnsemble,
    IVONModule,
    NullSpaceLaplace,
    SubspaceInference,
    TrainingFreeBayes,
    VariationalInference,
    VBLLClassifier,
    VBLLRegressor,
)
from lightning_bayes.optim import IVON
from lightning_bayes.params import select_parameters
from lightning_bayes.predictive import CategoricalPredictive, GaussianPredictive, concatenate


def net() -> nn.Module:
    return MLP(4, 3, hidden=[5])


CASES: list[tuple[str, Callable[[], Any], str]] = [
    # a bool is not a count: True was the training-set size 1 (a KL weighted 44 times too much)
    ("vi_dataset_size", lambda: VariationalInference(net(), dataset_size=True), r"dataset_size .*got True"),
    ("ivon_dataset_size", lambda: IVONModule(net(), dataset_size=True), r"dataset_size .*got True"),
    ("vbll_dataset_size", lambda: VBLLRegressor(net(), dataset_size=True), r"dataset_size .*got True"),
    ("vi_train_samples", lambda: VariationalInference(net(), train_samples=True), r"train_samples .*got True"),
    ("swa_max_rank", lambda: SWASubspace(max_rank=True), r"max_rank .*got True"),
    ("digits_batch_size", lambda: DigitsDataModule(batch_size=True), r"batch_size .*got True"),
    ("ece_bins", lambda: ExpectedCalibrationError(n_bins=True), r"n_bins .*got True"),
    ("ivon_mc_samples", lambda: IVON(net().parameters(), 10, lr=0.1, mc_samples=True), r"mc_samples .*got True"),
    ("bernstein_degree", lambda: BernsteinVI(net(), degree=True), r"degree must be an int >= 1; got True"),
    ("gaussian_output_dim", lambda: GaussianLikelihood(output_dim=True), r"output_dim must be an int >= 1; got True"),
    # infinite or NaN numbers: NaN weights or a KL switched off
    ("ivon_lr", lambda: IVON(net().parameters(), 10, lr=math.inf), r"lr must be a finite number >= 0; got inf"),
    ("ivon_ess", lambda: IVON(net().parameters(), math.inf, lr=0.1), r"ess must be a finite number > 0"),
    ("ivon_hess_init", lambda: IVON(net().parameters(), 10, lr=0.1, hess_init=math.inf), r"hess_init must be a finite"),
    ("ivon_weight_decay", lambda: IVON(net().parameters(), 10, lr=0.1, weight_decay=math.inf), r"weight_decay must be a fin"),
    ("vi_init_scale", lambda: VariationalInference(net(), init_scale=math.inf), r"init_scale must be a finite"),
    ("vi_prior_scale", lambda: VariationalInference(net(), prior_scale=math.inf), r"prior_scale must be a finite"),
    ("vi_kl_weight", lambda: VariationalInference(net(), kl_weight=math.inf), r"kl_weight must be a finite"),
    ("vi_kl_warmup", lambda: VariationalInference(net(), kl_warmup_epochs=math.inf), r"kl_warmup_epochs must be a fi"),
    ("ivon_kl_weight", lambda: IVONModule(net(), kl_weight=math.inf), r"kl_weight must be a finite number > 0"),
    ("gaussian_noise_nan", lambda: GaussianLikelihood(init_noise=math.nan), r"init_noise must be a finite number"),
    ("gaussian_noise_inf", lambda: GaussianLikelihood(init_noise=math.inf), r"init_noise must be a finite number"),
    ("bernstein_support", lambda: BernsteinVI(net(), support=(-1e308, 1e308)), r"support must be two finite numbers"),
    ("bernstein_support_len", lambda: BernsteinVI(net(), support=(-1, 1, 2)), r"support must be two finite numbers"),
    ("bernstein_support_int", lambda: BernsteinVI(net(), support=5), r"support must be two finite numbers"),
    ("tfb_interval", lambda: Bisection(0.0, math.inf), r"sigma_range \(the search interval\) must be two finite"),
    ("ssvi_density", lambda: SSVI(net(), density="0.1"), r"density must be a number in \(0, 1\]; got '0.1'"),
    # strings and other truthy values are not flags
    ("gaussian_flag", lambda: GaussianLikelihood(heteroscedastic="no"), r"heteroscedastic must be True or False"),
    ("vi_flag", lambda: VariationalInference(net(), mean_prediction="no"), r"mean_prediction must be True or False"),
    ("bernstein_flag", lambda: BernsteinVI(net(), joint="yes"), r"joint must be True or False; got 'yes'"),
    ("ensemble_flag", lambda: DeepEnsemble(net(), 2, vectorize="no"), r"vectorize must be True, False or 'auto'"),
    ("vbll_flag", lambda: VBLLClassifier(net(), 3, freeze_backbone="yes"), r"freeze_backbone must be True or False"),
    ("digits_flag", lambda: DigitsDataModule(flatten="no"), r"flatten must be True or False"),
    ("curve_flag", lambda: CurveTraining(line="no"), r"line must be True or False"),
    ("nsl_flag", lambda: NullSpaceLaplace(net(), accelerate="no"), r"accelerate must be True or False"),
    ("ssvi_flag", lambda: SSVI(net(), grow_noise_free="no"), r"grow_noise_free must be True or False"),
    ("blob_flag", lambda: BLoB(net(), kl_reweighting="no"), r"kl_reweighting must be True or False"),
    ("ivon_flag", lambda: IVONModule(net(), mean_prediction="no"), r"mean_prediction must be True or False"),
    ("subspace_flag", lambda: SubspaceInference(net(), bn_update="no"), r"bn_update must be True or False"),
    ("coefficient_flag", lambda: CoefficientPosterior(layer="x", plots="no"), r"plots must be True or False"),
    ("digits_download", lambda: DigitsDataModule(download="no"), r"download must be True or False"),
    # Formatter().parse(3) failed naming no argument: "TypeError: expected str, got int"
    ("text_prompt", lambda: RottenTomatoesDataModule("minilm", prompt=3), r"prompt must be None or a str, .*3 \(int\)"),
    ("subspace_seed", lambda: SubspaceInference(net(), seed=2**32), r"seed must be an int in \[-2\^32, 2\^32\)"),
    ("tfb_seed", lambda: TrainingFreeBayes(net(), seed=2**48), r"seed must be an int in \[-2\^48, 2\^48\)"),
    ("seed_below", lambda: check_seed(-(2**62) - 1), r"seed must be an int in \[-2\^62, 2\^62\)"),
    ("diagonal_scale", lambda: DiagonalGaussian(3, init_scale=math.inf), r"init_scale must be a finite number"),
    ("split_string", lambda: check_split_fractions("0.1", 0.2), r"val_fraction and test_fraction must be"),
    ("split_none", lambda: check_split_fractions(0.1, None), r"val_fraction and test_fraction must be"),
    # seeds: a float failed inside torch ("manual_seed expected a long") or much later
    ("ssvi_seed", lambda: SSVI(net(), seed=1.5), r"seed must be an int in \[-2\^62, 2\^62\); got 1.5"),
    ("viking_seed", lambda: VIKING(net(), seed=2**48), r"seed must be an int in \[-2\^48, 2\^48\); got 2814"),
    ("curve_seed", lambda: CurveTraining(seed=2**70), r"seed must be an int in \[-2\^62, 2\^62\)"),
    ("coefficient_seed", lambda: CoefficientPosterior(layer="x", seed=1.5), r"seed must be an int"),
    ("nsl_seed", lambda: NullSpaceLaplace(net(), seed=1.5), r"seed must be an int"),
    # wrong shapes of arguments
    ("viking_phases", lambda: VIKING(net(), phase_epochs=5), r"phase_epochs must be three ints"),
    ("params_int", lambda: select_parameters(net(), 3), r"params must be a non-empty pattern or list of patterns"),
    ("curve_anchors", lambda: CurveTraining(anchors="ab", segments=3), r"anchors must be a list of checkpoint paths"),
    ("nsl_constraint", lambda: NullSpaceLaplace(net(), constraint=5), r"constraint must be one of .* or a callable"),
    ("viking_constraint", lambda: VIKING(net(), constraint=5), r"constraint must be one of .* or a callable"),
    ("likelihood_none", lambda: MAP(net(), likelihood=None), r"likelihood must be 'categorical', 'gaussian' or a Li"),
    ("likelihood_int", lambda: DeepEnsemble(net(), 2, likelihood=5), r"likelihood must be 'categorical', .*; got 5"),
    ("vbll_num_samples", lambda: VBLLClassifier(net(), 3, head="generative", num_samples=0), r"num_samples must be"),
    ("ensemble_frozen", lambda: DeepEnsemble(nn.ReLU(), 2), r"DeepEnsemble needs a backbone with trainable param"),
    ("coverage_level", lambda: regression_metrics(level=math.nan), r"level must lie in \(0, 1\); got nan"),
    ("empty_predictive", lambda: CategoricalPredictive(torch.zeros(0, 2, 3)), r"at least one sample and one output"),
    ("empty_gaussian", lambda: GaussianPredictive(torch.zeros(1, 2, 0), torch.ones(1, 2, 0)), r"at least one sample"),
    (
        "concatenate_batches",
        lambda: concatenate([CategoricalPredictive(torch.zeros(1, 2, 3)), CategoricalPredictive(torch.zeros(1, 4, 3))]),
        r"cannot concatenate predictives of different \[B, C\|D\]",
    ),
]


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_arguments_are_refused_by_name(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_large_finite_scales_start_without_overflow() -> None:
    """``log(expm1(1000))`` overflowed a float (``OverflowError: math range error``); softplus^-1(y) = y + log(1 - e^-y)."""
    likelihood = GaussianLikelihood(init_noise=1000.0)
    assert float(nn.functional.softplus(likelihood.raw_noise)) == pytest.approx(1000.0, rel=1e-12)
    model = VariationalInference(net(), init_scale=1000.0)
    scales = [layer.weight.scale for layer in model.variational_layers]
    assert all(torch.allclose(s, torch.full_like(s, 1000.0), rtol=1e-6) for s in scales)


def test_labels_beyond_the_networks_outputs_are_named_with_its_logit_count() -> None:
    """cross_entropy said "Target 7 is out of bounds", not that the network gives 3 logits."""
    with pytest.raises(RuntimeError, match=r"CategoricalLikelihood.loss expects labels in \[0, 3\)"):
        CategoricalLikelihood().loss(torch.zeros(2, 3), torch.tensor([1, 7]))
    per_example = torch.func.vmap(lambda o, y: CategoricalLikelihood().loss(o[None], y[None]))  # no range check there
    assert per_example(torch.zeros(2, 3), torch.tensor([0, 2])).shape == (2,)


def test_the_predictive_names_a_label_beyond_the_networks_outputs_and_refuses_integer_logits() -> None:
    """A network with 5 outputs on 10 classes' data failed in gather ("index 5 is out of bounds for dimension 1");
    integer logits failed in log_softmax ("not implemented for 'Long'")."""
    predictive = CategoricalPredictive(torch.randn(1, 2, 5))
    outputs = r"log_prob\(y\) expects labels in \[0, 5\) \(the network gives 5 outputs\); got 5"
    with pytest.raises(RuntimeError, match=outputs):
        predictive.log_prob(torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match=r"got -1"):
        predictive.log_prob(torch.tensor([-1, 2]))
    per_example = torch.func.vmap(lambda z, y: CategoricalPredictive(z[None, None]).log_prob(y[None]))  # unchecked
    assert per_example(torch.zeros(2, 5), torch.tensor([0, 4])).shape == (2, 1)
    with pytest.raises(ValueError, match=r"logits must be a floating-point tensor; got torch.int64"):
        CategoricalPredictive(torch.randint(0, 3, (1, 2, 5)))


def test_metrics_refuse_empty_batches_nan_targets_and_other_ood_flags() -> None:
    ece = ExpectedCalibrationError()
    ece.update(CategoricalPredictive(torch.zeros(1, 0, 3)), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ExpectedCalibrationError.compute needs at least one example"):
        ece.compute()  # was NaN
    coverage = IntervalCoverage()
    predictive = GaussianPredictive(torch.zeros(1, 4, 1), torch.ones(1, 4, 1))
    with pytest.raises(RuntimeError, match=r"IntervalCoverage.update got a NaN or infinite target"):
        coverage.update(predictive, torch.tensor([0.0, math.nan, 2.0, 0.0]))  # counted as outside: 0.75
    with pytest.raises(RuntimeError, match=r"IntervalCoverage.update got a NaN or infinite target"):
        coverage.update(predictive, torch.tensor([0.0, math.inf, 2.0, 0.0]))
    auroc = OODAUROC()
    with pytest.raises(RuntimeError, match=r"expects is_ood of 0 \(in-distribution\) and 1 \(OOD\) only"):
        auroc.update(CategoricalPredictive(torch.randn(1, 4, 3)), torch.tensor([0, -1, 1, 0]))
    with pytest.raises(RuntimeError, match=r"expects is_ood of 0 \(in-distribution\) and 1 \(OOD\) only"):
        auroc.update(CategoricalPredictive(torch.randn(1, 4, 3)), torch.tensor([0, 2, 1, 0]))


def test_split_errors_name_our_fractions_not_scikit_learns_arguments() -> None:
    with pytest.raises(ValueError, match=r"val_fraction=1e-06 and test_fraction=0.2 cannot split 1797 examples .*10 cl"):
        DigitsDataModule(val_fraction=1e-6).setup("fit")


def test_numpy_scalars_and_negative_seeds_are_still_accepted() -> None:
    """The checks take numbers and flags of numpy's types as Python's, and torch's negative seeds."""
    import numpy as np

    likelihood = GaussianLikelihood(output_dim=np.int64(2), init_noise=np.float32(0.5))
    assert likelihood.output_dim == 2
    model = VariationalInference(net(), kl_weight=np.float32(0.1), local_reparameterization=np.bool_(False))
    assert model.hparams.kl_weight == np.float32(0.1)
    NullSpaceLaplace(net(), seed=-1)
    check_seed(-(2**62))
    VIKING(net(), seed=2**40)


def test_the_label_check_is_skipped_when_a_transform_batches_the_labels_alone() -> None:
    """``_assert_async`` has no batching rule: labels vmapped over fixed logits (a sampled-label Fisher) failed."""
    outputs, labels = torch.zeros(3, 4), torch.tensor([[0, 1, 3], [2, 2, 1]])
    losses = torch.func.vmap(lambda y: CategoricalLikelihood().loss(outputs, y))(labels)
    torch.testing.assert_close(losses, torch.full((2,), math.log(4.0)))


def test_a_regression_table_with_one_missing_cell_or_one_training_row_is_refused(tmp_path) -> None:
    """A missing cell made its whole column NaN after standardising; one training row a NaN standard deviation."""
    from lightning_bayes.datamodules import UCIRegressionDataModule
    from lightning_bayes.datamodules.regression import load_regression_arrays, load_regression_frame

    frame = load_regression_frame("diabetes")
    holed = frame.copy()
    holed.loc[3, "age"] = float("nan")
    holed.to_csv(tmp_path / "diabetes.csv", index=False)
    with pytest.raises(ValueError, match=r"missing values \(rows per column: \{'age': 1\}\)"):
        load_regression_arrays("diabetes", tmp_path)
    holed.loc[3, "age"], holed.loc[[4, 7], "bmi"] = float("inf"), -float("inf")  # all targets were NaN after it
    holed.to_csv(tmp_path / "diabetes.csv", index=False)
    with pytest.raises(ValueError, match=r"infinite values \(rows per column: \{'age': 1, 'bmi': 2\}\); expected "
                       r"finite"):
        load_regression_arrays("diabetes", tmp_path)
    frame.head(5).to_csv(tmp_path / "diabetes.csv", index=False)
    small = UCIRegressionDataModule("diabetes", data_dir=str(tmp_path), val_fraction=0.4, test_fraction=0.4)
    with pytest.raises(ValueError, match=r"5 rows leave 1 for training .* standardising needs at least 2"):
        small.setup()


def test_a_shortened_mismatch_error_keeps_five_of_each_kind_and_counts_the_rest() -> None:
    from lightning_bayes.modules.base import _shortened

    five = ", ".join(f'"k{i}"' for i in range(5))
    head = "Error(s) in loading state_dict for MAP:"
    assert "in all" not in _shortened(f"{head}\n\tUnexpected key(s) in state_dict: {five}.")
    sizes = "".join(f"\n\tsize mismatch for w{i}: copying a param" for i in range(7))
    shortened = _shortened(f"Error(s) in loading state_dict for MAP:{sizes}")
    assert shortened.count("size mismatch for") == 5 and "... (7 size mismatches in all)" in shortened


@pytest.mark.parametrize(
    ("batch", "got"),
    [({"inputs": torch.zeros(4), "labels": 0}, r"a dict with keys \['inputs', 'labels'\]"),
     ((torch.zeros(4), 0, 1.0), "a list of 3")],  # default_collate makes a list of a tuple
)
def test_a_batch_that_is_not_an_x_y_pair_is_named(batch: Any, got: str) -> None:
    """A dict batch was unpacked to its keys (the network then met a str), a triple failed to unpack."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, num_sanity_val_steps=0)  # fmt: skip
    loader = DataLoader([batch] * 2, batch_size=2)
    for stage in (trainer.fit, trainer.validate, trainer.test):
        with pytest.raises(ValueError, match=rf"^MAP expects batches \(x, y\) .*; got {got}: give the loader"):
            stage(MAP(MLP(4, 3, hidden=[5])), loader)
    assert len(trainer.predict(MAP(MLP(4, 3, hidden=[5])), DataLoader([torch.zeros(4)] * 2, batch_size=2))) == 1
    module = MAP(MLP(4, 3, hidden=[5]))  # Lightning's summary passes example_input_array through the transfer hooks
    module.example_input_array = torch.zeros(2, 4)
    trainer.fit(module, DataLoader([(torch.zeros(4), 0)] * 2, batch_size=2))


def test_an_optimizer_or_scheduler_that_is_not_callable_is_named_at_construction() -> None:
    """A str was accepted and failed as the fit started: "'str' object is not callable"."""
    with pytest.raises(TypeError, match=r"^optimizer must be a callable taking the parameters .*; got 'adam'$"):
        MAP(MLP(4, 3, hidden=[5]), optimizer="adam")
    with pytest.raises(TypeError, match=r"^lr_scheduler must be None or a callable taking the optimiser .*got 'cos'$"):
        VIKING(MLP(4, 3, hidden=[5]), lr_scheduler="cos")


@pytest.mark.parametrize("outputs", [5, 20])
def test_a_network_of_another_width_than_the_datas_classes_is_named_before_training(outputs: int) -> None:
    """20 logits for digits' 10 classes trained and scored silently; 5 failed in gather ("index 5 is out of bounds")."""
    from lightning.pytorch import Trainer

    trainer = Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=rf"^MAP's network gives {outputs} outputs per example, but DigitsDataModule "
                                         r"has num_classes=10: give the network 10 outputs$"):
        trainer.fit(MAP(MLP(64, outputs, hidden=[8])), datamodule=DigitsDataModule())
    assert trainer.global_step == 0  # the sanity check's validation caught it


@pytest.mark.parametrize(
    "method",
    [MAP, VIKING, BernsteinVI, BLoB, SSVI, IVONModule, NullSpaceLaplace, SubspaceInference, TrainingFreeBayes,
     VariationalInference, lambda network: VBLLClassifier(network, 3), VBLLRegressor],
)
def test_a_network_argument_that_is_not_a_module_is_named(method: Callable[[Any], Any]) -> None:
    """MAP("mlp") was accepted and failed at the first forward ("'str' object is not callable"); others failed in an
    attribute lookup that named no argument."""
    with pytest.raises(ValueError, match=r"^(backbone|model) must be a network \(an nn.Module\); got str 'mlp'$"):
        method("mlp")


def test_a_backbone_that_keeps_its_head_is_told_to_drop_it() -> None:
    """MLP(4, 3, hidden=[5]) ends in its 3-way head while num_features says 5: the head met features [B, 3]."""
    module = VBLLClassifier(MLP(4, 3, hidden=[5]), 3)
    with pytest.raises(ValueError, match=r"expects features \[B, 5\], B >= 1; got \(2, 3\) \(does the backbone "
                                         r"still end in its classification head\? build it without one: out_features"):
        module.predictive(torch.zeros(2, 4))
