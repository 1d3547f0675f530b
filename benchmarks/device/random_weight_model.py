"""Save a randomly initialised causal LM with the shape and tokenizer of a model folder that holds only its
config and tokenizer files (``kit.sh`` packs those of the packaged SmolLM2, whose weights are too large to carry
to the device machine). Step time and memory depend on the shapes, not on the weight values.

    python benchmarks/device/random_weight_model.py SHAPE_FOLDER OUT_FOLDER
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", type=Path, help="folder with config.json and the tokenizer files")
    parser.add_argument("out", type=Path, help="where to save the model (a transformers folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.shape / "config.json").is_file():
        parser.error(f"shape={str(args.shape)!r} holds no config.json")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.shape), dtype=torch.float32)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.shape).save_pretrained(args.out)
    print(
        f"saved a random-weight {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters)"
        f" to {args.out}"
    )


if __name__ == "__main__":
    main()
