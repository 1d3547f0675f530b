"""transformers backbones with optional peft LoRA and an optional 4-bit NF4 base (bitsandbytes).

* :class:`HFSequenceClassifier`: an encoder such as
  all-MiniLM-L6-v2 with a classification head; logits ``[B, num_labels]``.
* :class:`CausalLMAnswerClassifier`: a causal LM such as SmolLM2 scoring answer words, i.e. the
  next-token logits after the prompt restricted to the answer tokens, ``[B, C]``; ``features(x)`` is
  the last token's final hidden state, for heads such as VBLL.

Both take the tokenizer's dict ``x = {"input_ids", "attention_mask"}`` as their one forward argument.
LoRA (Hu et al., 2022) freezes the base and trains ``W + (alpha / r) B A`` with ``A: r x in``,
``B: out x r``, i.e. ``r (in + out)`` parameters per adapted linear layer. 4-bit loading stores the
frozen base in NF4 (Dettmers et al., 2023, QLoRA) and computes in bfloat16. A frozen base (LoRA, 4-bit) stays
out of state dicts and checkpoints (:mod:`.frozen_base`): the constructor rebuilds it from the pretrained source.
Their forward passes keep cuDNN's attention kernel out (:mod:`.attention`: NaN gradients under a padding mask).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import Tensor, nn

from ..extras import needs_extra
from ..torch_func_state import mapped_by_vmap, plain_values
from .attention import without_cudnn_attention
from .frozen_base import exclude_frozen_base
from .pretrained import named_in_load_errors, resolve_pretrained
from .vocabulary import folder_vocabulary, vocabulary_fingerprint

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

_Model = TypeVar("_Model", bound=nn.Module)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CLASSIFICATION_HEADS = ("classifier", "score")  # transformers' names of a sequence classifier's fresh head


@dataclass
class LoraSpec:
    """peft ``LoraConfig`` essentials.

    Args:
        r: rank of the adapters.
        alpha: scaling; the LoRA scale is ``alpha / r``.
        dropout: dropout on the adapter input.
        target_modules: names (or dotted name suffixes) of the linear layers to adapt.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:  # peft's LoraConfig accepts all of these and fails later, if at all
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraSpec: r must be an int >= 1; got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraSpec: alpha must be a number > 0; got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec: dropout must lie in [0, 1); got {self.dropout!r}")
        if isinstance(self.target_modules, str):  # iterated, a str is its letters
            raise ValueError(
                f"LoraSpec: target_modules must be a list of layer names, e.g. [{self.target_modules!r}]; got the str "
                f"{self.target_modules!r} (peft reads a str as a regular expression; LoraSpec takes names)"
            )
        if not self.target_modules or not all(isinstance(name, str) and name for name in self.target_modules):
            raise ValueError(
                f"LoraSpec: target_modules must be a non-empty list of layer names; got {self.target_modules!r}"
            )


def quantisation_kwargs(load_in_4bit: bool, full_precision: Sequence[str] = ()) -> dict[str, Any]:
    """``from_pretrained`` arguments for an NF4 base (empty when not 4-bit): on the current CUDA device, or on the
    CPU where the installed bitsandbytes has a CPU backend (``bitsandbytes.backends.cpu``; NF4 runs there, slower).
    The modules named in ``full_precision`` stay as they are (a classification head the checkpoint lacks: quantised
    before it was initialised, BERT's ``classifier`` was a ``Linear4bit`` without a quantisation state, which failed
    at the first forward)."""
    if not load_in_4bit:
        return {}
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError("load_in_4bit=True needs bitsandbytes: pip install bitsandbytes")
    if torch.cuda.is_available():
        device: int | str = torch.cuda.current_device()
    elif importlib.util.find_spec("bitsandbytes.backends.cpu") is not None:
        device = "cpu"
    else:
        raise RuntimeError(
            "load_in_4bit=True needs a CUDA device or a bitsandbytes with a CPU backend (bitsandbytes.backends.cpu); "
            "this machine has no CUDA device and the installed bitsandbytes has none: upgrade it, or load_in_4bit=False"
        )
    with needs_extra("llm"):
        from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(full_precision) or None,  # None: transformers' own choice (the LM head)
    )
    return {"quantization_config": config, "device_map": {"": device}}


def keep_cpu_four_bit_differentiable(model: _Model) -> _Model:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference at its first forward in eval
    mode (a validation pass), after which ``matmul_4bit`` takes ``gemv_4bit``, which has no backward: every LoRA
    whose gradient passes through a base layer then silently stops training. Turn that repacking off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010  # an attribute nn.Module's typing lacks
    return model


def apply_lora(model: nn.Module, lora: LoraSpec | Mapping[str, Any], task_type: str) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters; the base is frozen, the adapters (and, for
    ``task_type="SEQ_CLS"``, the classification head) are trainable. ``lora``: a :class:`LoraSpec`, or a dict of its
    fields (as a config writes it)."""
    with needs_extra("llm"):
        from peft import LoraConfig, get_peft_model
        from transformers.pytorch_utils import Conv1D

    if isinstance(lora, Mapping):
        lora = LoraSpec(**lora)
    elif not isinstance(lora, LoraSpec):
        raise ValueError(
            f"lora must be a LoraSpec or a dict of its fields (r, alpha, dropout, target_modules); got {lora!r}"
        )

    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)  # peft's
    layers = [name for name, module in model.named_modules() if isinstance(module, adaptable)]
    unmatched = [t for t in lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in layers)]
    if unmatched or not lora.target_modules:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise ValueError(
            f"lora.target_modules={lora.target_modules} has names matching no layer of {type(model).__name__} that "
            f"LoRA adapts (linear, embedding, convolution): {unmatched}; those layers are named {leaves}"
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, config)


def _unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    base = cast("PeftModel", model).get_base_model() if hasattr(model, "get_base_model") else model
    return cast("PreTrainedModel", base)


def _check_tokens(x: Any) -> None:
    if not isinstance(x, Mapping) or "input_ids" not in x or "attention_mask" not in x:
        found = sorted(x) if isinstance(x, Mapping) else type(x).__name__
        raise ValueError(f"x must be the tokenizer's dict with 'input_ids' and 'attention_mask'; got {found}")


class HFSequenceClassifier(nn.Module):
    """``AutoModelForSequenceClassification`` as a backbone: ``forward(x)`` gives logits ``[B, num_labels]``.

    Args:
        model: a packaged alias (``"minilm"``), a folder or a hub id.
        num_labels: classes of the fresh classification head.
        lora: adapters to train; the encoder is then frozen and only the adapters and the head train (BERT-style
            layers are named ``query``/``key``/``value``/``dense``, so pass e.g.
            ``LoraSpec(target_modules=["query", "value"])``).
        load_in_4bit: load the base in NF4 (bitsandbytes) with bfloat16 compute.

    An encoder (a masked-LM architecture such as BERT, which classifies from its first token) refuses left-padded
    batches: its first position would be padding and every position shifted, so a text's logits would depend on
    its batch.
    """

    def __init__(
        self,
        model: str = "minilm",
        num_labels: int = 2,
        lora: LoraSpec | None = None,
        load_in_4bit: bool = False,
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1; got {num_labels}")
        quantisation = quantisation_kwargs(load_in_4bit, full_precision=_CLASSIFICATION_HEADS)
        with needs_extra("llm"):
            from transformers import AutoModelForSequenceClassification

        folder = resolve_pretrained(model)
        with named_in_load_errors("model", model):
            loaded = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, **quantisation)
        base = keep_cpu_four_bit_differentiable(loaded)
        self.tokenizer_source, self.vocabulary = model, folder_vocabulary(folder)
        with needs_extra("llm"):
            from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        self.num_features: int = base.config.hidden_size
        config = base.config
        self.is_encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_encoder_decoder
        # from_pretrained returns eval mode; fine-tuning runs with the model's dropout as trained
        self.model = (base if lora is None else apply_lora(base, lora, "SEQ_CLS")).train()
        exclude_frozen_base(self, "model")  # checkpoints hold the adapters, not the base

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        _check_tokens(x)
        mask = x["attention_mask"]
        if self.is_encoder and not bool(plain_values(mask)[..., 0].all()):
            raise ValueError(
                "x has padding at the first position, which this encoder classifies from; tokenize with "
                "padding_side='right'"
            )
        extra = {"token_type_ids": x["token_type_ids"]} if "token_type_ids" in x else {}
        with without_cudnn_attention():
            vectorised = self.is_encoder and mapped_by_vmap(mask)  # a vmap over examples (per-example Jacobians)
            attention = _vmapped_mask(mask, self.model, causal=False) if vectorised else mask
            return self.model(input_ids=x["input_ids"], attention_mask=attention, **extra).logits


class CausalLMAnswerClassifier(nn.Module):
    """A causal LM scoring one answer word per class: ``forward(x)[b, c] = z_T(answer_c)``.

    ``z_T`` are the next-token logits at the last position of a left-padded prompt (the last real
    token). Positions are counted from each sequence's first real token, as in generation, so a
    prompt's scores do not depend on the padding of its batch.

    Args:
        model: a packaged alias (``"smollm2"``), a folder or a hub id.
        answer_words: one word per class, each exactly one token (mind the leading space: ``" positive"``).
        lora: adapters to train (the base is then frozen).
        load_in_4bit: load the base in NF4 (bitsandbytes); a 4-bit base computes in bfloat16.
        dtype: the weights' dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """

    # buffers (register_buffer), typed for readers and checkers
    answer_ids: Tensor

    def __init__(
        self,
        model: str = "smollm2",
        answer_words: list[str] = [" negative", " positive"],  # noqa: B006 - read only, LightningCLI shows it
        lora: LoraSpec | None = None,
        load_in_4bit: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        if len(answer_words) < 2:
            raise ValueError(f"answer_words needs at least two words (one per class); got {answer_words}")
        quantisation = quantisation_kwargs(load_in_4bit)
        with needs_extra("llm"):
            from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = resolve_pretrained(model)
        with named_in_load_errors("model", model):
            tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer_source, self.vocabulary = model, vocabulary_fingerprint(tokenizer)
        ids = []
        for word in answer_words:
            tokens = tokenizer.encode(word, add_special_tokens=False)
            if len(tokens) != 1:
                pieces = tokenizer.convert_ids_to_tokens(tokens)
                raise ValueError(f"answer word {word!r} is {len(tokens)} tokens {pieces}; each must be one token")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"answer_words must map to distinct tokens; got {answer_words} -> ids {ids}")
        self.register_buffer("answer_ids", torch.tensor(ids), persistent=False)
        base = keep_cpu_four_bit_differentiable(
            AutoModelForCausalLM.from_pretrained(folder, dtype=_DTYPES[dtype], **quantisation)
        )
        self.num_features: int = base.config.hidden_size
        self.model = (base if lora is None else apply_lora(base, lora, "CAUSAL_LM")).train()
        exclude_frozen_base(self, "model")  # checkpoints hold the adapters, not the base

    def features(self, x: Mapping[str, Tensor]) -> Tensor:
        """The last token's final (normalised) hidden state ``[B, num_features]``."""
        _check_tokens(x)
        mask = x["attention_mask"]
        if not bool(plain_values(mask)[..., -1].all()):  # inside vmap: every example of the mapped batch
            raise ValueError(
                "x has padding at the last position; tokenize with padding_side='left' so that the last "
                "position is each sequence's last real token"
            )
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        decoder = _unwrap(self.model).get_decoder()
        # under a vmap over examples (per-example Jacobians) the 4-D mask transformers would build, without its
        # data-dependent checks, which vmap cannot run (a 4-D mask is passed through as it is); elsewhere, and in the
        # loop over examples a model that refuses 4-D masks falls back to, transformers' own preparation
        attention = _vmapped_mask(mask, decoder, causal=True) if mapped_by_vmap(mask) else mask
        with without_cudnn_attention():
            out = decoder(input_ids=x["input_ids"], attention_mask=attention, position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, -1]

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        with needs_extra("llm"):
            from peft.tuners.tuners_utils import BaseTunerLayer

        head = _unwrap(self.model).get_output_embeddings()
        if isinstance(head, BaseTunerLayer):  # a LoRA on lm_head: its own forward, then the answer columns
            return cast(nn.Module, head)(self.features(x))[..., self.answer_ids]
        bias = None if head.bias is None else head.bias[self.answer_ids]  # only the answer rows: [C, H], not [V, H]
        return nn.functional.linear(self.features(x), head.weight[self.answer_ids], bias)


class CausalLMFeatures(CausalLMAnswerClassifier):
    """The causal LM as a feature extractor: ``forward(x)`` is the last real token's final hidden state
    ``[B, num_features]`` (frozen, or with LoRA), for heads such as VBLL."""

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        return self.features(x)



def _vmapped_mask(mask: Tensor, model: nn.Module, causal: bool) -> Tensor:
    """``[B, T]`` padding mask -> the ``[B, 1, T, T]`` mask transformers prepares for ``model``'s attention (causal, or
    every real token to every real token), boolean (True: attend) for ``"sdpa"``, additive (0, or the minimum of the
    model's dtype) for ``"eager"``. The ``[B, T]`` mask itself for other implementations and where attention is not
    plain (sliding windows, chunks; encoders other than BERT, some of which attend locally): their own preparation,
    which a vmap that cannot run it leaves to the loop over examples."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    plain = _full_causal_attention(config) if causal else getattr(config, "model_type", None) == "bert"
    if implementation not in ("sdpa", "eager") or not plain:
        return mask
    length = mask.shape[-1]
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if implementation == "sdpa":
        return allowed
    dtype = cast("PreTrainedModel", _unwrap(model)).dtype  # that of the attention scores
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _full_causal_attention(config: Any) -> bool:
    """Whether every layer attends to all earlier positions: no sliding window in use, no attention chunks, and every
    listed layer type ``"full_attention"`` (Mistral and Gemma's windows, Llama 4's chunks need transformers' masks)."""
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layers = getattr(config, "layer_types", None) or ["full_attention"]
    return not window and not getattr(config, "attention_chunk_size", None) and set(layers) == {"full_attention"}
