"""KV caches side by side for the base model: PagedCache vs DynamicCache vs StaticCache.

1. Decode throughput at batch B and contexts C (default 32 x 512 and 32 x 4096, Llama-2-7B shapes,
   random bf16 weights): generate() with a C-token prompt is timed for 1 and for 1 + N new tokens;
   decode tok/s = B * N / (difference), so prefill is not counted; `--repeats` rounds in which every
   cache runs once, after a warm-up round, and the ratio to DynamicCache is the median of the
   rounds' ratios (the host drifts between rounds). PagedCache runs with the
   registered paged attention; the others with sdpa. Tokens are checked equal across caches.
2. Capacity: in the same device memory, the largest batch each cache completes for one request
   workload. `ragged` (the target's): what a served batch looks like -- prompt lengths spread evenly
   over [P/8, P] (left-padded, as HF batches them) and output lengths over [N/8, N] (each row ends on
   EOS at its length: a logits processor forces it), default P = 1024, N = 512, seeded, the same
   rows for every cache. `uniform`: every prompt P and every output N tokens (no waste to remove).
   A model of the same shape but fewer layers (KV bytes per layer are what matter; fewer layers make
   each trial cheap) runs under `torch.cuda.set_per_process_memory_fraction`, capped at its
   weights + `--capacity-gib`. Every cache lives in that cap: DynamicCache and StaticCache take what
   they need from the allocator; PagedCache's pool is sized to the cap minus the weights minus the
   peak memory the allocator reserves for that batch's prefill (measured with no cache kept), less
   2%, and it runs as `MultiLoraModel.generate` runs it: left-padding blocks take no pages and
   `ReleaseFinishedRows` gives back the pages of rows that ended. A binary search over the batch,
   from 1 to the most rows the padded KV could ever fit; a run fails on out of memory or
   PoolExhaustedError. StaticCache runs uncompiled here (a compile per batch size would dominate
   the time; its memory is the same).
3. Lockstep decode (`--lockstep-contexts`, default 512): PagedCache and DynamicCache decode steps
   taken in turn on one prompt, so both meet the host in the same state (see `lockstep`); paged
   tok/s / dynamic tok/s per round, median over rounds.
4. `--kv-dtypes bf16,fp8,int4` (with `--kv-batch`, `--kv-contexts`): the decode attention of one
   Llama-2-7B layer (32 heads x 128, pages of 256 KiB) per KV dtype: bf16 through `PagedDecode`
   (stores the new token and attends), fp8 / int4 through `paged_attention_quant`, the new token
   stored as PagedCache stores it (`write_kv_quant` first). Each dtype's 20 calls are one CUDA graph,
   as decode steps run (eager calls were host-bound at 1k keys), replayed in interleaved rounds whose
   order rotates (CUDA events, the median after a warm-up round). Reports microseconds per call, the
   KV bytes read per call / time, and the speed-up over bf16.
5. `--profile`: per decode step and cache, GPU time per kernel and the busiest host ops (profiles
   of 1 and of 1 + N new tokens, differenced), to tell a GPU-bound step from a host-bound one.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from itertools import zip_longest
from typing import Any

import bench_generate
import common
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    StoppingCriteriaList,
)

from hf_multilora.cache import PagedCache, ReleaseFinishedRows, set_attention, use_paged_attention
from hf_multilora.memory.page_pool import PagePool, PoolExhaustedError

GIB = 2**30
PAD, EOS = 0, 2


def build(layers: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """bench_generate's Llama-2-7B shapes with `layers` layers and room for long contexts."""
    config = {**bench_generate.FULL.config, "num_hidden_layers": layers}
    torch.manual_seed(0)
    with bench_generate.default_placement(device, dtype):
        return LlamaForCausalLM(LlamaConfig(max_position_embeddings=8192, **config)).eval()


def kv_page_elems(config: LlamaConfig, block_size: int = 16) -> int:
    return 2 * block_size * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)


def run(
    model: LlamaForCausalLM,
    kind: str,
    input_ids: torch.Tensor,
    new_tokens: int,
    pool: PagePool | None,
    disable_compile: bool = False,
    attention_mask: torch.Tensor | None = None,
    output_lengths: torch.Tensor | None = None,
):
    """One generate() with a fresh cache of `kind`; the paged one is released afterwards. With
    `output_lengths`, row i ends on EOS after output_lengths[i] tokens (never before)."""
    cache: Any
    if kind == "paged":
        cache = PagedCache(pool, model.config)
        use_paged_attention(model)
    else:
        set_attention(model, "sdpa")
        if kind == "static":
            cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + new_tokens)
        else:
            cache = DynamicCache(config=model.config)
    lengths: dict[str, Any] = dict(min_new_tokens=new_tokens)
    if output_lengths is not None:
        lengths = dict(
            eos_token_id=EOS,
            logits_processor=LogitsProcessorList([EosAt(input_ids.shape[1], output_lengths)]),
            stopping_criteria=StoppingCriteriaList([ReleaseFinishedRows(cache, EOS)] if kind == "paged" else []),
        )
    try:
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
            past_key_values=cache,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            disable_compile=disable_compile,
            **lengths,
        )
    finally:
        if kind == "paged":
            cache.release()
        set_attention(model, "sdpa")


class EosAt(LogitsProcessor):
    """Row i's output is exactly lengths[i] tokens: EOS is forced as its last token, banned before."""

    def __init__(self, prompt_width: int, lengths: torch.Tensor) -> None:
        self.prompt_width, self.lengths = prompt_width, lengths

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ends = (self.lengths.to(scores.device) == input_ids.shape[1] - self.prompt_width + 1)[:, None]
        is_eos = torch.arange(scores.shape[1], device=scores.device)[None, :] == EOS
        return scores.masked_fill(ends != is_eos, float("-inf"))


def decode_pool(model: LlamaForCausalLM, kind: str, input_ids: torch.Tensor, new_tokens: int) -> PagePool | None:
    """For the paged cache, a pool holding the KV of `input_ids` plus `new_tokens` (a block of slack
    per row, 5% spare); None for the others: the pool exists only while the paged cache runs."""
    if kind != "paged":
        return None
    config = model.config
    batch, context = input_ids.shape
    kv_bytes = 2 * config.num_hidden_layers * batch * (context + new_tokens + 16) * config.hidden_size * 2
    return PagePool.for_device(kv_page_elems(config), torch.bfloat16, input_ids.device, pool_bytes=int(kv_bytes * 1.05))


def seconds(device: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    common.synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    common.synchronize(device)
    return time.perf_counter() - start, out


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Rounds of (every cache once), so each round's ratios share the host's speed of that moment."""
    model = build(args.layers, device, torch.bfloat16)
    results = []
    for context in args.contexts:
        input_ids = torch.randint(3, 32000, (args.batch, context), device=device)
        rates: dict[str, list[float]] = {kind: [] for kind in args.caches}
        outputs = {}
        for round_ in range(-1, args.repeats):  # round -1 warms up (StaticCache: compiles these shapes)
            for kind in args.caches:  # the pool exists only while the paged cache runs
                if kind in outputs and outputs[kind] is None:
                    continue  # ran out of memory before
                pool = decode_pool(model, kind, input_ids, args.new_tokens)
                try:
                    t1, _ = seconds(device, run, model, kind, input_ids, 1, pool)
                    tn, out = seconds(device, run, model, kind, input_ids, 1 + args.new_tokens, pool)
                except torch.OutOfMemoryError:
                    print(f"  context {context} {kind:<8} out of memory", flush=True)
                    out = None
                outputs[kind] = None if out is None else out[:, context:].cpu()
                if out is not None and round_ >= 0:
                    rates[kind].append(args.batch * args.new_tokens / (tn - t1))
                    print(f"  context {context} round {round_} {kind:<8} decode {rates[kind][-1]:10.1f} tok/s (prefill+1 {t1:.3f} s)", flush=True)
                del pool
                common.free_memory()
        for kind, values in rates.items():
            row = {"context": context, "cache": kind, "decode_tok_s": common.median(values) if values else None, "rounds": values}
            if values and rates.get("dynamic"):
                row["round_ratios_to_dynamic"] = [a / b for a, b in zip(values, rates["dynamic"], strict=True)]
                row["median_ratio_to_dynamic"] = common.median(row["round_ratios_to_dynamic"])
            if outputs.get(kind) is not None and outputs.get(args.caches[0]) is not None:
                row["tokens_equal_to_" + args.caches[0]] = (outputs[kind] == outputs[args.caches[0]]).float().mean().item()
            results.append(row)
    del model
    common.free_memory()
    return results


def lockstep(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Decode steps of PagedCache and DynamicCache taken in turn on the same prompt, one step each
    (paged-dynamic, then dynamic-paged, ...): both meet the host in the same state to within a step
    (~20 ms), which whole generate() calls seconds apart do not (their round ratios ranged
    0.86-1.76 on the H200 host). A step does by hand what generate() does per token -- the forward
    with the cache, the next token by argmax, the mask grown by one -- timed to a device
    synchronisation; the attention implementation is switched between steps, outside the timing.
    Both caches are held at once, so 2 x the KV of a context must fit. Round -1 warms up."""
    model = build(args.layers, device, torch.bfloat16)
    results = []
    for context in args.lockstep_contexts:
        input_ids = torch.randint(3, 32000, (args.batch, context), device=device)
        rounds: list[dict[str, float]] = []
        for round_ in range(-1, args.repeats):
            seconds, tokens = lockstep_round(model, input_ids, args.lockstep_tokens, device)
            if round_ < 0:
                continue
            rates = {kind: args.batch * len(s) / sum(s) for kind, s in seconds.items()}
            median_ms = {kind: 1e3 * common.median(s) for kind, s in seconds.items()}
            equal = (tokens["paged"] == tokens["dynamic"]).float().mean().item()
            rounds.append({"decode_tok_s": rates, "median_step_ms": median_ms, "tokens_equal": equal})
            print(
                f"  lockstep context {context} round {round_}: paged {rates['paged']:.1f} / dynamic "
                f"{rates['dynamic']:.1f} tok/s = {rates['paged'] / rates['dynamic']:.3f}; median step ms "
                f"{median_ms['paged']:.2f} / {median_ms['dynamic']:.2f}",
                flush=True,
            )
        ratios = [r["decode_tok_s"]["paged"] / r["decode_tok_s"]["dynamic"] for r in rounds]
        results.append({"context": context, "rounds": rounds, "ratios": ratios, "median_ratio": common.median(ratios)})
        common.free_memory()
    del model
    common.free_memory()
    return results


def lockstep_round(
    model: LlamaForCausalLM, input_ids: torch.Tensor, steps: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """(seconds per decode step, generated tokens) per cache, for one prefill + `steps` steps each."""
    pool = decode_pool(model, "paged", input_ids, steps)
    caches = {"paged": PagedCache(pool, model.config), "dynamic": DynamicCache(config=model.config)}
    state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    seconds: dict[str, list[float]] = {kind: [] for kind in caches}
    generated: dict[str, list[torch.Tensor]] = {kind: [] for kind in caches}

    def step(kind: str, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if kind == "paged":
            use_paged_attention(model)
        else:
            set_attention(model, "sdpa")
        common.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=mask, past_key_values=caches[kind], use_cache=True, logits_to_keep=1
            )
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        common.synchronize(device)
        if ids.shape[1] == 1:  # prefill not counted
            seconds[kind].append(time.perf_counter() - start)
        state[kind] = (token, mask)
        generated[kind].append(token)

    try:
        for kind in caches:
            step(kind, input_ids, torch.ones_like(input_ids))
        for i in range(steps):
            for kind in (("paged", "dynamic") if i % 2 == 0 else ("dynamic", "paged")):
                step(kind, *state[kind])
    finally:
        caches["paged"].release()
        set_attention(model, "sdpa")
    return seconds, {kind: torch.cat(t, dim=1).cpu() for kind, t in generated.items()}


def decode_profile(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Per decode step, where each cache's time goes: torch.profiler over generate() with 1 and with
    1 + N new tokens, the difference divided by N, so prefill drops out. GPU time per kernel name and
    the host's busiest ops; the host blocked on a full launch queue ("Command Buffer Full") means
    the step was GPU-bound."""
    from torch.profiler import ProfilerActivity, profile

    def totals(fn: Callable[..., Any], *fn_args: Any) -> tuple[dict[str, float], dict[str, float]]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn(*fn_args)
            common.synchronize(device)
        events = prof.key_averages()
        gpu = {e.key: e.self_device_time_total for e in events if e.self_device_time_total > 0}
        host = {e.key: e.self_cpu_time_total for e in events}
        return gpu, host

    model = build(args.layers, device, torch.bfloat16)
    results = []
    for context in args.contexts:
        input_ids = torch.randint(3, 32000, (args.batch, context), device=device)
        for kind in args.caches:
            pool = decode_pool(model, kind, input_ids, args.new_tokens)
            run(model, kind, input_ids, 1 + args.new_tokens, pool)  # warm up
            gpu1, host1 = totals(run, model, kind, input_ids, 1, pool)
            gpun, hostn = totals(run, model, kind, input_ids, 1 + args.new_tokens, pool)
            per_step = {
                side: sorted(
                    ((k, (after.get(k, 0.0) - before.get(k, 0.0)) / args.new_tokens) for k in after),
                    key=lambda item: -item[1],
                )[:12]
                for side, before, after in (("gpu", gpu1, gpun), ("host", host1, hostn))
            }
            results.append({"context": context, "cache": kind, "us_per_step": per_step})
            print(f"  context {context} {kind}: per decode step, us (GPU kernels | host ops)", flush=True)
            for (g_name, g_us), (h_name, h_us) in zip_longest(per_step["gpu"], per_step["host"], fillvalue=("", 0.0)):
                print(f"    {g_us:9.1f}  {g_name[:58]:<58} | {h_us:9.1f}  {h_name[:40]}", flush=True)
            del pool
            common.free_memory()
    del model
    common.free_memory()
    return results


def activation_peak(model, batch: int, prompt: int, device: torch.device) -> int:
    """Device bytes a prefill of `batch` x `prompt` reserves beyond what is allocated, keeping no KV.
    Reserved, not allocated: the cap applies to the allocator's segments, and activations sized by
    their allocated peak alone ran out of memory inside the cap (measured on an H200)."""
    input_ids = torch.randint(3, 32000, (batch, prompt), device=device)
    common.free_memory()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_reserved(device)
    with torch.no_grad():
        model(input_ids, use_cache=False, logits_to_keep=1)
    return torch.cuda.max_memory_reserved(device) - before


def workload(name: str, rows: int, prompt: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt lengths, output lengths) of `rows` requests; seeded, so batch b is the first b rows
    of batch b + 1."""
    if name == "uniform":
        return torch.full((rows,), prompt), torch.full((rows,), new_tokens)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(prompt // 8, prompt + 1, (rows,), generator=gen)
    outputs = torch.randint(new_tokens // 8, new_tokens + 1, (rows,), generator=gen)
    return prompts, outputs


def left_padded(lengths: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of these lengths, left-padded to the longest, and their attention mask."""
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] >= width - lengths[:, None]
    ids = torch.randint(3, 32000, mask.shape).masked_fill(~mask, PAD)
    return ids.to(device), mask.long().to(device)


def fits(model, kind: str, prompts: torch.Tensor, outputs: torch.Tensor, cap: int, device) -> bool:
    pool = None
    batch = prompts.shape[0]
    try:
        if kind == "paged":
            weights = torch.cuda.memory_allocated(device)
            spare = int(0.98 * (cap - weights - activation_peak(model, batch, int(prompts.max()), device)))
            page_elems = kv_page_elems(model.config)
            if spare < 2 * page_elems:
                return False
            pool = PagePool.for_device(page_elems, torch.bfloat16, device, pool_bytes=spare)
        input_ids, mask = left_padded(prompts, device)
        new_tokens = int(outputs.max())
        run(model, kind, input_ids, new_tokens, pool, True, attention_mask=mask, output_lengths=outputs)
        return True
    except (torch.OutOfMemoryError, PoolExhaustedError) as error:
        print(f"    {kind} batch {batch}: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
        return False
    finally:
        del pool
        common.free_memory()


def capacity(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    model = build(args.capacity_layers, device, torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cap = weights + int(args.capacity_gib * GIB)  # the same total for every cache
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    token_kv = 2 * args.capacity_layers * model.config.num_key_value_heads * head_dim * 2
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    results = []
    try:
        for name in args.capacity_workloads:
            most = 4 * int(args.capacity_gib * GIB) // (token_kv * (args.capacity_prompt + args.capacity_new_tokens))
            prompts, outputs = workload(name, most, args.capacity_prompt, args.capacity_new_tokens)
            for kind in args.caches:
                lo, hi = 0, most + 1  # lo fits (0 trivially), hi does not
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    ok = fits(model, kind, prompts[:mid], outputs[:mid], cap, device)
                    lo, hi = (mid, hi) if ok else (lo, mid)
                context = int(prompts[:lo].max() + outputs[:lo].max()) if lo else 0
                real = int((prompts[:lo] + outputs[:lo]).sum())
                results.append(
                    {"workload": name, "cache": kind, "max_batch": lo, "context": context, "real_tokens": real}
                )
                print(
                    f"  capacity {name:<8} {kind:<8} batch {lo} (longest context {context}, "
                    f"{real} prompt + output tokens)",
                    flush=True,
                )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return results


_GRAPH_CALLS = 20  # calls of one KV dtype's attention per CUDA graph (section 4)


def kv_dtype_kernels(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Section 4 of the module doc."""
    from hf_multilora.kernels.kv_quant import KvLayout
    from hf_multilora.kernels.paged_attention import PagedDecode
    from hf_multilora.kernels.paged_attention_quant import paged_attention_quant, write_kv_quant

    heads, dim, batch, dtype = 32, 128, args.kv_batch, torch.bfloat16
    page_elems = 2 * 16 * heads * dim  # 16 bf16 tokens of K and V
    results = []
    for context in args.kv_contexts:
        calls, bytes_read = {}, {}
        for kv_dtype in args.kv_dtypes:
            layout = None if kv_dtype == "bf16" else KvLayout.of(kv_dtype, heads, dim, page_elems * 2)
            tokens = 16 if layout is None else layout.tokens
            blocks = -(-context // tokens)
            storage = torch.randn(batch * blocks * page_elems + page_elems, dtype=dtype, device=device)
            if layout is not None:  # random codes and sane scales: write real tokens over the random bytes
                storage.zero_()
            table = torch.randperm(batch * blocks, device=device).int().view(batch, blocks)
            kv_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            q = torch.randn(batch, heads, 1, dim, dtype=dtype, device=device)
            k = torch.randn(batch, heads, 1, dim, dtype=dtype, device=device)
            if layout is None:
                plan = PagedDecode(storage, page_elems, 16, batch, heads, heads, dim, blocks, dim**-0.5)
                calls[kv_dtype] = lambda plan=plan, q=q, k=k, table=table, kv_lens=kv_lens, storage=storage: plan(
                    q, k, k, table, kv_lens
                )
                bytes_read[kv_dtype] = batch * context * 2 * heads * dim * 2
            else:
                history = torch.randn(batch, context, heads, dim, dtype=dtype, device=device)
                write_kv_quant(storage, layout, table, 0, history, history)
                del history
                qt, kt = q.transpose(1, 2), k.transpose(1, 2)

                def call(storage=storage, layout=layout, table=table, kv_lens=kv_lens, qt=qt, kt=kt) -> None:
                    write_kv_quant(storage, layout, table, kv_lens - 1, kt, kt)  # as PagedCache stores a decode token
                    paged_attention_quant(qt, kt, kt, storage, layout, table, kv_lens, dim**-0.5)

                calls[kv_dtype] = call
                bytes_read[kv_dtype] = batch * context * layout.token_bytes
        graphs = {name: common.graph_of(call, _GRAPH_CALLS) for name, call in calls.items()}
        times = common.replay_rounds(graphs, args.repeats + 1, _GRAPH_CALLS)  # the first round warms up
        for name, samples in times.items():
            us = sorted(samples[1:])[len(samples[1:]) // 2]
            base = sorted(times["bf16"][1:])[len(samples[1:]) // 2] if "bf16" in times else None
            row = {"context": context, "batch": batch, "kv_dtype": name, "us": us,
                   "gb_s": bytes_read[name] / us / 1e3, "speedup_vs_bf16": base / us if base else None}  # fmt: skip
            results.append(row)
            print(f"kv {row}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--contexts", type=common.parse_int_list, default=(512, 4096))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every cache, after a warm-up round")
    parser.add_argument("--caches", type=lambda s: s.split(","), default=["paged", "dynamic", "static"])
    parser.add_argument("--capacity-layers", type=int, default=16)
    parser.add_argument("--capacity-prompt", type=int, default=1024, help="the longest prompt")
    parser.add_argument("--capacity-new-tokens", type=int, default=512, help="the longest output")
    parser.add_argument(
        "--capacity-workloads", type=lambda s: s.split(","), default=["ragged", "uniform"], help="ragged,uniform"
    )
    parser.add_argument(
        "--capacity-gib", type=float, default=8, help="memory beyond the weights, for KV and activations"
    )
    parser.add_argument(
        "--lockstep-contexts", type=common.parse_int_list, default=(512,), help="contexts of the lockstep decode"
    )
    parser.add_argument("--lockstep-tokens", type=int, default=64, help="decode steps per cache and round")
    parser.add_argument("--skip-lockstep", action="store_true")
    parser.add_argument("--skip-capacity", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="also: GPU kernels and host ops per decode step, per cache"
    )
    parser.add_argument("--kv-dtypes", type=lambda s: s.split(","), help="e.g. bf16,fp8,int4: section 4 only")
    parser.add_argument("--kv-batch", type=int, default=16)
    parser.add_argument("--kv-contexts", type=common.parse_int_list, default=(1024, 4096, 16384))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cache.py measures GPU memory and decode speed; no GPU here.", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    env = common.environment(device)
    print(f"device {env['device']}; torch {env['torch']}, transformers {env.get('transformers')}", flush=True)
    result: dict[str, Any] = {"environment": env, "args": vars(args)}
    if args.kv_dtypes:
        result["kv_dtypes"] = kv_dtype_kernels(args, device)
        print(common.format_table(
            ("context", "kv dtype", "us", "GB/s", "x bf16"),
            [(r["context"], r["kv_dtype"], r["us"], r["gb_s"], r["speedup_vs_bf16"] or "-") for r in result["kv_dtypes"]],
        ))  # fmt: skip
        if args.json:
            common.write_json(args.json, result)
        return 0
    if not args.skip_throughput:
        result["throughput"] = throughput(args, device)
    if not args.skip_lockstep:
        result["lockstep"] = lockstep(args, device)
    if args.profile:
        result["decode_profile"] = decode_profile(args, device)
    result["capacity"] = [] if args.skip_capacity else capacity(args, device)
    rows = [r for r in result.get("throughput", []) if r.get("decode_tok_s")]
    by = {(r["context"], r["cache"]): r.get("median_ratio_to_dynamic") for r in rows}
    if rows:
        print(common.format_table(
            ("context", "cache", "decode tok/s (median)", "/ dynamic (median of rounds)"),
            [(r["context"], r["cache"], r["decode_tok_s"], r.get("median_ratio_to_dynamic", "-")) for r in rows],
        ))
    for name in args.capacity_workloads:
        cap = {r["cache"]: r["max_batch"] for r in result["capacity"] if r["workload"] == name}
        if not cap:
            continue
        print(f"capacity, {name} workload:")
        print(common.format_table(
            ("cache", "max batch", "/ dynamic"),
            [(k, v, v / cap["dynamic"] if cap.get("dynamic") else "-") for k, v in cap.items()],
        ))
        if name == "ragged" and cap.get("dynamic") and "paged" in cap:
            ratio = cap["paged"] / cap["dynamic"]
            print(f"  target paged capacity / dynamic: {ratio:.3g} (>= 1.3) {'MET' if ratio >= 1.3 else 'MISSED'}")
    for context in args.contexts:
        ratio = by.get((context, "paged"))
        if ratio is not None:
            print(f"  target paged decode / dynamic at {context}: {ratio:.3g} (>= 1.0) {'MET' if ratio >= 1 else 'MISSED'}")
    for row in result.get("lockstep", []):
        ratio = row["median_ratio"]
        print(
            f"  target paged decode / dynamic at {row['context']}, lockstep steps: {ratio:.3g} (>= 1.0) "
            f"{'MET' if ratio >= 1 else 'MISSED'}"
        )
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
