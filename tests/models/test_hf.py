"""transformers backbones on the packaged models (CPU)."""

import pytest
import torch
from transformers import AutoTokenizer

from lightning_bayes.models import CausalLMAnswerClassifier, HFSequenceClassifier, LoraSpec, resolve_pretrained

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def smollm2() -> CausalLMAnswerClassifier:
    return CausalLMAnswerClassifier("smollm2", lora=LoraSpec(r=4))


def test_smollm2_size_and_lora_trainable_count(smollm2: CausalLMAnswerClassifier):
    base = sum(p.numel() for n, p in smollm2.named_parameters() if "lora_" not in n)
    assert abs(base - 134.5e6) < 0.1e6
    config = smollm2.model.config
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    kv = hidden // heads * kv_heads
    per_layer = 4 * ((hidden + hidden) + (hidden + kv) + (hidden + kv) + (hidden + hidden))  # r * (in + out)
    trainable = {n: p.numel() for n, p in smollm2.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(trainable.values()) == per_layer * config.num_hidden_layers


def test_answer_word_logits_rank_sentiment(smollm2: CausalLMAnswerClassifier):
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("smollm2"), padding_side="left")
    texts = [
        "Review: An absolute joy, funny, moving and beautifully acted.\nSentiment:",
        "Review: A boring, clumsy mess that wastes its cast.\nSentiment:",
    ]
    x = dict(tokenizer(texts, return_tensors="pt", padding=True))
    with torch.no_grad():
        logits = smollm2(x)
        features = smollm2.features(x)
    assert logits.shape == (2, 2) and features.shape == (2, smollm2.num_features)
    assert logits[0, 1] > logits[0, 0] and logits[1, 0] > logits[1, 1]  # columns: " negative", " positive"


def test_multi_token_answer_words_are_rejected():
    with pytest.raises(ValueError, match="exactly one token"):
        CausalLMAnswerClassifier("smollm2", answer_words=[" negative", " thoroughly delightful"])


def test_minilm_sequence_classifier_with_lora():
    model = HFSequenceClassifier("minilm", num_labels=3, lora=LoraSpec(r=2, target_modules=["query", "value"]))
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("minilm"))
    x = dict(tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True))
    assert model(x).shape == (2, 3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)


def test_four_bit_without_cuda_is_explained():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU error path; the GPU test covers 4-bit loading")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CausalLMAnswerClassifier("smollm2", load_in_4bit=True)


@pytest.mark.gpu
def test_four_bit_nf4_base_keeps_lora_in_full_precision():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    model = CausalLMAnswerClassifier("smollm2", lora=LoraSpec(), load_in_4bit=True)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
