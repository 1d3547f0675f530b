"""A 4-bit NF4 base (bitsandbytes, here its CPU backend) under LoRA: the CPU twins of the CUDA 4-bit test.

The truth is the float twin: the same network with every 4-bit weight replaced by its dequantised value.
bitsandbytes' CPU kernels compute a 4-bit product to about bfloat16 precision even with float32 compute (0.2 to
0.5% of the output per layer against ``x W_deq^T``, measured; exact only on its autograd path), and attention
amplifies that in the query gradients: so logits must agree to 3% and every LoRA gradient point the same way
(cosine >= 0.99, norm error <= 15%), while a gradient missing the path through the 4-bit layers, or of the wrong
sign, would be off by order one. The library's own setting (bf16 compute, :func:`quantisation_kwargs`) is what
the state-dict tests load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_bayes.inference.linalg import ParameterFunction
from lightning_bayes.models.frozen_base import exclude_frozen_base

bnb = pytest.importorskip("bitsandbytes")
if torch.cuda.is_available() or not hasattr(bnb, "backends") or not hasattr(bnb.backends, "cpu"):
    pytest.skip("the CPU twins need bitsandbytes' CPU backend and no CUDA device", allow_module_level=True)

WIDTH = 64  # one NF4 block per row


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


class Scores(nn.Module):
    """Last-position logits of a causal LM with LoRA on q/v (A and B drawn from ``seed``), its frozen base excluded."""

    def __init__(self, folder: Path, four_bit: bool, seed: int = 1, float_compute: bool = False) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from lightning_bayes.models.hf import quantisation_kwargs

        quantisation = quantisation_kwargs(four_bit)
        if four_bit and float_compute:
            quantisation["quantization_config"].bnb_4bit_compute_dtype = torch.float32
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **quantisation)
        if not four_bit:  # the float twin: every weight the 4-bit model holds, dequantised
            quantised = dict(Scores(folder, four_bit=True, float_compute=True).model.base_model.model.named_modules())
            for name, module in base.named_modules():
                if isinstance(quantised.get(name), bnb.nn.Linear4bit):
                    weight = quantised[name].weight
                    module.weight.data = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        self.model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)  # both adapters drawn here (peft rounds A to the base dtype)
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        exclude_frozen_base(self, "model")

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits[:, -1]


def _lora_gradients(model: Scores, ids: Tensor) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad()
    logits = model(ids)
    logits.square().sum().backward()
    return logits.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("rows", [3, 1])  # a batch, and the single-row (gemv) kernel
def test_four_bit_lora_matches_its_dequantised_float_twin(tiny_folder: Path, rows: int) -> None:
    four_bit = Scores(tiny_folder, four_bit=True, float_compute=True)
    twin = Scores(tiny_folder, four_bit=False)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in four_bit.modules()) == 14  # 7 linears per block
    assert all(p.dtype == torch.float32 for p in four_bit.parameters() if p.requires_grad)
    ids = torch.randint(0, 32, (rows, 6), generator=torch.Generator().manual_seed(rows))
    (logits, grads), (want_logits, want_grads) = _lora_gradients(four_bit, ids), _lora_gradients(twin, ids)
    assert len(grads) == len(want_grads) == 8  # A and B of q and v in two blocks
    assert (logits - want_logits).norm() <= 0.03 * want_logits.norm()
    for grad, want in zip(grads, want_grads, strict=True):
        assert nn.functional.cosine_similarity(grad.flatten(), want.flatten(), dim=0) >= 0.99
        assert (grad - want).norm() <= 0.15 * want.norm()


def test_the_frozen_4bit_base_stays_out_of_the_state_dict_and_loads_back(tiny_folder: Path) -> None:
    trained = Scores(tiny_folder, four_bit=True, seed=1)
    state = trained.state_dict()
    assert state and all("lora_" in key for key in state), "only the adapters are saved"
    fresh = Scores(tiny_folder, four_bit=True, seed=2)  # other adapters, the same base
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(fresh(ids), trained(ids))
    fresh.load_state_dict(state)  # strict: the base's absence is expected
    torch.testing.assert_close(fresh(ids), trained(ids), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):  # adapters are still required
        fresh.load_state_dict({key: value for key, value in state.items() if "lora_A" not in key})


def test_a_checkpoint_that_holds_the_base_still_loads(tiny_folder: Path) -> None:
    """Checkpoints written before the base was excluded (float base, every tensor saved) load as they did."""
    owner = Scores(tiny_folder, four_bit=False, seed=1)
    everything = {f"model.{key}": value for key, value in owner.model.state_dict().items()}
    assert len(everything) > len(owner.state_dict())
    other = Scores(tiny_folder, four_bit=False, seed=2)
    other.load_state_dict(everything)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(other(ids), owner(ids), rtol=0, atol=0)


def test_jacobian_methods_refuse_a_4bit_base_clearly(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="4-bit weights.*load_in_4bit=False"):
        ParameterFunction(Scores(tiny_folder, four_bit=True), params="lora")
