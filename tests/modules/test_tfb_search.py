"""TrainingFreeBayes: the search as Lightning epochs on a tiny peft LoRA model, the predictive, exact resumption."""

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import (
    DataLoader, DistributedSampler, IterableDataset, SubsetRandomSampler, TensorDataset, WeightedRandomSampler,
)

from lightning_bayes.modules.training_free_bayes import TrainingFreeBayes


class _TwoLayerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def _lora_model(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_TwoLayerNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["hidden", "out"]))
    with torch.no_grad():  # a "trained" adapter: peft starts B at zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model


def _loader(size: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(size, 6, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (size,), generator=generator)), batch_size=16)


def _trainer(tmp_path: Path, epochs: int, callbacks: list | None = None) -> Trainer:
    return Trainer(
        callbacks=callbacks, enable_checkpointing=callbacks is not None,
        max_epochs=epochs, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
    )


def _module(**options) -> TrainingFreeBayes:
    return TrainingFreeBayes(_lora_model(), sigma_range=(1e-3, 2.0), tolerance=0.01, search_samples=2, **options)


def test_canonical_factors_keep_the_trained_function(single_thread):
    module = _module()
    x = torch.randn(5, 6)
    # B' A' = B A in float32 (SVD in float64): outputs agree to rounding
    torch.testing.assert_close(module(x), module.model(x), atol=1e-5, rtol=0)
    at_zero = module.predictive(x, num_samples=3, sigma=0.0)
    torch.testing.assert_close(at_zero.probs, torch.softmax(module.model(x), -1), atol=1e-6, rtol=0)


def change(module: TrainingFreeBayes, s: float, size: int = 64) -> float:
    """The search's criterion recomputed outside the Trainer over every anchor example, with the search's draws."""
    reference, noisy = 0.0, 0.0
    for index, (x, _) in enumerate(_loader(size)):
        with torch.no_grad():
            logits = module(x)
            labels = logits.argmax(-1)
            reference += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            pair = module.noise.antithetic_pair(s, module._generator(1 + index))
            draws = torch.stack([torch.func.functional_call(module.model, weights, (x,)) for weights in pair])
            noisy += -module.likelihood.predictive(draws).log_prob(labels).sum().item()
    return abs(noisy - reference) / reference


def test_each_epoch_tests_one_candidate_on_every_batch_starting_from_the_upper_end(tmp_path, single_thread):
    logged: list[tuple[float, float]] = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            metrics = trainer.callback_metrics
            logged.append((float(metrics["train/candidate"]), float(metrics["train/relative_nll_change"])))

    module = _module()
    with pytest.warns(UserWarning, match="no tested sigma met"):
        _trainer(tmp_path, epochs=2, callbacks=[Record()]).fit(module, train_dataloaders=_loader())
    assert [candidate for candidate, _ in logged] == pytest.approx([2.0, (1e-3 + 2.0) / 2])  # high, then the midpoint
    for candidate, relative_change in logged:
        assert relative_change == pytest.approx(change(module, candidate), rel=1e-5)


def test_every_anchor_example_weighs_alike_when_the_last_batch_is_smaller(tmp_path, single_thread):
    """70 examples in batches of 16: the sum of per-batch means weighed each of the last batch's 6 examples 16/6
    times as much as the others (relative change 15.37 against the examples' 15.16 at sigma = 2 here)."""
    logged: list[float] = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            logged.append(float(trainer.callback_metrics["train/relative_nll_change"]))

    module = _module()
    with pytest.warns(UserWarning, match="no tested sigma met"):
        _trainer(tmp_path, epochs=1, callbacks=[Record()]).fit(module, train_dataloaders=_loader(70))
    assert logged == [pytest.approx(change(module, 2.0, size=70), rel=1e-5)]


def test_search_finds_the_largest_sigma_within_tolerance(tmp_path, single_thread):
    module = _module()
    _trainer(tmp_path, epochs=8).fit(module, train_dataloaders=_loader())
    sigma = float(module.sigma)
    assert 1e-3 < sigma < 2.0 and bool(module.tested_high)
    assert change(module, sigma) <= 0.01
    assert change(module, float(module.high)) > 0.01  # the bracket's upper end failed the test
    assert float(module.high) - sigma <= (2.0 - 1e-3) / 2**6  # 7 bisection steps after the test of high


def test_resumed_search_matches_an_uninterrupted_one(tmp_path, single_thread):
    full = _module()
    _trainer(tmp_path / "full", epochs=8).fit(full, train_dataloaders=_loader())
    first = _module()
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    # after 2.0, 1.0, 0.501 none so far: the epochs, not only the range or the tolerance, are what to change
    expected = r"in 3 epochs \(the last failed at 0\.501; .* halves the bracket \[0\.001, 0\.501\]\).*train more epochs"
    with pytest.warns(UserWarning, match=expected):
        _trainer(tmp_path, epochs=3, callbacks=[saver]).fit(first, train_dataloaders=_loader())
    assert float(first.high) > float(full.high)  # three of eight candidates tested: the bracket is still wider
    resumed = _module()
    _trainer(tmp_path, epochs=8).fit(resumed, train_dataloaders=_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert float(full.sigma) > 1e-3  # the search found a feasible sigma after resuming
    for name in ("sigma", "low", "high", "tested_high", "done"):
        assert float(getattr(resumed, name)) == float(getattr(full, name)), name
    x = torch.randn(4, 6)
    torch.testing.assert_close(resumed.predictive(x).probs, full.predictive(x).probs, atol=0, rtol=0)


def test_a_search_with_no_feasible_candidate_warns(tmp_path, single_thread):
    module = TrainingFreeBayes(_lora_model(), sigma_range=(0.5, 2.0), tolerance=1e-6, search_samples=2)
    with pytest.warns(UserWarning, match="no tested sigma met tolerance=1e-06"):
        _trainer(tmp_path, epochs=2).fit(module, train_dataloaders=_loader())
    assert float(module.sigma) == 0.5
    assert float(module.trainer.callback_metrics["train/sigma_high"]) == float(module.high) == 1.25  # the bracket
    smoke = TrainingFreeBayes(_lora_model(), sigma_range=(0.5, 2.0), tolerance=1e-6, search_samples=2)
    with warnings.catch_warnings():  # a fast_dev_run is too short by design: no advice to train longer
        warnings.filterwarnings("error", message=".*no tested sigma met")
        Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False).fit(smoke, train_dataloaders=_loader())


def test_a_search_whose_upper_end_passes_stays_there_for_the_remaining_epochs(tmp_path, single_thread):
    """The first candidate, ``high``, meets the tolerance: the search is done with ``low = high``, and the epochs
    after it (a config's ``max_epochs`` is a budget) keep that result instead of rebuilding a closed interval."""
    module = TrainingFreeBayes(_lora_model(), sigma_range=(1e-5, 1e-4), tolerance=0.05, search_samples=2)
    _trainer(tmp_path, epochs=3).fit(module, train_dataloaders=_loader())
    assert bool(module.done) and float(module.sigma) == float(module.low) == float(module.high) == 1e-4
    assert change(module, 1e-4) <= 0.05


@pytest.mark.parametrize("sampler", ["shuffle", SubsetRandomSampler, WeightedRandomSampler, DistributedSampler])
def test_a_shuffling_training_loader_is_refused(tmp_path, sampler):
    """Each epoch's candidate was scored on other anchor batches (and other draws per example): a scale rejected on
    one batch passed on another, and the search returned 0.028 where the fixed anchors give 0.040."""
    data = _loader().dataset
    if sampler == "shuffle":
        shuffled = DataLoader(data, batch_size=16, shuffle=True)
    elif sampler is DistributedSampler:  # a shuffling one refused, an ordered one taken
        ordered = DataLoader(data, batch_size=16, sampler=DistributedSampler(data, 1, 0, shuffle=False))
        Trainer(max_epochs=1, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                default_root_dir=tmp_path).fit(_module(), train_dataloaders=ordered)
        shuffled = DataLoader(data, batch_size=16, sampler=DistributedSampler(data, 1, 0, shuffle=True))
    else:
        drawn = sampler(range(len(data))) if sampler is SubsetRandomSampler else sampler([1.0] * len(data), len(data))
        shuffled = DataLoader(data, batch_size=16, sampler=drawn)
    refusal = r"^TrainingFreeBayes scores every candidate .* the training loader shuffles"
    with pytest.raises(ValueError, match=refusal) as refused:
        _trainer(tmp_path, epochs=2).fit(_module(), train_dataloaders=shuffled)
    under_ddp = "a loader of yours needs sampler=DistributedSampler(dataset, shuffle=False))"
    assert str(refused.value).endswith(under_ddp) == (sampler is DistributedSampler)  # the way out for Lightning's


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(_loader().dataset)


def test_a_step_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^TrainingFreeBayes takes no optimiser steps .* an epoch of 4 batches"):
        Trainer(max_steps=3, logger=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(
            _module(), train_dataloaders=_loader())
    # an unsized loader: no number of epochs would do, the pass itself is what to bound (it said "an epoch of inf")
    with pytest.raises(ValueError, match=r"has no length, so max_steps=3 .* --trainer.limit_train_batches N$"):
        Trainer(max_steps=3, logger=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(
            _module(), train_dataloaders=DataLoader(_Stream(), batch_size=16))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="low < high"):
        TrainingFreeBayes(_lora_model(), sigma_range=(0.1, 0.01))
    with pytest.raises(ValueError, match="search_samples must be an even int"):
        TrainingFreeBayes(_lora_model(), search_samples=3)
    with pytest.raises(ValueError, match="tolerance"):
        TrainingFreeBayes(_lora_model(), tolerance=0.0)
    with pytest.raises(ValueError, match="lora_A"):
        TrainingFreeBayes(_lora_model(), params="*lora_B*")


def test_an_untrained_adapter_is_refused_before_the_search(tmp_path):
    """peft starts B at zero: every candidate then passed and the 'posterior' had no spread."""
    model = _lora_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    module = TrainingFreeBayes(model, sigma_range=(1e-3, 2.0), search_samples=2)
    with pytest.raises(ValueError, match="every selected LoRA pair has B = 0 .* pass the trained LoRA as checkpoint="):
        _trainer(tmp_path, 1).fit(module, train_dataloaders=_loader())
