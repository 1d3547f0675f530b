"""A deep ensemble of LoRAs: one shared frozen base, M adapters each started as peft starts it (a tiny random Llama)."""

import io

import torch
from torch import nn

from tiny_lora_llama import VOCAB, perturb_lora_b, tiny_lora_llama

from lightning_bayes.modules import DeepEnsemble

CLASSES = 3


class LastTokenClassifier(nn.Module):
    """Logits of the first ``CLASSES`` vocabulary entries at the last position: a causal-LM classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits[:, -1, :CLASSES]


def _lora_classifier(seed: int = 0) -> LastTokenClassifier:
    return LastTokenClassifier(tiny_lora_llama(seed))


def _ids(seed: int, batch: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(seed))


def test_members_share_the_frozen_base_and_start_at_it(single_thread):
    backbone = _lora_classifier()
    ensemble = DeepEnsemble(backbone, num_members=3)
    named = [dict(m.named_parameters()) for m in ensemble.members]
    frozen = [n for n, p in named[0].items() if not p.requires_grad]
    lora = [n for n, p in named[0].items() if p.requires_grad]
    assert frozen and all("lora_" in n for n in lora)
    assert all(named[k][n] is named[0][n] for n in frozen for k in (1, 2)), "the base must be shared, not copied"
    base_size = sum(p.numel() for p in backbone.parameters())
    lora_size = sum(named[0][n].numel() for n in lora)
    assert sum(p.numel() for p in ensemble.parameters()) == base_size + 2 * lora_size
    for n in lora:  # re-drawn as peft draws them: A anew, B = 0
        if "lora_B" in n:
            assert all(torch.count_nonzero(named[k][n]) == 0 for k in (1, 2))
        else:
            assert not torch.equal(named[1][n], named[0][n]) and not torch.equal(named[2][n], named[1][n])
            bound = (3.0 / named[0][n].shape[1]) ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), ...)
            assert named[1][n].abs().max() <= bound / 3**0.5 + 1e-12
    ids = _ids(1)
    with torch.no_grad(), backbone.model.disable_adapter():
        base = backbone(ids)
    with torch.no_grad():
        outputs = ensemble.eval()(ids)
    torch.testing.assert_close(outputs, base.expand(3, -1, -1), rtol=0, atol=1e-12)


def test_vectorised_members_equal_the_loop_and_each_gradient_is_its_own(single_thread):
    ensemble = DeepEnsemble(_lora_classifier(), num_members=3, vectorize=True)
    assert ensemble.vectorized()
    perturb_lora_b(ensemble)
    ids, labels = _ids(2), torch.tensor([0, 2, 1, 2])
    looped = torch.stack([member(ids) for member in ensemble.members])
    assert (looped[1] - looped[0]).abs().max() > 1e-3
    torch.testing.assert_close(ensemble(ids), looped, rtol=1e-10, atol=1e-12)

    ensemble.training_step((ids, labels), 0).backward()
    for member in ensemble.members:
        trainable = {n: p for n, p in member.named_parameters() if p.requires_grad}
        reference = {n: p.detach().clone().requires_grad_() for n, p in trainable.items()}
        logits = torch.func.functional_call(member, reference, (ids,))
        grads = torch.autograd.grad(nn.functional.cross_entropy(logits, labels), list(reference.values()))
        for parameter, grad in zip(trainable.values(), grads):
            torch.testing.assert_close(parameter.grad, grad, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in ensemble.parameters() if not p.requires_grad)


class PaddedClassifier(LastTokenClassifier):
    """The classifier on a tokenizer's dict: an attention mask goes with the ids."""

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits[:, -1, :CLASSES]


def test_vectorised_members_attend_through_the_math_kernel_under_a_padding_mask(single_thread):
    """The mask of a left-padded batch has no member dimension; under ``vmap`` only the math kernel of
    ``scaled_dot_product_attention`` folds it correctly on every device (the CUDA memory-efficient kernel raises
    "attn_bias: wrong shape (batch dimension)"), so the vectorised call must run that one and equal the loop."""
    ensemble = DeepEnsemble(PaddedClassifier(tiny_lora_llama(0)), num_members=3, vectorize=True)
    perturb_lora_b(ensemble)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, :3], mask[2, :1] = 0, 0
    x = {"input_ids": _ids(3), "attention_mask": mask}
    with torch.profiler.profile() as profile:
        outputs = ensemble(x)
    kernels = {event.name for event in profile.events() if event.name.startswith("aten::_scaled_dot_product")}
    assert kernels == {"aten::_scaled_dot_product_attention_math"}
    looped = torch.stack([member(x) for member in ensemble.members])
    assert (looped[1] - looped[0]).abs().max() > 1e-3
    torch.testing.assert_close(outputs, looped, rtol=1e-10, atol=1e-12)


def test_checkpoint_round_trip_stores_the_base_once(single_thread):
    ensemble = DeepEnsemble(_lora_classifier(), num_members=4)
    perturb_lora_b(ensemble)
    ids = _ids(3)
    buffer = io.BytesIO()
    torch.save(ensemble.state_dict(), buffer)
    base_bytes = sum(p.numel() * p.element_size() for p in ensemble.members[0].parameters() if not p.requires_grad)
    # four members in the checkpoint, but their shared base storages are written once (plus keys and adapters;
    # four copies would be at least 4 * base_bytes)
    assert buffer.getbuffer().nbytes < 2.5 * base_bytes

    restored = DeepEnsemble(_lora_classifier(seed=5), num_members=4)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(ids), ensemble.eval()(ids), rtol=0, atol=0)


def test_members_redraw_gaussian_adapters_as_gaussian_and_leave_frozen_adapters_alone(single_thread):
    """peft's ``init_lora_weights="gaussian"`` (A ~ N(0, 1/r^2)) is re-drawn so, not as the default's uniform A (no
    scale warning); an adapter frozen under a trainable head is shared with the original, never reset in place."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ensemble = DeepEnsemble(LastTokenClassifier(tiny_lora_llama(0, init_lora_weights="gaussian")), num_members=3)
    redrawn = torch.cat([p.reshape(-1) for n, p in ensemble.members[1].named_parameters() if "lora_A" in n])
    assert redrawn.numel() == 256 and abs(float(redrawn.square().mean().sqrt()) - 0.25) < 0.04  # uniform: 0.144

    class HeadOnFrozenLora(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = tiny_lora_llama(0).requires_grad_(False), nn.Linear(VOCAB, CLASSES).double()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(input_ids=ids).logits[:, -1])

    backbone = HeadOnFrozenLora()
    perturb_lora_b(backbone.body)
    adapters = {n: p.detach().clone() for n, p in backbone.named_parameters() if "lora_" in n}
    ensemble = DeepEnsemble(backbone, num_members=3)
    originals = dict(backbone.named_parameters())
    for name, value in adapters.items():
        assert torch.equal(originals[name], value), name
        assert all(dict(m.named_parameters())[name] is originals[name] for m in ensemble.members)
    assert not torch.equal(ensemble.members[1].head.weight, backbone.head.weight)


def test_members_redraw_embedding_adapters(single_thread):
    """LoRA on an embedding keeps its factors in ParameterDicts (A = 0, B ~ N(0, 1) as peft draws them): re-drawn
    for each member too, so no member starts equal to another there."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    network = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Flatten(), nn.Linear(8 * 6, CLASSES))
    lora = get_peft_model(network, LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    ensemble = DeepEnsemble(lora, num_members=3)
    factors = [{n: p for n, p in m.named_parameters() if "lora_embedding" in n} for m in ensemble.members]
    assert factors[0] and {n for n in factors[0] if "lora_embedding_B" in n}
    for name, value in factors[1].items():
        if "lora_embedding_A" in name:
            assert torch.count_nonzero(value) == 0
        else:
            assert not torch.equal(value, factors[0][name]) and not torch.equal(value, factors[2][name])


def test_members_with_two_adapters_are_drawn_alike_whatever_the_hash_seed(tmp_path):
    """Adapters are re-drawn in the layer's order, not a set's (whose order of strings follows PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "draw.py"
    script.write_text(
        "import sys, torch\nfrom torch import nn\nfrom peft import LoraConfig, get_peft_model\n"
        "from lightning_bayes.modules import DeepEnsemble\ntorch.manual_seed(0)\n"
        "net = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoraConfig(r=2, target_modules=['0']))\n"
        "net.add_adapter('second', LoraConfig(r=2, target_modules=['0']))\n"
        "for name, p in net.named_parameters():\n    p.requires_grad_('lora_' in name)\n"
        "ensemble = DeepEnsemble(net, num_members=2)\n"
        "torch.save({n: p for n, p in ensemble.members[1].named_parameters() if 'lora_A' in n}, sys.argv[1])\n"
    )
    runs = [  # side by side: each spends its time importing peft
        subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{seed}.pt")],
                         env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for seed in ("1", "2")
    ]
    for process in runs:
        assert process.wait(timeout=300) == 0, process.stderr.read().decode() if process.stderr else ""
    draws = [torch.load(tmp_path / f"{seed}.pt") for seed in ("1", "2")]
    assert len(draws[0]) == 2 and all(torch.equal(draws[0][n], draws[1][n]) for n in draws[0])
