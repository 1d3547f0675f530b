"""transformers backbones on the packaged SmolLM2-135M-Instruct and all-MiniLM-L6-v2 (CPU).

Columns of the answer-word logits follow ``answer_words``: here ``[" negative", " positive"]``.
The zero-shot prompt ``"Review: {text}\\nSentiment:"`` makes the instruct model rank the two words
correctly for clearly positive and clearly negative reviews (margins of about 3 and 1 logits).
"""

import re

import pytest
import torch
from transformers import AutoTokenizer

from lightning_bayes.models import CausalLMAnswerClassifier, HFSequenceClassifier, LoraSpec

pytestmark = pytest.mark.llm

PROMPT = "Review: {text}\nSentiment:"
POSITIVE = "An absolute delight: warm, funny and beautifully acted. One of the best films of the year."
NEGATIVE = "A dull, lifeless mess. The plot makes no sense and the acting is painfully bad. Avoid it."


@pytest.fixture(scope="module")
def smollm2(smollm2_folder) -> CausalLMAnswerClassifier:
    return CausalLMAnswerClassifier(smollm2_folder).eval()


@pytest.fixture(scope="module")
def prompts(smollm2_folder) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder, padding_side="left")
    texts = [PROMPT.format(text=POSITIVE), PROMPT.format(text=NEGATIVE)]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def _parameter_count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def test_smollm2_size(smollm2):
    assert abs(_parameter_count(smollm2) - 134.5e6) <= 0.1e6
    assert smollm2.num_features == 576


def test_answer_word_logits_rank_the_sentiment(smollm2, prompts):
    with torch.no_grad():
        logits = smollm2(prompts)
    assert logits.shape == (2, 2)
    assert logits[0, 1] > logits[0, 0]  # positive review: " positive" above " negative"
    assert logits[1, 0] > logits[1, 1]  # negative review: " negative" above " positive"


def test_left_padded_scores_equal_the_unpadded_model_output(smollm2, smollm2_folder, prompts):
    """The shorter prompt is left-padded in the batch; alone, it has no padding. Both must agree with
    the plain transformers forward pass (float32 round-off only)."""
    short = 1 if prompts["attention_mask"][1].sum() < prompts["attention_mask"][0].sum() else 0
    real = prompts["attention_mask"][short].bool()
    alone = {k: v[short, real].unsqueeze(0) for k, v in prompts.items()}
    assert not real.all()  # the batch really padded this prompt
    with torch.no_grad():
        reference = smollm2.model(**alone, output_hidden_states=True)
        batched_logits, batched_features = smollm2(prompts)[short], smollm2.features(prompts)[short]
    torch.testing.assert_close(batched_features, reference.hidden_states[-1][0, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched_logits, reference.logits[0, -1, smollm2.answer_ids], rtol=1e-4, atol=1e-4)
    assert batched_features.shape == (smollm2.num_features,)


def test_lora_trains_only_r_times_in_plus_out_per_adapted_layer(smollm2, smollm2_folder, prompts):
    lora = CausalLMAnswerClassifier(smollm2_folder, lora=LoraSpec(r=8, alpha=16)).eval()
    config = smollm2.model.config
    hidden, kv = config.hidden_size, config.num_key_value_heads * config.head_dim  # 576, 3 * 64
    per_layer = 8 * ((hidden + hidden) + (hidden + kv) + (hidden + kv) + (hidden + hidden))  # q, k, v, o
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert _parameter_count(lora, trainable=True) == per_layer * config.num_hidden_layers == 921_600
    assert _parameter_count(lora, trainable=False) == _parameter_count(smollm2)
    with torch.no_grad():  # B starts at zero, so the adapted model starts as the base model
        torch.testing.assert_close(lora(prompts), smollm2(prompts), rtol=0, atol=0)


def test_answer_words_must_be_single_distinct_tokens(smollm2_folder):
    with pytest.raises(ValueError, match="answer word ' thoroughly delightful' is 2 tokens"):
        CausalLMAnswerClassifier(smollm2_folder, answer_words=[" negative", " thoroughly delightful"])
    with pytest.raises(ValueError, match="distinct tokens"):
        CausalLMAnswerClassifier(smollm2_folder, answer_words=[" positive", " positive"])


def test_right_padding_and_bad_inputs_are_explained(smollm2, prompts):
    right = {k: v.flip(-1) for k, v in prompts.items()}
    with pytest.raises(ValueError, match="padding_side='left'"):
        smollm2(right)
    with pytest.raises(ValueError, match="tokenizer's dict with 'input_ids' and 'attention_mask'"):
        smollm2(prompts["input_ids"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        CausalLMAnswerClassifier(dtype="fp8")


def test_minilm_sequence_classifier_with_lora_trains_adapters_and_head_only():
    model = HFSequenceClassifier("minilm", num_labels=3, lora=LoraSpec(r=2, target_modules=["query", "value"]))
    assert isinstance(model, HFSequenceClassifier) and model.num_features == 384
    tokenizer = AutoTokenizer.from_pretrained(model.model.get_base_model().name_or_path)
    x = dict(tokenizer(["a fine film", "dull, and far too long"], return_tensors="pt", padding=True))
    assert model(x).shape == (2, 3)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n: c for n, c in trainable.items() if "lora_" in n}
    assert sum(adapters.values()) == 6 * 2 * 2 * (384 + 384)  # 6 layers x {query, value} x r (in + out)
    assert sum(c for n, c in trainable.items() if n not in adapters) == 3 * 384 + 3  # the fresh head


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"r": 0}, r"r must be an int >= 1; got 0"),
        ({"r": 2.5}, r"r must be an int >= 1; got 2.5"),
        ({"alpha": 0}, r"alpha must be a number > 0; got 0"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\); got 1.0"),
        ({"dropout": -0.1}, r"dropout must lie in \[0, 1\); got -0.1"),
        ({"target_modules": []}, r"target_modules must be a non-empty list of layer names; got \[\]"),
        ({"target_modules": ["q_proj", ""]}, r"target_modules must be a non-empty list of layer names"),
        ({"target_modules": "query"}, r"target_modules must be a list of layer names, e\.g\. \['query'\]; .*regular"),
    ],
)
def test_a_lora_spec_refuses_what_peft_would_accept_and_fail_on_later(arguments: dict, message: str):
    with pytest.raises(ValueError, match=f"^LoraSpec: {message}"):
        LoraSpec(**arguments)
    LoraSpec(r=1, alpha=0.5, dropout=0.0, target_modules=["query"])  # the smallest valid values


def test_a_model_name_that_cannot_be_loaded_names_the_argument_and_the_offline_aliases(tmp_path):
    """transformers' OSError (after the hub's retries, about 60 s offline) named neither ``model`` nor the aliases."""
    missing = str(tmp_path / "no-model")
    for build in (lambda: HFSequenceClassifier(missing), lambda: CausalLMAnswerClassifier(missing)):
        expected = rf"model='{re.escape(missing)}' could not be loaded: the packaged models \['minilm'.*work offline"
        with pytest.raises(OSError, match=expected + r"; .* needs the Hugging Face Hub") as raised:
            build()
        assert isinstance(raised.value.__cause__, OSError)


def test_lora_targets_matching_nothing_name_the_available_layers():
    with pytest.raises(ValueError, match=r"matching no layer .*\['q_proj'.*'query'"):
        HFSequenceClassifier("minilm", num_labels=2, lora=LoraSpec(target_modules=["q_proj", "value"]))


def test_four_bit_without_cuda_or_a_cpu_backend_is_explained(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name.endswith("backends.cpu") else find_spec(name))
    with pytest.raises(RuntimeError, match="load_in_4bit=True needs a CUDA device or a bitsandbytes with a CPU"):
        CausalLMAnswerClassifier("smollm2", load_in_4bit=True)
    with pytest.raises(RuntimeError, match="load_in_4bit=True needs a CUDA device or a bitsandbytes with a CPU"):
        HFSequenceClassifier("minilm", load_in_4bit=True)


def _check_four_bit_lora(model: CausalLMAnswerClassifier, x: dict) -> None:
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 30 * 7  # every linear of 30 blocks
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    logits = model(x)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert logits[0, 1] > logits[0, 0] and logits[1, 0] > logits[1, 1]  # the 4-bit base still reads the reviews
    state = model.state_dict()
    assert all("lora_" in key for key in state) and sum(t.numel() for t in state.values()) == _parameter_count(
        model, trainable=True
    ), "the checkpoint holds the adapters, not the frozen 4-bit base"


@pytest.mark.gpu
def test_four_bit_nf4_base_with_full_precision_lora(smollm2_folder, prompts):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = CausalLMAnswerClassifier(smollm2_folder, lora=LoraSpec(), load_in_4bit=True)
    _check_four_bit_lora(model, {k: v.cuda() for k, v in prompts.items()})


def test_four_bit_nf4_base_with_full_precision_lora_on_cpu(smollm2_folder, prompts):
    """The CPU twin of the CUDA test: bitsandbytes' CPU backend runs the same NF4 base. After an eval-mode forward
    (a validation pass) every adapter still gets a gradient: bitsandbytes repacked the weights for inference there
    (on AVX512-BF16 CPUs), after which no gradient passed through a base layer."""
    if torch.cuda.is_available():
        pytest.skip("the CUDA test covers a machine with a GPU")
    model = CausalLMAnswerClassifier(smollm2_folder, lora=LoraSpec(), load_in_4bit=True)
    _check_four_bit_lora(model, prompts)
    with torch.no_grad():
        model.eval()(prompts)
    model.train()(prompts).logsumexp(-1).sum().backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}  # (A starts random, B at zero)
    assert lora_b and all(grad is not None and grad.abs().sum() > 0 for grad in lora_b.values())


def test_minilm_on_a_four_bit_base_keeps_its_fresh_head_in_full_precision_and_trains():
    """BERT's ``classifier`` (not in the checkpoint) became a ``Linear4bit`` without a quantisation state, and
    bitsandbytes failed at the first forward (``--config text/map_minilm --config text/nf4``)."""
    import bitsandbytes as bnb

    if torch.cuda.is_available():
        pytest.skip("the CPU backend's twin; CUDA machines run the 4-bit configs")
    model = HFSequenceClassifier("minilm", lora=LoraSpec(r=2, target_modules=["query", "value"]), load_in_4bit=True)
    heads = [m for n, m in model.named_modules() if n.endswith("classifier.modules_to_save.default")]
    assert len(heads) == 1 and type(heads[0]) is torch.nn.Linear and heads[0].weight.dtype == torch.float32
    # q, k, v, o, in and out of 6 blocks, and the pooler
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 6 * 6 + 1
    tokenizer = AutoTokenizer.from_pretrained(model.model.get_base_model().name_or_path)
    x = dict(tokenizer(["a fine film", "dull, and far too long"], return_tensors="pt", padding=True))
    logits = model(x)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    trainable = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(g is not None for n, g in trainable.items() if "lora_A" not in n)


def test_a_lora_on_lm_head_trains_and_scores_as_the_whole_model(smollm2_folder, prompts):
    """The answer logits came from the base head's rows alone, so a LoRA on lm_head (the spec's third target) got
    no gradient and changed nothing."""
    lora = LoraSpec(r=2, alpha=4, target_modules=["q_proj", "v_proj", "lm_head"])
    model = CausalLMAnswerClassifier(smollm2_folder, lora=lora).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    logits = model(prompts)
    whole = model.model(**prompts).logits[:, -1, model.answer_ids]
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-4)
    logits.logsumexp(-1).sum().backward()
    head = {n: p.grad for n, p in model.named_parameters() if "lm_head.lora_" in n}
    assert len(head) == 2 and all(grad is not None and grad.abs().sum() > 0 for grad in head.values())


def test_a_yaml_config_builds_the_backbones_with_a_lora_spec():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--backbone", type=torch.nn.Module)
    config = parser.parse_string(
        "backbone:\n"
        "  class_path: lightning_bayes.models.HFSequenceClassifier\n"
        "  init_args: {model: minilm, num_labels: 2, lora: {r: 2, target_modules: [query, value]}}\n"
    )
    backbone = parser.instantiate_classes(config).backbone
    assert isinstance(backbone, HFSequenceClassifier)
    assert backbone.model.peft_config["default"].r == 2


def test_forward_passes_keep_cudnn_attention_out_and_the_callers_other_kernels(smollm2, prompts, monkeypatch):
    """cuDNN's kernel is off while either backbone attends (its backward is NaN under a padding mask,
    pytorch/pytorch#196678), the kernels the caller restricted stay restricted, and its setting comes back."""
    seen = []
    attend = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        backends = torch.backends.cuda
        seen.append((backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.math_sdp_enabled()))
        return attend(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    minilm = HFSequenceClassifier("minilm", num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm.model.name_or_path)
    tokens = dict(tokenizer(["a fine film", "dull, and far too long"], return_tensors="pt", padding=True))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        smollm2(prompts)
        minilm(tokens)
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            smollm2(prompts)
    decoder, encoder = smollm2.model.config.num_hidden_layers, minilm.model.config.num_hidden_layers
    assert seen == [(False, True, True)] * (decoder + encoder) + [(False, False, True)] * decoder
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_an_encoder_refuses_a_left_padded_batch_and_scores_a_right_padded_one_as_alone():
    """MiniLM classifies from its first token: left padding put a padding token there and shifted every position,
    so a text's logits depended on its batch (0.0172 / 0.0035 padded, 0.0155 / 0.0098 alone)."""
    minilm = HFSequenceClassifier("minilm", num_labels=2).eval()
    texts = ["dull", "a long, slow and very dull film"]
    right = AutoTokenizer.from_pretrained(minilm.model.name_or_path, padding_side="right")
    left = AutoTokenizer.from_pretrained(minilm.model.name_or_path, padding_side="left")
    with torch.no_grad():
        alone = minilm(dict(right(texts[:1], return_tensors="pt")))
        torch.testing.assert_close(minilm(dict(right(texts, return_tensors="pt", padding=True)))[:1], alone)
        with pytest.raises(ValueError, match="padding at the first position.*padding_side='right'"):
            minilm(dict(left(texts, return_tensors="pt", padding=True)))


def test_lora_adapts_the_layers_peft_adapts_beyond_linear_ones():
    """GPT-2's attention is a transformers Conv1D, which peft adapts: it was refused as "matching no linear layer".
    A dict of LoraSpec's fields (what a Python user writes from a YAML config) adapts the same layers."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from lightning_bayes.models.hf import apply_lora

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16, pad_token_id=0)
    model = apply_lora(GPT2ForSequenceClassification(config), LoraSpec(r=2, target_modules=["c_attn"]), "SEQ_CLS")
    adapted = {name for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}
    assert adapted and all(".c_attn." in name for name in adapted)
    as_dict = apply_lora(GPT2ForSequenceClassification(config), {"r": 2, "target_modules": ["c_attn"]}, "SEQ_CLS")
    assert {name for name, p in as_dict.named_parameters() if p.requires_grad and "lora_" in name} == adapted
    with pytest.raises(ValueError, match=r"lora must be a LoraSpec or a dict of its fields .*; got 8"):
        apply_lora(GPT2ForSequenceClassification(config), 8, "SEQ_CLS")  # type: ignore[arg-type]


def test_a_datamodule_with_another_tokenizer_is_refused_at_setup(smollm2, smollm2_folder):
    """MiniLM's ids fed to SmolLM2 index other tokens' embeddings: the fit ran and reported metrics."""
    from lightning.pytorch import Trainer

    from lightning_bayes.datamodules import RottenTomatoesDataModule
    from lightning_bayes.models.vocabulary import vocabulary_fingerprint
    from lightning_bayes.modules import MAP

    assert smollm2.vocabulary == vocabulary_fingerprint(AutoTokenizer.from_pretrained(smollm2_folder))
    assert HFSequenceClassifier("minilm").vocabulary != smollm2.vocabulary
    data = RottenTomatoesDataModule(tokenizer="minilm", max_length=16, max_train=8, max_test=8, batch_size=4)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"the datamodule's tokenizer 'minilm' is not the tokenizer of Causal.*"
                       r"--data.init_args.tokenizer "):
        trainer.fit(MAP(smollm2), datamodule=data)


def test_a_model_folder_without_tokenizer_files_has_no_vocabulary_to_check(tmp_path):
    """transformers builds a stub of special tokens for such a folder: the datamodule's real tokenizer was refused."""
    import shutil

    from lightning_bayes.models.pretrained import resolve_pretrained

    source = resolve_pretrained("minilm")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{source}/{name}", tmp_path / name)
    assert HFSequenceClassifier(str(tmp_path)).vocabulary is None


def test_the_vocabulary_of_a_folder_a_hub_id_and_the_sequence_classifier(smollm2_folder, monkeypatch):
    from lightning_bayes.models.pretrained import resolve_pretrained
    from lightning_bayes.models.vocabulary import folder_vocabulary, vocabulary_fingerprint

    assert folder_vocabulary(smollm2_folder) == vocabulary_fingerprint(AutoTokenizer.from_pretrained(smollm2_folder))
    minilm = vocabulary_fingerprint(AutoTokenizer.from_pretrained(resolve_pretrained("minilm")))
    assert HFSequenceClassifier("minilm").vocabulary == minilm

    class Stub:
        def get_vocab(self) -> dict:
            return {"a": 0, "b": 1}

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name: Stub())
    assert folder_vocabulary("org/name") == vocabulary_fingerprint(Stub())  # a hub id is no local folder


def _lora_loss_function(smollm2_folder, implementation: str = "sdpa"):
    """SmolLM2 with LoRA on q/v (B drawn: at B = 0 every gradient of A is zero) and its per-example loss map."""
    from lightning_bayes.inference.likelihoods import CategoricalLikelihood
    from lightning_bayes.inference.linalg import LossConstraint, ParameterFunction
    from lightning_bayes.models.hf import _unwrap

    torch.manual_seed(0)
    model = CausalLMAnswerClassifier(smollm2_folder, lora=LoraSpec(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    decoder = _unwrap(model.eval().model).get_decoder()
    decoder.config._attn_implementation = implementation
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    likelihood = CategoricalLikelihood()
    return decoder, likelihood, ParameterFunction(model, params="lora", constraint=LossConstraint(likelihood))


def _plain_rows(function, likelihood, x: dict, y: torch.Tensor) -> torch.Tensor:
    """Each example's loss gradient by plain autograd (no transform: transformers' own mask), padding kept."""
    rows, theta = [], function.theta().detach()
    for n in range(len(y)):
        leaf = theta.clone().requires_grad_(True)
        example = {k: v[n : n + 1] for k, v in x.items()}
        rows.append(torch.autograd.grad(likelihood.loss(function.outputs(leaf, example), y[n : n + 1]), leaf)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_per_example_gradients_vectorise_through_a_left_padded_batch(smollm2_folder, prompts, implementation):
    """Under vmap over examples the decoder gets the 4-D causal mask transformers would build (its own preparation
    has data-dependent checks vmap cannot run, which sent the null-space Laplace and VIKING to a loop over examples):
    each row equals plain autograd through transformers' own mask on that example of the padded batch; a
    right-padded batch is refused inside vmap too."""
    import warnings

    _, likelihood, function = _lora_loss_function(smollm2_folder, implementation)
    x, y = prompts, torch.tensor([1, 0])
    assert not bool(x["attention_mask"].all())  # one prompt is left-padded
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vmap over examples failed")
        rows = function.jacobian(x, y)
    assert function.vectorize and rows.shape == (2, function.size)
    expected = _plain_rows(function, likelihood, x, y)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-6)
    right = AutoTokenizer.from_pretrained(smollm2_folder, padding_side="right")
    texts = [PROMPT.format(text=POSITIVE), PROMPT.format(text=NEGATIVE)]
    padded = dict(right(texts, return_tensors="pt", padding=True))
    with pytest.raises(ValueError, match="x has padding at the last position; tokenize with padding_side='left'"):
        function.jacobian(padded, y)  # checked on the whole batch inside vmap too


def test_a_decoder_refusing_4d_masks_falls_back_to_the_loop_with_its_own_mask(smollm2_folder, prompts):
    """The 4-D mask is for the vmap over examples only: the loop a refusing model falls back to prepares its own."""
    decoder, likelihood, function = _lora_loss_function(smollm2_folder)
    forward = decoder.forward

    def refusing(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.ndim == 4:
            raise ValueError("this decoder takes a [B, T] attention mask")
        return forward(*args, attention_mask=attention_mask, **kwargs)

    decoder.forward = refusing
    x, y = prompts, torch.tensor([1, 0])
    with pytest.warns(UserWarning, match="vmap over examples failed .* fall back to a Python loop"):
        rows = function.jacobian(x, y)
    assert not function.vectorize
    torch.testing.assert_close(rows, _plain_rows(function, likelihood, x, y), rtol=1e-4, atol=1e-6)


def test_a_sliding_window_decoder_keeps_transformers_masks_and_loops(smollm2_folder, prompts, tmp_path):
    """A windowed decoder's mask is not the plain causal one: it is left to transformers (under vmap, or in the loop
    over examples where vmap cannot run that preparation) and the rows stay exact."""
    from transformers import MistralConfig, MistralForCausalLM

    from lightning_bayes.inference.likelihoods import CategoricalLikelihood
    from lightning_bayes.inference.linalg import LossConstraint, ParameterFunction

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=3)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = CausalLMAnswerClassifier(str(tmp_path)).eval()
    likelihood = CategoricalLikelihood()
    function = ParameterFunction(model, constraint=LossConstraint(likelihood))
    x, y = prompts, torch.tensor([1, 0])
    assert x["input_ids"].shape[1] > 3  # longer than the window
    rows = function.jacobian(x, y)
    torch.testing.assert_close(rows, _plain_rows(function, likelihood, x, y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_per_example_gradients_vectorise_through_the_minilm_encoder(implementation):
    """The BERT encoder gets the padding mask transformers would build under a vmap over examples: rows equal plain
    autograd through transformers' own mask on each example of the right-padded batch."""
    import warnings

    from lightning_bayes.inference.likelihoods import CategoricalLikelihood
    from lightning_bayes.inference.linalg import LossConstraint, ParameterFunction
    from lightning_bayes.models import resolve_pretrained

    torch.manual_seed(0)
    model = HFSequenceClassifier("minilm", lora=LoraSpec(r=2, alpha=4, target_modules=["query", "value"])).eval()
    model.model.config._attn_implementation = implementation
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("minilm"), padding_side="right")
    x = dict(tokenizer([POSITIVE, "Dull."], return_tensors="pt", padding=True))
    y = torch.tensor([1, 0])
    assert not bool(x["attention_mask"].all())
    likelihood = CategoricalLikelihood()
    function = ParameterFunction(model, params="lora", constraint=LossConstraint(likelihood))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vmap over examples failed")
        rows = function.jacobian(x, y)
    expected = _plain_rows(function, likelihood, x, y)
    assert function.vectorize and expected.abs().max() > 1e-3
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-6)
    left = AutoTokenizer.from_pretrained(resolve_pretrained("minilm"), padding_side="left")
    with pytest.raises(ValueError, match="x has padding at the first position"):
        function.jacobian(dict(left([POSITIVE, "Dull."], return_tensors="pt", padding=True)), y)
