"""PEFT drop-in: keep your PeftModel and its `adapter_names=[...]` calls; hf_multilora.enable() makes
PEFT's mixed-batch path run as one SGMV shrink/expand per LoRA layer instead of a Python loop over
the adapters of the batch.

Tiny and local (a 2-layer Llama from a config, two adapters with random weights), a few seconds on
a CPU:

    python examples/peft_dropin.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_multilora

VOCAB = 128


def main() -> None:
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
    base = LlamaForCausalLM(config).eval()

    with tempfile.TemporaryDirectory() as tmp:
        # Two adapters saved in PEFT's format (random non-zero weights, different ranks and targets).
        specs = {
            "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            "mlp": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
        }
        paths = {}
        for seed, (name, spec) in enumerate(specs.items(), start=1):
            torch.manual_seed(seed)
            trained = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **spec))
            paths[name] = Path(tmp) / name
            trained.save_pretrained(paths[name])

        # The usual PEFT setup: one PeftModel holding both adapters.
        peft_model = PeftModel.from_pretrained(base, paths["attn"], adapter_name="attn")
        peft_model.load_adapter(paths["mlp"], adapter_name="mlp")
        peft_model.eval()

        input_ids = torch.randint(1, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
        adapter_names = ["attn", "__base__", "mlp", "attn"]  # PEFT's per-row keyword
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, adapter_names=adapter_names)

        before = peft_model.generate(input_ids=input_ids, **kwargs)  # PEFT's own loop over adapters

        hf_multilora.enable(peft_model)  # same model object, same calls: now through the SGMV kernels
        after = peft_model.generate(input_ids=input_ids, **kwargs)

        for row, name in enumerate(adapter_names):
            print(f"row {row} {name:<8} {after[row, input_ids.shape[1] :].tolist()}")
        print("same tokens as before enable():", torch.equal(before, after))

        hf_multilora.disable(peft_model)  # PEFT's own forward again


if __name__ == "__main__":
    main()
