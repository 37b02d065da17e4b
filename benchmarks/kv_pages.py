"""Pool pages a request holds, per KV dtype and eviction budget: issue 15's "tokens per pool" targets
counted from what the code allocates, not from the layout arithmetic.

One row of a Llama with Llama-2-7B's attention geometry (32 KV heads x 128 dims, bf16: 256 KiB
pages) but `--layers` layers and a narrow MLP, so it runs on a CPU: pages are counted per layer, and
the ratio to bf16 does not depend on the layer count or on the weights (random). For each prompt
length L in `--prompt-lens`, the row is prefilled with L random tokens and decodes `--new-tokens`
greedy tokens through a PagedCache (the torch paths on CPU, the Triton kernels on CUDA); the KV
pages it holds are read from the pool after every forward. Reported: the pages held after the
prefill (the whole prompt: eviction compacts it at the first decode step), the most held after any
decode step, and "tokens per pool vs bf16": bf16's most over the variant's while decoding (how many
more decoding requests one pool holds; one request prefills at a time). A compaction briefly holds
the kept slots' new pages and the old ones together, inside a forward; that transient is not in
the counts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import common
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_multilora.cache import PagedCache, paged_attention_in
from hf_multilora.memory.page_pool import PagePool
from hf_multilora.model import _cache_keyword

VARIANTS = {  # name: (kv_dtype, kv_budget)
    "bf16": (None, None),
    "fp8": ("fp8", None),
    "int4": ("int4", None),
    "budget 0.2": (None, 0.2),
    "int4 + budget 0.2": ("int4", 0.2),
}
PAGE_ELEMS = 16 * 2 * 32 * 128  # 16 bf16 tokens of K and V of one layer: Llama-2-7B's page


def pages_held(model: LlamaForCausalLM, ids: torch.Tensor, new_tokens: int, kv_dtype: str | None,
               kv_budget: float | None, kv_recent: int) -> tuple[int, int]:  # fmt: skip
    """(the KV pages the row held after the prefill, the most it held after any decode step)."""
    # room for the whole context in bf16 pages twice over: a compaction copies the kept slots into
    # fresh pages before it frees the old ones
    pool_pages = model.config.num_hidden_layers * 2 * (-(-(ids.shape[1] + new_tokens) // 16) + 1)
    pool = PagePool(pool_pages, PAGE_ELEMS, model.dtype, model.device)
    cache = PagedCache(pool, model.config, kv_dtype=kv_dtype, kv_budget=kv_budget, kv_recent=kv_recent)
    keyword = _cache_keyword(model)
    held = []
    try:
        with torch.no_grad(), paged_attention_in(model):
            logits = model(input_ids=ids, use_cache=True, **{keyword: cache}).logits[:, -1]
            held.append(pool.stats()["pages_kv"])
            for _ in range(new_tokens):
                token = logits.argmax(-1, keepdim=True)
                logits = model(input_ids=token, use_cache=True, **{keyword: cache}).logits[:, -1]
                held.append(pool.stats()["pages_kv"])
    finally:
        cache.release()
    return held[0], max(held[1:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-lens", type=common.parse_int_list, default=(1024, 4096))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--kv-recent", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = common.environment(device)
    print(f"device {env['device']}; torch {env['torch']}, transformers {env['transformers']}", flush=True)
    config = LlamaConfig(hidden_size=32 * 128, num_attention_heads=32, num_key_value_heads=32, intermediate_size=256,
                         num_hidden_layers=args.layers, vocab_size=1024, max_position_embeddings=2 * max(args.prompt_lens)
                         + args.new_tokens)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    rows: list[dict[str, Any]] = []
    for prompt in args.prompt_lens:
        ids = torch.randint(3, config.vocab_size, (1, prompt), device=device)
        decoding = {}
        for name, (kv_dtype, kv_budget) in VARIANTS.items():
            prefilled, decoding[name] = pages_held(model, ids, args.new_tokens, kv_dtype, kv_budget, args.kv_recent)
            rows.append({"prompt": prompt, "variant": name, "pages_after_prefill": prefilled,
                         "most_pages_decoding": decoding[name],
                         "tokens_per_pool_vs_bf16": decoding["bf16"] / decoding[name]})  # fmt: skip
            print(f"prompt {prompt}, {name}: {rows[-1]}", flush=True)
    print(f"\n== KV pages of one row ({args.layers} layer(s), Llama-2-7B attention geometry), prompt + "
          f"{args.new_tokens} new tokens, kv_recent {args.kv_recent}")  # fmt: skip
    print(common.format_table(["prompt", "KV", "pages after prefill", "most pages decoding", "tokens per pool vs bf16"],
                              [[r["prompt"], r["variant"], r["pages_after_prefill"], r["most_pages_decoding"],
                                round(r["tokens_per_pool_vs_bf16"], 2)] for r in rows]))  # fmt: skip
    if args.json:
        common.write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
