"""A tiny random Llama with peft LoRA on q_proj/v_proj, float64: the LLM stand-in of the CPU tests."""

import torch
from torch import nn

VOCAB = 32


def tiny_lora_llama(seed: int = 0, init_lora_weights: bool | str = True) -> nn.Module:
    """Two blocks of width 16, LoRA r = 4 (alpha 8) as peft initialises it (B = 0), in float64."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init_lora_weights)
    return get_peft_model(LlamaForCausalLM(config), lora).double()


def perturb_lora_b(model: nn.Module, std: float = 0.3) -> None:
    """Non-zero B everywhere (peft starts B at zero, which would hide the LoRA branch)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std)
