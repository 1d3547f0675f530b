"""transformers backbones with optional peft LoRA and an optional 4-bit NF4 base (bitsandbytes).

* ``HFSequenceClassifier``: an encoder (e.g. all-MiniLM-L6-v2) with a classification head; logits ``[B, C]``.
* ``CausalLMAnswerClassifier``: a causal LM (e.g. SmolLM2) scoring answer words: the next-token logits at
  the last position restricted to the answer tokens, ``[B, C]`` (left padding puts the last real token
  last). ``features(x)`` gives that position's last hidden state, for heads such as VBLL.

Both take the tokenizer's dict ``x = {"input_ids", "attention_mask"}`` as their one forward argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .pretrained import resolve_pretrained


@dataclass
class LoraSpec:
    """peft ``LoraConfig`` essentials (Hu et al., 2022): rank, scaling alpha, dropout, target modules."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def _quantisation_config(load_in_4bit: bool) -> dict:
    if not load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit=True needs a CUDA device (bitsandbytes NF4); none is available")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError("load_in_4bit=True needs bitsandbytes: pip install 'lightning-bayes[llm]'") from error
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def _apply_lora(model: nn.Module, lora: LoraSpec | None, task_type: str, keep: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` with peft LoRA; only LoRA matrices (and the ``keep`` modules) stay trainable."""
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        modules_to_save=keep,
    )
    return get_peft_model(model, config)


class HFSequenceClassifier(nn.Module):
    """``AutoModelForSequenceClassification`` returning logits; ``model`` is a folder, hub id or alias."""

    def __init__(
        self,
        model: str = "minilm",
        num_labels: int = 2,
        lora: LoraSpec | None = None,
        load_in_4bit: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2; got {num_labels}")
        base = AutoModelForSequenceClassification.from_pretrained(
            resolve_pretrained(model), num_labels=num_labels, **_quantisation_config(load_in_4bit)
        )
        self.num_features = base.config.hidden_size
        self.model = _apply_lora(base, lora, "SEQ_CLS")

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits


class CausalLMAnswerClassifier(nn.Module):
    """Scores ``answer_words`` as the next token after the prompt: logits ``[B, len(answer_words)]``."""

    def __init__(
        self,
        model: str = "smollm2",
        answer_words: list[str] = [" negative", " positive"],  # noqa: B006 - read only
        lora: LoraSpec | None = None,
        load_in_4bit: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if len(answer_words) < 2:
            raise ValueError(f"answer_words needs at least two words; got {answer_words}")
        folder = resolve_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = []
        for word in answer_words:
            tokens = tokenizer.encode(word, add_special_tokens=False)
            if len(tokens) != 1:
                raise ValueError(f"answer word {word!r} is {len(tokens)} tokens {tokens}; each must be exactly one token")
            ids.append(tokens[0])
        self.register_buffer("answer_ids", torch.tensor(ids), persistent=False)
        base = AutoModelForCausalLM.from_pretrained(folder, **_quantisation_config(load_in_4bit))
        self.num_features = base.config.hidden_size
        self.model = _apply_lora(base, lora, "CAUSAL_LM")

    def _last_hidden(self, x: dict[str, Tensor]) -> Tensor:
        out = self.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], output_hidden_states=True)
        return out.hidden_states[-1][:, -1]

    def features(self, x: dict[str, Tensor]) -> Tensor:
        """Last-token final hidden state ``[B, hidden]`` (after the final norm)."""
        return self._last_hidden(x)

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        out = self.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], logits_to_keep=1)
        return out.logits[:, -1, self.answer_ids]
