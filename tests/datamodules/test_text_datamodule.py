import pytest
import torch

from lightning_bayes.datamodules import RottenTomatoesDataModule
from lightning_bayes.datamodules.text import load_amazon_reviews, load_rotten_tomatoes

pytestmark = pytest.mark.llm


def test_corpus_counts_after_deduplication():
    frame = load_rotten_tomatoes()
    counts = frame["category"].value_counts().to_dict()
    assert counts == {"fresh": 7368, "rotten": 5384, "plot": 1083}
    assert frame[frame["category"] != "plot"]["movie_name"].nunique() == 507
    amazon = load_amazon_reviews()
    assert len(amazon) == 1000 and amazon["label"].sum() == 658


def test_splits_share_no_movie_and_cover_every_snippet():
    data = RottenTomatoesDataModule(tokenizer="minilm", seed=0)
    data.setup()
    frame = load_rotten_tomatoes()
    movie_of = dict(zip(frame["text"], frame["movie_name"]))
    movies = {name: {movie_of[t] for t in data.splits[name].texts} for name in ("train", "val", "test")}
    assert not (movies["train"] & movies["val"]) and not (movies["train"] & movies["test"]) and not (movies["val"] & movies["test"])
    assert sum(len(data.splits[n]) for n in ("train", "val", "test")) == 12752
    assert len(data.splits["ood"]) == 1083 and len(data.splits["shift"]) == 1000
    other = RottenTomatoesDataModule(tokenizer="minilm", seed=1)
    other.setup()
    assert data.splits["test"].texts != other.splits["test"].texts


def test_collated_batch_is_the_tokenizer_dict_and_labels():
    data = RottenTomatoesDataModule(tokenizer="minilm", batch_size=4, max_length=32, padding_side="right", max_train=50)
    x, y = next(iter(data.train_dataloader()))
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape[0] == 4 and x["input_ids"].shape[1] <= 32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert data.num_train == 50
    assert x["input_ids"][0, 0].item() == data.tokenizer.cls_token_id  # right padding: CLS first


def test_prompt_must_hold_the_text_field():
    with pytest.raises(ValueError, match="prompt must contain"):
        RottenTomatoesDataModule(prompt="Sentiment:")
