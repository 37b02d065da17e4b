"""Build the playground's demo assets (app/demo_assets, package data of hf_multilora.app): a tiny
character-level Llama that repeats its input, and four PEFT LoRA adapters that each make it do one
visible text task instead (see examples/demo_tasks.py). Trains on a CPU in about 6 minutes (2 cores),
offline, from fixed seeds (the weights still differ in the last bits between torch builds):

    python examples/build_demo_assets.py                 # writes app/demo_assets
    python examples/build_demo_assets.py --quick --out /tmp/assets   # a few steps: checks the pipeline

The base model and the adapters are trained together: each step, the base rows learn to copy with
no adapter active and each adapter's rows learn its task through that adapter (base weights
shared, every LoRA weight only trained by its own task). This reaches exact answers in a fraction
of the steps that training the base first and then each adapter on the frozen base would take,
and the result is the same kind of artefact: a base model that copies, and plain LoRA deltas.
At the end it prints each task's held-out exact match (teacher forced: every output token is the
argmax, i.e. what greedy decoding produces).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import demo_tasks
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent.parent / "app" / "demo_assets"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
BASE = "base"  # the task name of rows without an adapter
TASKS: dict[str, Callable[[str], str]] = {
    BASE: demo_tasks.BASE_TASK[1],
    **{name: fn for name, (_, fn) in demo_tasks.ADAPTER_TASKS.items()},
}
# Rows per step of each task, in units of --batch-size: the tasks that take longest to learn (where
# the answer's words do not line up with the input's) get the most.
ROWS = {BASE: 1, "upper": 1, "reverse": 1.5, "digits": 3, "cipher": 1}
LORA = dict(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, so that any typed text encodes and outputs decode
    back to exactly the characters generated."""
    chars = [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_base(vocab_size: int) -> LlamaForCausalLM:
    """A 4-layer Llama, small enough to commit (~2.7 MB) and to train on 2 CPU cores."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config)
    # Outputs end at EOS by themselves; 64 new tokens cover the longest answer of any task.
    model.generation_config = GenerationConfig(
        eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS, max_new_tokens=64, do_sample=False
    )
    return model


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str], task: Callable[[str], str]):
    """Right-padded `prompt + answer + EOS` rows; labels only on the answer and its EOS."""
    prompts = tokenizer([demo_tasks.prompt(t) for t in texts])["input_ids"]
    answers = tokenizer([task(t) for t in texts])["input_ids"]
    length = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers, strict=True))
    input_ids = torch.full((len(texts), length), PAD)
    labels = torch.full((len(texts), length), -100)
    attention_mask = torch.zeros((len(texts), length), dtype=torch.long)
    for row, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        seq = p + a + [EOS]
        input_ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(p) : len(seq)] = torch.tensor([*a, EOS])
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask, labels


def build_peft(base: LlamaForCausalLM) -> PeftModel:
    """The base with one LoRA per adapter task; every weight, base included, trainable."""
    names = list(demo_tasks.ADAPTER_TASKS)
    model = get_peft_model(base, LoraConfig(**LORA), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**LORA))
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def task_loss(model: PeftModel, task: str, batch) -> torch.Tensor:
    """The loss of one task's rows: with no adapter for the base task, else through its adapter."""
    input_ids, attention_mask, labels = batch
    if task == BASE:
        with model.disable_adapter():
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    model.base_model.set_adapter(task)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


@torch.no_grad()
def exact_match(model: PeftModel, task: str, batch) -> float:
    """Share of rows whose every answer token is the argmax: what greedy decoding would produce."""
    input_ids, attention_mask, labels = batch
    if task == BASE:
        with model.disable_adapter():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    else:
        model.base_model.set_adapter(task)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    return ((predicted == target) | (target == -100)).all(dim=1).float().mean().item()


def train(model: PeftModel, tokenizer, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """AdamW with a linear warm-up and cosine decay; every step one batch per task."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    start = time.time()
    for step in range(steps):
        losses = {}
        for task, fn in TASKS.items():
            texts = demo_tasks.training_texts(rng, round(ROWS[task] * batch_size))
            loss = task_loss(model, task, encode(tokenizer, texts, fn))
            loss.backward()
            losses[task] = loss.item()
        for param in model.parameters():  # set_adapter() froze the other adapters; train them all
            param.requires_grad_(True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            shown = " ".join(f"{task}={loss:.3f}" for task, loss in losses.items())
            print(f"step {step:4d} {time.time() - start:6.1f}s loss {shown}", flush=True)
    model.eval()


def held_out_accuracy(model: PeftModel, tokenizer, texts: list[str]) -> dict[str, float]:
    return {task: exact_match(model, task, encode(tokenizer, texts, fn)) for task, fn in TASKS.items()}


def demo_spec(examples_per_adapter: int) -> dict:
    """demo.json: paths relative to the assets folder, held-out examples with computed answers.
    Every adapter gets the same texts, so one prompt shows them side by side."""
    texts = demo_tasks.held_out_texts(examples_per_adapter, seed=1)
    adapters = {
        name: {
            "path": f"adapters/{name}",
            "task": description,
            "examples": [{"text": text, "expected": fn(text)} for text in texts],
        }
        for name, (description, fn) in demo_tasks.ADAPTER_TASKS.items()
    }
    return {
        "base": "base",
        "prompt_format": demo_tasks.PROMPT_FORMAT,
        "base_task": demo_tasks.BASE_TASK[0],
        "adapters": adapters,
    }


def save(model: PeftModel, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """base/ (model, generation config, tokenizer), adapters/<name>/ (PEFT format) and demo.json."""
    # save_pretrained puts every adapter but "default" in a sub-folder of its name.
    model.save_pretrained(out / "adapters")
    (out / "adapters" / "README.md").unlink()  # PEFT's empty model-card template
    base = model.unload()  # the LoRA layers removed, not merged: the trained base as it is
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    (out / "demo.json").write_text(json.dumps(demo_spec(examples_per_adapter=6), indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ASSETS, help="output folder (default: app/demo_assets)")
    parser.add_argument("--quick", action="store_true", help="a few training steps: checks the pipeline only")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step of the base task")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CI has 2 cores)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_peft(build_base(len(tokenizer)))
    train(model, tokenizer, 3 if args.quick else args.steps, args.batch_size, args.lr, args.seed)
    accuracy = held_out_accuracy(model, tokenizer, demo_tasks.held_out_texts(200, seed=0))
    print("held-out exact match:", " ".join(f"{task}={acc:.3f}" for task, acc in accuracy.items()))
    save(model, tokenizer, args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
