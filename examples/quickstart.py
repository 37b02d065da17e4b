"""Quickstart: three LoRA adapters and the base model in ONE batched generate() call.

Everything is local and tiny (a 2-layer Llama built from a config, random weights), so it runs in a
few seconds on a CPU with no network:

    python examples/quickstart.py

Steps: build the base, train-free "adapters" with PEFT (random non-zero A and B, different ranks and
target modules) saved in PEFT's format, load them all into a MultiLoraModel, generate with a
different adapter per row, and check a row against PEFT holding that adapter alone.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_multilora import MultiLoraModel

VOCAB = 128
ADAPTERS = {
    # name: LoRA settings; ranks and target modules differ per adapter
    "a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "b": dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "c": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


def build_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def save_adapter(base: LlamaForCausalLM, directory: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (init_lora_weights=False), saved to disk."""
    torch.manual_seed(seed)
    # get_peft_model changes the model it wraps: give it a copy so `base` stays untouched.
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(directory)
    return directory


def main() -> None:
    base = build_base()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            name: save_adapter(base, Path(tmp) / name, seed=i + 1, **spec)
            for i, (name, spec) in enumerate(ADAPTERS.items())
        }

        # MultiLoraModel patches the targeted layers of the model it wraps; wrap a copy, so that
        # `base` can serve below as the plain reference for PEFT.
        model = MultiLoraModel.from_pretrained(copy.deepcopy(base), adapters=paths)
        print("registered adapters:", model.adapter_names)

        # Four prompts; the second one is shorter and left-padded.
        input_ids = torch.randint(1, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :3] = 0
        input_ids[attention_mask == 0] = 0
        adapter_ids = ["a", None, "b", "c"]  # one entry per row; None = the base model

        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            adapter_ids=adapter_ids,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
        prompt_len = input_ids.shape[1]
        for row, adapter in enumerate(adapter_ids):
            print(f"row {row} adapter={adapter!s:<4} new tokens: {out[row, prompt_len:].tolist()}")
        print("memory:", model.memory_stats())

        # The same row through PEFT with only that adapter loaded (on an untouched copy of the base).
        row = 2
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths["b"]).eval()
        expected = peft_model.generate(
            input_ids=input_ids[row : row + 1],
            attention_mask=attention_mask[row : row + 1],
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
        print(f"row {row} vs PEFT with adapter 'b' alone:", expected[0].tolist())
        print("matches PEFT:", out[row].tolist() == expected[0].tolist())

        # A None row is exactly the base model.
        plain = base.generate(
            input_ids=input_ids[1:2],
            attention_mask=attention_mask[1:2],
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
        print("base row matches the base model:", out[1].tolist() == plain[0].tolist())


if __name__ == "__main__":
    main()
