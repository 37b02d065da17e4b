"""The committed demo assets (app/demo_assets, shipped in the package) do what demo.json says: in
ONE batched generate() mixing every adapter and the base model over held-out prompts, each row does
its own task.

The expected answers come from examples/demo_tasks.py, the functions the assets were trained on,
never from stored strings. Nothing is retrained here except by the --quick smoke test of the build
script, which only checks that its output is written and loadable.
"""

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hf_multilora.app.demo import DEMO_ASSETS
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_multilora import MultiLoraModel

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ASSETS = DEMO_ASSETS  # what the package ships
MIN_EXACT_MATCH = 0.9
PROMPTS = 20  # held-out texts; each is one row per adapter plus one base row


def example_module(name: str) -> ModuleType:
    """Import examples/<name>.py (examples/ is not a package). Registered in sys.modules so that the
    build script's own `import demo_tasks` finds the same module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


demo_tasks = example_module("demo_tasks")


@pytest.fixture(scope="module")
def demo() -> dict:
    return json.loads((ASSETS / "demo.json").read_text())


@pytest.fixture(scope="module")
def served(demo):
    """The base and all four adapters in one MultiLoraModel, and the base's tokenizer."""
    model = MultiLoraModel.from_pretrained(
        ASSETS / demo["base"], adapters={name: ASSETS / a["path"] for name, a in demo["adapters"].items()}
    )
    return model, AutoTokenizer.from_pretrained(ASSETS / demo["base"])


def generate(served, prompts: list[str], adapter_ids: list[str | None]) -> list[str]:
    """One batched greedy generate() call, left-padded; the answers as the playground shows them."""
    model, tokenizer = served
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, adapter_ids=adapter_ids, do_sample=False, max_new_tokens=64)
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def test_held_out_prompts_are_never_trained_on():
    held_out = demo_tasks.held_out_texts(200)
    trained = demo_tasks.training_texts(random.Random(0), 20_000)
    assert len(set(held_out)) == len(held_out)
    assert all(demo_tasks.is_held_out(text) for text in held_out)
    assert not set(held_out) & set(trained)


def test_demo_json_matches_the_task_functions(demo):
    assert demo["base"] == "base"
    assert demo["prompt_format"] == demo_tasks.PROMPT_FORMAT
    assert demo["base_task"] == demo_tasks.BASE_TASK[0]
    assert list(demo["adapters"]) == list(demo_tasks.ADAPTER_TASKS) == ["upper", "reverse", "digits", "cipher"]
    for name, adapter in demo["adapters"].items():
        description, fn = demo_tasks.ADAPTER_TASKS[name]
        assert adapter["path"] == f"adapters/{name}" and adapter["task"] == description
        assert len(adapter["examples"]) >= 5
        for example in adapter["examples"]:
            assert demo_tasks.is_held_out(example["text"])
            assert example["expected"] == fn(example["text"]) != example["text"]


def test_assets_are_in_hf_and_peft_formats(demo):
    base = ASSETS / demo["base"]
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]:
        assert (base / name).is_file(), name
    assert AutoModelForCausalLM.from_pretrained(base).generation_config.eos_token_id is not None
    for adapter in demo["adapters"].values():
        for name in ["adapter_config.json", "adapter_model.safetensors"]:
            assert (ASSETS / adapter["path"] / name).is_file(), adapter["path"]


def test_one_mixed_batch_does_every_task(served, demo):
    texts = demo_tasks.held_out_texts(PROMPTS)
    names = list(demo["adapters"])
    tasks = {None: demo_tasks.BASE_TASK[1]} | {name: demo_tasks.ADAPTER_TASKS[name][1] for name in names}
    # Rows interleave the tasks, so every adapter's rows sit next to other adapters' and base rows.
    rows = [(text, adapter) for text in texts for adapter in tasks]
    prompts = [demo["prompt_format"].replace("{text}", text) for text, _ in rows]
    answers = dict(zip(rows, generate(served, prompts, [adapter for _, adapter in rows]), strict=True))

    for adapter, fn in tasks.items():
        wrong = [(text, answers[text, adapter], fn(text)) for text in texts if answers[text, adapter] != fn(text)]
        assert 1 - len(wrong) / len(texts) >= MIN_EXACT_MATCH, (adapter, wrong)
        if adapter is not None:  # routing is real: the adapter's row is not the base row
            assert all(answers[text, adapter] != answers[text, None] for text in texts), adapter


def test_build_script_quick(tmp_path):
    """--quick: a few training steps, then the same files as app/demo_assets, loadable."""
    build = example_module("build_demo_assets")
    build.main(["--quick", "--out", str(tmp_path), "--threads", str(torch.get_num_threads())])
    demo = json.loads((tmp_path / "demo.json").read_text())
    model = MultiLoraModel.from_pretrained(
        tmp_path / demo["base"], adapters={name: tmp_path / a["path"] for name, a in demo["adapters"].items()}
    )
    assert model.adapter_names == list(demo_tasks.ADAPTER_TASKS)
    AutoTokenizer.from_pretrained(tmp_path / demo["base"])
    assert torch.is_tensor(model(torch.tensor([[5, 6, 7]]), adapter_ids=["upper"]).logits)
