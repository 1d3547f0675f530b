"""Rotten Tomatoes datamodule: corpus counts, movie-grouped seeded splits, OOD / shift sets, collation."""

import pickle
import re
from pathlib import Path

import pytest
import torch

from lightning_bayes.datamodules import RottenTomatoesDataModule
from lightning_bayes.datamodules.text import load_amazon_reviews, load_rotten_tomatoes

PROMPT = "Review: {text}\nSentiment:"


@pytest.fixture(scope="module")
def corpus():
    return load_rotten_tomatoes()


@pytest.fixture(scope="module")
def data() -> RottenTomatoesDataModule:
    module = RottenTomatoesDataModule(tokenizer="minilm", batch_size=4, seed=0)
    module.setup()
    return module


def test_corpus_counts_after_dropping_empty_and_duplicate_texts(corpus):
    assert corpus["category"].value_counts().to_dict() == {"fresh": 7368, "rotten": 5384, "plot": 1083}
    assert corpus[corpus["category"] != "plot"]["movie_name"].nunique() == 507
    assert corpus["text"].is_unique and corpus["text"].notna().all()


def test_shift_set_is_the_amazon_test_reviews():
    amazon = load_amazon_reviews()
    assert len(amazon) == 1000 and amazon["label"].sum() == 658 and set(amazon["label"]) == {0, 1}


def test_splits_share_no_movie_and_cover_every_snippet(data: RottenTomatoesDataModule, corpus):
    assert (data.task, data.num_classes) == ("classification", 2)
    movie_of = dict(zip(corpus["text"], corpus["movie_name"]))
    label_of = dict(zip(corpus["text"], corpus["category"]))
    splits = {"train": data.train_set, "val": data.val_set, "test": data.test_set}
    movies = {name: {movie_of[t] for t in s.texts} for name, s in splits.items()}
    assert not (movies["train"] & movies["val"] or movies["train"] & movies["test"] or movies["val"] & movies["test"])
    # GroupShuffleSplit rounds the held-out movie counts up: ceil(0.2 * 507) = 102, ceil(0.125 * 405) = 51
    assert [len(m) for m in movies.values()] == [354, 51, 102]
    assert sum(len(s) for s in splits.values()) == 12752 and data.num_train == len(data.train_set)
    for s in splits.values():
        assert s.labels.tolist() == [int(label_of[t] == "fresh") for t in s.texts]
    assert len(data.ood_set) == 1083 and all(label_of[t] == "plot" for t in data.ood_set.texts)


def test_splits_depend_on_the_seed_only(data: RottenTomatoesDataModule):
    again = RottenTomatoesDataModule(tokenizer="minilm", seed=0)
    again.setup()
    other = RottenTomatoesDataModule(tokenizer="minilm", seed=1)
    other.setup()
    assert again.test_set.texts == data.test_set.texts and other.test_set.texts != data.test_set.texts


def test_max_train_keeps_a_seeded_subset(data: RottenTomatoesDataModule):
    small = RottenTomatoesDataModule(tokenizer="minilm", max_train=50)
    small.setup()
    assert small.num_train == 50 and set(small.train_set.texts) <= set(data.train_set.texts)
    assert small.test_set.texts == data.test_set.texts


def test_max_test_keeps_seeded_subsets_of_the_test_and_ood_sets(data: RottenTomatoesDataModule):
    small = RottenTomatoesDataModule(tokenizer="minilm", max_test=100)
    small.setup()
    again = RottenTomatoesDataModule(tokenizer="minilm", max_test=100)
    again.setup()
    assert len(small.test_set) == len(small.ood_set) == 100
    assert set(small.test_set.texts) < set(data.test_set.texts) and set(small.ood_set.texts) < set(data.ood_set.texts)
    # a random subset (the first 100 would be a handful of movies), the same at every setup
    assert small.test_set.texts != data.test_set.texts[:100] and small.ood_set.texts != data.ood_set.texts[:100]
    assert small.test_set.texts == again.test_set.texts and small.ood_set.texts == again.ood_set.texts
    assert small.train_set.texts == data.train_set.texts and small.val_set.texts == data.val_set.texts
    whole = RottenTomatoesDataModule(tokenizer="minilm", max_test=5000)
    whole.setup()
    assert whole.test_set.texts == data.test_set.texts and whole.ood_set.texts == data.ood_set.texts


@pytest.mark.llm
def test_collated_batch_is_the_tokenizer_dict_and_labels():
    data = RottenTomatoesDataModule(tokenizer="minilm", batch_size=4, max_length=32, padding_side="right")
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == x["attention_mask"].shape
    assert x["input_ids"].shape[0] == 4 and x["input_ids"].shape[1] <= 32
    assert y.shape == (4,) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    tokenizer = data.tokenizer
    assert (x["input_ids"][:, 0] == tokenizer.cls_token_id).all()  # right padding: [CLS] first
    lengths = x["attention_mask"].sum(1)
    assert lengths.max() == x["input_ids"].shape[1]  # padded to the batch's longest text only
    first = next(iter(data.train_dataloader()))[1]
    assert torch.equal(first, y)  # the seeded shuffle repeats


@pytest.mark.llm
def test_left_padding_and_prompt_keep_the_prompt_end_last():
    data = RottenTomatoesDataModule(tokenizer="minilm", batch_size=8, max_length=16, prompt=PROMPT, padding_side="left")
    data.setup()
    texts = [t for t in data.test_set.texts if len(t.split()) > 30][:2] + data.test_set.texts[:6]
    x, _ = data.collate([(t, torch.tensor(1)) for t in texts])
    tokenizer = data.tokenizer
    assert x["input_ids"].shape == (8, 16)
    assert (x["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with a real token
    assert (x["input_ids"][:, -1] == tokenizer.sep_token_id).all()
    for row in range(8):  # left truncation keeps the prompt's last word
        kept = x["input_ids"][row][x["attention_mask"][row].bool()]
        assert tokenizer.decode(kept, skip_special_tokens=True).endswith("sentiment :")
    ood_x, _ = next(iter(data.ood_dataloader()))
    assert ood_x["input_ids"].shape[0] == 8


class _RunningTrainer:
    """Stands for a trainer in a fit: its loader iterator cannot be pickled (torch raises there)."""

    def __reduce__(self):
        raise TypeError("a running loader iterator cannot be pickled")


@pytest.mark.llm
@pytest.mark.parametrize("padding_side", ["left", None])
def test_a_spawned_loader_worker_collates_the_batch_of_the_main_process(padding_side: str | None):
    """The collate was the datamodule's bound method: a "spawn" or "forkserver" worker pickled the datamodule with its
    trainer and running iterator (``NotImplementedError: _StatefulMultiProcessingDataLoaderIter cannot be pickled``)."""
    from torch.utils.data import DataLoader

    data = RottenTomatoesDataModule(tokenizer="minilm", max_length=12, prompt=PROMPT, padding_side=padding_side)
    data.trainer = _RunningTrainer()  # type: ignore[assignment]
    examples = [("a fine film", torch.tensor(1)), ("a long and very dull film that never ends", torch.tensor(0)),
                ("meh", torch.tensor(0)), ("one of the year's best", torch.tensor(1))]  # fmt: skip
    collate = data.collate_fn()
    assert len(pickle.dumps(collate)) < 1000  # settings only: the tokenizer is loaded again in the worker
    spawned = DataLoader(examples, batch_size=4, collate_fn=collate, num_workers=1, multiprocessing_context="spawn")
    (x, y), (x_here, y_here) = next(iter(spawned)), data.collate(examples)
    assert x.keys() == x_here.keys() and all(torch.equal(x[k], x_here[k]) for k in x) and torch.equal(y, y_here)
    assert x["input_ids"].shape == (4, 12)  # the longest text was truncated to max_length


@pytest.mark.llm
def test_the_default_padding_side_is_the_tokenizers_own():
    """The default was "left" for every tokenizer, which gave MiniLM (BERT: classifies from its first token) a
    padding token there and logits that depended on the batch."""
    data = RottenTomatoesDataModule(tokenizer="minilm", batch_size=4, max_length=32)
    x, _ = data.collate([("a fine film", torch.tensor(1)), ("a long and very dull film indeed", torch.tensor(0))])
    assert data.tokenizer.padding_side == "right" and (x["attention_mask"][:, 0] == 1).all()


@pytest.mark.llm
def test_shift_dataloader_serves_the_amazon_reviews():
    data = RottenTomatoesDataModule(tokenizer="minilm", batch_size=1000, max_length=8)
    data.setup()
    x, y = next(iter(data.shift_dataloader()))
    assert x["input_ids"].shape == (1000, 8) and y.sum().item() == 658


@pytest.mark.parametrize(
    "kwargs, message",
    [({"prompt": "Sentiment:"}, "prompt must be a format string whose only field is {text}"),
     ({"prompt": "{text} {label}"}, "only field is {text}"),
     ({"padding_side": "middle"}, "padding_side must be 'left', 'right' or None"),
     ({"max_train": 0}, "max_train must be None or an int >= 1"),
     ({"max_test": 0.5}, "max_test must be None or an int >= 1; got 0.5"),
     ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction and test_fraction")],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        RottenTomatoesDataModule(tokenizer="minilm", **kwargs)


def test_fractions_that_leave_no_training_movie_are_named():
    """scikit-learn's ValueError named its own test_size and n_samples, not val_fraction and test_fraction."""
    data = RottenTomatoesDataModule(tokenizer="minilm", val_fraction=0.001, test_fraction=0.998)
    with pytest.raises(ValueError, match=r"^val_fraction=0.001 and test_fraction=0.998 cannot split the 507 movies "
                                         r"into non-empty train / val / test parts \(scikit-learn: "):
        data.setup()


def test_data_dir_without_the_corpus_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"holds no rotten_tomatoes_corpus_full.csv.bz2"):
        RottenTomatoesDataModule(tokenizer="minilm", data_dir=str(tmp_path)).setup()


def test_a_max_length_the_prompt_fills_is_refused():
    """Truncation kept the prompt's end alone: every example became the same input and training went on silently."""
    data = RottenTomatoesDataModule(tokenizer="minilm", max_length=4, prompt=PROMPT, padding_side="left")
    with pytest.raises(ValueError, match=r"max_length=4 leaves no token for the text: the prompt .* takes \d+"):
        data.setup()
    fixed = len(data.tokenizer(PROMPT.format(text=""))["input_ids"])
    RottenTomatoesDataModule(tokenizer="minilm", max_length=fixed + 1, prompt=PROMPT, padding_side="left").setup()


def test_a_max_length_the_special_tokens_fill_is_refused_without_a_prompt():
    """MiniLM's [CLS] and [SEP] take max_length=2 whole: every example was [CLS] [SEP]."""
    with pytest.raises(ValueError, match=r"max_length=2 leaves no token for the text: the prompt None .* takes 2"):
        RottenTomatoesDataModule(tokenizer="minilm", max_length=2, padding_side="right").setup()


def test_a_tokenizer_that_cannot_be_loaded_names_the_argument_and_the_offline_aliases(tmp_path):
    """transformers' OSError (after the hub's retries, about 60 s offline) named neither ``tokenizer`` nor the
    aliases."""
    missing = str(tmp_path / "no-tokenizer")
    expected = rf"tokenizer='{re.escape(missing)}' could not be loaded: the packaged models \['minilm'"
    with pytest.raises(OSError, match=expected):
        _ = RottenTomatoesDataModule(tokenizer=missing).tokenizer
