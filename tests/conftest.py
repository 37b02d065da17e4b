"""Test-wide settings: no network (Hugging Face Hub, Gradio's analytics), and Triton kernels run in
the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before
the test modules import hf_multilora.kernels. HF_HUB_OFFLINE must be set before huggingface_hub
is imported, hence the imports below the settings.
"""

import os

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the playground tests: Gradio calls home otherwise
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy
import importlib.util
import json
from pathlib import Path

import pytest
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The playground's tests need its extras ([dev] has them; .ci/run checks they import). Where they
# are missing, e.g. on the GPU machine, those modules are not collected instead of failing to import.
_APP_EXTRAS = ("gradio", "gradio_client", "playwright")
collect_ignore_glob = [] if all(importlib.util.find_spec(m) for m in _APP_EXTRAS) else ["test_app_*.py"]


VOCAB = 128
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# Adapters that differ in rank, alpha, target set, and PEFT options, for Llama-style models.
LLAMA_ADAPTERS = {
    "attn_r8": dict(r=8, lora_alpha=16, target_modules=ATTN),
    "qv_r4": dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "mlp_r16": dict(r=16, lora_alpha=8, target_modules=MLP),
    "patterns": dict(
        r=8,
        lora_alpha=8,
        target_modules=ATTN + MLP,
        rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 12},
        alpha_pattern={"v_proj": 64},
    ),
    "rslora": dict(r=16, lora_alpha=4, target_modules=ATTN + MLP, use_rslora=True),
}
GPT2_ADAPTERS = {
    "attn": dict(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True),
    "all": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
}


# Llama-style decoders: (config class, model class, what differs), all tiny.
_DECODERS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),  # GQA
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=8)),
}


class EndRowsAt(LogitsProcessor):
    """Row i emits `eos` at generation step ends[i] (0-based) and never before: ragged output lengths."""

    def __init__(self, prompt_length: int, ends: list[int], eos: int) -> None:
        self.prompt_length, self.ends, self.eos = prompt_length, torch.tensor(ends), eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        now = (self.ends == input_ids.shape[1] - self.prompt_length).to(scores.device)
        scores = scores.clone()
        scores[:, self.eos] = float("-inf")
        scores[now] = float("-inf")
        scores[now, self.eos] = 0.0
        return scores


def build_base(kind: str, seed: int = 0, **overrides):
    """A tiny model of `kind`; `overrides` replace config fields of the decoder kinds."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
        ).eval()
    config_cls, model_cls, specific = _DECODERS[kind]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        **{**specific, **overrides},
    )
    return model_cls(config).eval()


def save_adapter(base, directory: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT adapter with random non-zero A and B, saved in PEFT's format."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(directory)
    return directory


class Zoo:
    """A tiny base model with its adapters saved to disk, plus PEFT references per adapter."""

    def __init__(self, kind: str, specs: dict, root: Path):
        self.kind, self.base = kind, build_base(kind)
        self.paths = {
            name: save_adapter(self.base, root / kind / name, seed=i + 1, **spec)
            for i, (name, spec) in enumerate(specs.items())
        }
        self._peft: dict[str, PeftModel] = {}

    def fresh_base(self):
        return copy.deepcopy(self.base)

    def peft(self, name: str) -> PeftModel:
        """PEFT with only this adapter loaded and active: the reference for rows using it."""
        if name not in self._peft:
            self._peft[name] = PeftModel.from_pretrained(self.fresh_base(), self.paths[name]).eval()
        return self._peft[name]

    def peft_all(self) -> PeftModel:
        """One PEFT model holding every adapter, for PEFT's own mixed-batch path."""
        names = list(self.paths)
        model = PeftModel.from_pretrained(self.fresh_base(), self.paths[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(self.paths[name], adapter_name=name)
        return model.eval()


@pytest.fixture(scope="session")
def llama_zoo(tmp_path_factory):
    return Zoo("llama", LLAMA_ADAPTERS, tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def qwen2_zoo(tmp_path_factory):
    return Zoo("qwen2", LLAMA_ADAPTERS, tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def mistral_zoo(tmp_path_factory):
    return Zoo("mistral", LLAMA_ADAPTERS, tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def gpt2_zoo(tmp_path_factory):
    return Zoo("gpt2", GPT2_ADAPTERS, tmp_path_factory.mktemp("zoo"))


def char_tokenizer():
    """A character-level tokenizer of VOCAB tokens (<pad>, <s>, </s>, <unk>, then printable ASCII
    and some Latin-1 letters), so that a tiny model's outputs decode to text."""
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    chars += [chr(c) for c in range(0xC0, 0xC0 + VOCAB - len(special) - len(chars))]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + chars)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory) -> Path:
    """What the playground tests serve: `base/` (a tiny Llama with a character tokenizer, loadable
    by AutoModelForCausalLM / AutoTokenizer) and PEFT adapters in `adapters/<name>`."""
    root = tmp_path_factory.mktemp("served")
    base = build_base("llama")
    base.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    for i, name in enumerate(["attn_r8", "qv_r4", "mlp_r16"]):
        save_adapter(base, root / "adapters" / name, seed=i + 1, **LLAMA_ADAPTERS[name])
    return root


@pytest.fixture(scope="session")
def demo_dir(served_dir, tmp_path_factory):
    """Demo assets in the layout of app/demo_assets, made of the tiny served model."""
    root = tmp_path_factory.mktemp("demo")
    (root / "base").symlink_to(served_dir / "base")
    (root / "adapters").symlink_to(served_dir / "adapters")
    spec = {
        "base": "base",
        "prompt_format": "in: {text} out:",
        "base_task": "continues the text",
        "adapters": {
            name: {"path": f"adapters/{name}", "task": f"task {name}", "examples": []}
            for name in ["attn_r8", "qv_r4"]
        },
    }
    spec["adapters"]["qv_r4"]["examples"] = [{"text": "abc", "expected": "cba"}]
    (root / "demo.json").write_text(json.dumps(spec))
    return root
