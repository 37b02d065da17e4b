"""CPU speed (the playground's default device): the LoRA step and the paged cache without a GPU.

1. Demo generate: the playground's demo assets (app/demo_assets: a tiny char-level Llama and its
   LoRAs), a batch of `--rows` prompts with a different adapter each, `--new-tokens` greedy tokens
   (min = max, so every variant does the same work): the plain base model, PEFT's `adapter_names`,
   `MultiLoraModel.generate` (paged cache, its default, and with `paged_cache=False`) and the
   drop-in (`hf_multilora.enable` on the PeftModel). The adapter variants are checked to produce
   the same tokens.
2. Prefill: a tiny Llama (the demo's width, GQA, random weights, enough positions) and one prompt of
   each `--prompt-lengths` length through `MultiLoraModel.generate(max_new_tokens=1)`, with the
   paged cache and with `paged_cache=False` (transformers' own cache and sdpa attention).

Both run in ONE process in interleaved rounds: every variant once per round, in an order rotated
from round to round, after a warm-up round, because a shared CPU's speed drifts by more than the
effects measured. Reported: the median time per variant and the median over rounds of each round's
time ratio to the reference variant (PEFT for 1, `paged_cache=False` for 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_multilora
from hf_multilora import MultiLoraModel

DEMO_ASSETS = Path(__file__).resolve().parent.parent / "app" / "demo_assets"  # what the playground serves


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, `rounds` rounds of every variant once, order rotated every round."""
    names = list(variants)
    for name in names:  # warm-up: first-call costs (allocations, lazy imports) out of the timing
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: dict[str, list[float]], reference: str) -> list[dict[str, Any]]:
    """Per variant: median ms and the median of the per-round ratios to `reference`."""
    return [
        {
            "variant": name,
            "median_ms": 1e3 * common.median(ts),
            f"median_ratio_to_{reference}": common.median(
                [t / ref for t, ref in zip(ts, times[reference], strict=True)]
            ),
        }
        for name, ts in times.items()
    ]


def demo_generate(args: argparse.Namespace) -> list[dict[str, Any]]:
    assets = Path(args.assets)
    demo = json.loads((assets / "demo.json").read_text())
    names = list(demo["adapters"])[: args.rows]
    prompts = [demo["prompt_format"].format(text=demo["adapters"][n]["examples"][0]["text"]) for n in names]
    base_dir = assets / demo["base"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    def load_base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(base_dir).eval()

    def load_peft() -> PeftModel:
        model = PeftModel.from_pretrained(load_base(), assets / demo["adapters"][names[0]]["path"], names[0])
        for name in names[1:]:
            model.load_adapter(assets / demo["adapters"][name]["path"], adapter_name=name)
        return model.eval()

    base, peft = load_base(), load_peft()
    multi = MultiLoraModel.from_pretrained(
        load_base(), {n: assets / demo["adapters"][n]["path"] for n in names}
    )
    dropin = hf_multilora.enable(load_peft())
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def run(model: Any, **extra: Any) -> Callable[[], torch.Tensor]:
        return lambda: model.generate(**batch, **settings, **extra)

    variants = {
        "base": run(base),
        "peft": run(peft, adapter_names=names),
        "multilora": run(multi, adapter_names=names),
        "multilora_default_cache": run(multi, adapter_names=names, paged_cache=False),
        "dropin": run(dropin, adapter_names=names),
    }
    outputs = {name: fn() for name, fn in variants.items() if name != "base"}
    for name, out in outputs.items():
        if not torch.equal(out, outputs["peft"]):
            raise RuntimeError(f"{name} generated other tokens than PEFT: the comparison would be void")
    rows = summary(interleaved(variants, args.rounds), "peft")
    print(f"demo generate: {args.rows} rows, adapters {names}, {args.new_tokens} new tokens, {args.rounds} rounds")
    print(common.format_table(
        ("variant", "median ms", "/ PEFT (median of rounds)"),
        [(r["variant"], r["median_ms"], r["median_ratio_to_peft"]) for r in rows],
    ))  # fmt: skip
    return rows


def prefill(args: argparse.Namespace) -> list[dict[str, Any]]:
    longest = max(args.prompt_lengths)
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=longest + 16, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    multi = MultiLoraModel(LlamaForCausalLM(config).eval())
    results = []
    for length in args.prompt_lengths:
        ids = torch.randint(3, config.vocab_size, (1, length))

        def run(paged: bool, ids: torch.Tensor = ids) -> Callable[[], torch.Tensor]:
            return lambda: multi.generate(ids, max_new_tokens=1, do_sample=False, paged_cache=paged)

        variants = {"paged": run(True), "default_cache": run(False)}
        if not torch.equal(variants["paged"](), variants["default_cache"]()):
            raise RuntimeError(f"paged and default cache disagree at a {length}-token prompt")
        rows = summary(interleaved(variants, args.prefill_rounds), "default_cache")
        for row in rows:
            row["prompt"] = length
        results += rows
    print(f"prefill: 1 row, no adapter, {args.prefill_rounds} rounds")
    print(common.format_table(
        ("prompt", "variant", "median ms", "/ paged_cache=False (median of rounds)"),
        [(r["prompt"], r["variant"], r["median_ms"], r["median_ratio_to_default_cache"]) for r in results],
    ))  # fmt: skip
    return results


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3, help="prompts, each with another adapter (at most 4)")
    parser.add_argument("--assets", default=str(DEMO_ASSETS), help="demo assets folder (with demo.json)")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds of the demo generate")
    parser.add_argument("--prompt-lengths", type=common.parse_int_list, default=(2000, 6000))
    parser.add_argument("--prefill-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = {**common.environment(device), "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    print(f"{env['cpu']}, {env['cores']} cores, {env['threads']} threads; torch {env['torch']}, "
          f"transformers {env['transformers']}, peft {env['peft']}", flush=True)  # fmt: skip
    result: dict[str, Any] = {"environment": env, "args": vars(args)}
    if not args.skip_generate:
        result["demo_generate"] = demo_generate(args)
    if not args.skip_prefill:
        result["prefill"] = prefill(args)
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
