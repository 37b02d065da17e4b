"""Decode with CUDA graphs vs eager vs transformers' compiled static cache, side by side in one process.

Rows, in interleaved rounds (every variant once per round, the order rotated; the host drifts):
  static (base)        the plain base model, `cache_implementation="static"` (transformers compiles
                       the decode step with CUDA graphs), warmed up first
  graphs, no adapter   MultiLoraModel.generate(cuda_graphs=True) without adapter_ids
  graphs x32 <setup>   MultiLoraModel.generate(cuda_graphs=True), 32 distinct adapters, rows rotated;
                       one row per adapter setup (qkvo-r16: rank 16 on q/k/v/o; all7-mixed: all
                       seven projections, ranks 8/16/32/64)
  eager x32 <first>    the first setup's call with cuda_graphs=False
  graphs x32 <first> kv <dtype>   the first setup's graph call with `kv_cache_dtype` (`--kv-dtypes
                       fp8,int4`; quantized KV pages), for issue 15's decode target (batch 16 x
                       4096: `--batch 16 --prompt-lens 4096`)
  graphs x32 <first> [kv <dtype>] budget <b>   the first setup's graph call with heavy-hitter
                       eviction (`--kv-budgets 0.2`: `kv_budget`, `kv_recent` 64), in the model's KV
                       dtype and each of `--kv-dtypes` (issue 15: int4 + budget 0.2)
`--kv-only` keeps the quantized rows alone, for contexts whose KV in the model's dtype does not fit.
  graphs x32 <first>, cuBLAS projections   (`--cublas-projections`) the first setup's graph call with
                       the decode projections left to nn.Linear (`decode_linears.py` off) on decode
                       graphs of its own: the one-launch projections' effect on the whole step
  graphs x32 <first>, LoRA expand per module   (`--per-module-lora`) likewise with the one-launch
                       projections but each module's LoRA expand its own launch (no
                       `layers.apply_lora_stacked`): the stacked expand's effect on the whole step

Each variant runs twice per round, with `new_tokens` and with 1 new token: the difference is the
decode time (prefill differenced out), reported per step. Llama-2-7B shapes, random bf16 weights;
`--tiny` checks the script on a toy model (CUDA still needed for graphs).

Roofline: the bytes a decode step must read (the weights but the embedding table, the KV of the
rows' mean context over the decode, and the rank rows of the adapters the batch uses) over the
step's time, as a fraction of a device-to-device copy's bandwidth (read + write) measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import common
import torch
from bench_generate import FULL, TINY, add_adapters, build_base, row_adapters

from hf_multilora import MultiLoraModel, layers
from hf_multilora.kernels.kv_quant import KvLayout


def timed(generate: Callable[[int], torch.Tensor], device: torch.device, new_tokens: int) -> tuple[float, float]:
    """(seconds of a call with new_tokens, seconds of a call with 1 new token)."""
    seconds = []
    for n in (new_tokens, 1):
        common.synchronize(device)
        start = time.perf_counter()
        generate(n)
        common.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def decode_ms(rounds: list[tuple[float, float]], new_tokens: int) -> list[float]:
    """Milliseconds per decode step of each round's `timed` pair: the 1-token call (the prefill)
    differenced out, over the new_tokens - 1 steps left."""
    return [1000 * (full - one) / (new_tokens - 1) for full, one in rounds]


def replay_gpu_ms(call: Callable[[int], torch.Tensor], new_tokens: int) -> float:
    """Median GPU time of one graph replay during a call (CUDA events around each replay): what a
    decode step costs the GPU, against the step's wall time, which adds HF's loop on the host."""
    with common.timed_replays() as events:
        call(new_tokens)
    torch.cuda.synchronize()
    return common.median([start.elapsed_time(end) for start, end in events])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-lens", type=common.parse_int_list, default=(128, 512))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--distinct", type=int, default=32)
    parser.add_argument("--setups", default="qkvo-r16,all7-mixed", help="adapter setups, comma-separated")
    parser.add_argument("--pool-gib", type=float, default=40.0, help="the page pool (adapters and KV)")
    parser.add_argument("--batch", type=int, help="rows per call (default: the profile's, 32 at full size)")
    parser.add_argument("--kv-dtypes", default="", help="quantized KV rows to add, comma-separated: fp8,int4")
    parser.add_argument("--kv-budgets", default="", help="eviction rows to add, comma-separated kv_budget: 0.2")
    parser.add_argument("--skip-static", action="store_true",
                        help="no transformers static-cache row (its cache and compiled graphs take ~2x the KV "
                             "of a batch 16 x 4096 call)")  # fmt: skip
    parser.add_argument("--kv-only", action="store_true",
                        help="only the --kv-dtypes rows (and their budgets): a context whose KV in the model's "
                             "dtype does not fit, e.g. 16 x 16384 at 7B on one H200")  # fmt: skip
    parser.add_argument("--cublas-projections", action="store_true",
                        help="also the first setup on a model whose decode projections are cuBLAS's")  # fmt: skip
    parser.add_argument("--per-module-lora", action="store_true",
                        help="also the first setup with a LoRA expand per module, not one per q/k/v and gate/up")  # fmt: skip
    parser.add_argument("--explain-oom", action="store_true",
                        help="record allocations; on running out of memory, print what holds it")  # fmt: skip
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    started = common.start(args.tiny)
    if started is None or not torch.cuda.is_available():
        print("CUDA graphs need a CUDA GPU", file=sys.stderr)
        return 1
    device, env = started
    profile = TINY if args.tiny else FULL
    dtype = torch.bfloat16
    base = build_base(profile, device, dtype)
    sets: dict[str, list[str]] = {}  # setup -> its adapters' names
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in args.setups.split(","):
            peft_model, names = add_adapters(base, profile.setups[name], args.distinct, dtype, keep_fp32=False)
            peft_model.save_pretrained(f"{tmp}/{name}")
            base = peft_model.unload()
            del peft_model
            common.free_memory()
            sets[name] = [f"{name}-{n}" for n in names]
            paths.update({f"{name}-{n}": f"{tmp}/{name}/{n}" for n in names})
        model = MultiLoraModel.from_pretrained(base, adapters=paths, pool_bytes=int(args.pool_gib * 2**30))
        settings = {}  # row suffix -> the setting, on decode graphs of its own
        if args.cublas_projections:
            settings["cuBLAS projections"] = OwnGraphs(model, lambda: swapped(model._fusion.linears, "groups", []))
        if args.per_module_lora:
            settings["LoRA expand per module"] = OwnGraphs(
                model, lambda: swapped(layers, "apply_lora_stacked", lambda forwards, x, ys: False)
            )
        model.prefetch_adapters(list(paths))
        bandwidth = copy_bandwidth(device)
        print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write)")
        with common.explained_oom(args.explain_oom):
            results = [
                run_prompt(model, sets, prompt, args, device, profile, bandwidth, settings) for prompt in args.prompt_lens
            ]
    payload = {"environment": env, "args": vars(args), "copy_bytes_per_s": bandwidth,
               "graph_stats": model.graph_stats(), "results": results}  # fmt: skip
    if args.json:
        common.write_json(args.json, payload)
    return 0


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy of 1 GiB moves (read + write), median of 10."""
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    return 2 * source.numel() / common.median(seconds[2:])


def step_bytes(
    model: MultiLoraModel,
    profile: Any,
    setup: str | None,
    distinct: int,
    batch: int,
    context: float,
    kv_dtype: str | None = None,
    kv_budget: float | None = None,
) -> float:
    """What one decode step reads at least: weights (the embedding table aside: a step reads `batch`
    rows of it), the rows' KV at `context` tokens (quantized: codes and scales,
    `KvLayout.token_bytes`; with eviction, the budget's share of them), and every used adapter's rank
    rows (A and B)."""
    base = model.base_model
    embedding = base.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in base.parameters() if p is not embedding)
    config, element = base.config, embedding.element_size()
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_key_value_heads * head_dim * element  # one layer's K and V
    if kv_dtype is not None:
        pool = model.page_pool()
        page_bytes = pool.page_elems * pool.storage.element_size()
        kv_per_token = KvLayout.of(kv_dtype, config.num_key_value_heads, head_dim, page_bytes).token_bytes
    kept = context if kv_budget is None else kv_budget * context
    kv = batch * kept * config.num_hidden_layers * kv_per_token
    adapters = 0
    if setup is not None:
        spec = profile.setups[setup]
        inner, hidden, kv_out = config.intermediate_size, config.hidden_size, config.num_key_value_heads * head_dim
        shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
                  "o_proj": (hidden, hidden), "gate_proj": (hidden, inner), "up_proj": (hidden, inner),
                  "down_proj": (inner, hidden)}  # fmt: skip
        per_rank = sum(sum(shapes[t]) for t in spec.targets) * config.num_hidden_layers * element
        adapters = sum(spec.rank(i) for i in range(min(distinct, batch))) * per_rank
    return weights + kv + adapters


@contextlib.contextmanager
def swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    kept = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, kept)


class OwnGraphs:
    """The model's calls under `change()` (a context), on decode graphs of their own: graphs
    captured without the change would replay the default path."""

    def __init__(self, model: MultiLoraModel, change: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.model, self.change = model, change
        self.graphs = None  # this setting's DecodeGraphs, kept between its calls

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        own, self.model._decode_graphs = self.model._decode_graphs, self.graphs
        try:
            with self.change():
                yield
        finally:
            self.graphs, self.model._decode_graphs = self.model._decode_graphs, own


def run_prompt(
    model: MultiLoraModel,
    sets: dict[str, list[str]],
    prompt: int,
    args: Any,
    device: torch.device,
    profile: Any,
    bandwidth: float,
    settings: dict[str, OwnGraphs],
):
    batch = args.batch or profile.batch
    torch.manual_seed(prompt)
    input_ids = torch.randint(3, 32000 if not args.tiny else 128, (batch, prompt), device=device)
    mask = torch.ones_like(input_ids)
    fixed = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    base = model.base_model

    def static(n: int) -> torch.Tensor:
        return base.generate(input_ids, max_new_tokens=n, min_new_tokens=n, cache_implementation="static", **fixed)

    def ours(
        rows: list[str] | None, graphs: bool, kv_dtype: str | None = None, kv_budget: float | None = None,
        setting: Callable[[], Any] = contextlib.nullcontext,
    ) -> Callable[[int], torch.Tensor]:
        def call(n: int) -> torch.Tensor:
            with setting():
                return model.generate(input_ids, adapter_ids=rows, max_new_tokens=n, min_new_tokens=n,
                                      cuda_graphs=graphs, kv_cache_dtype=kv_dtype, kv_budget=kv_budget, **fixed)  # fmt: skip
        return call

    def rotated(
        names: list[str], graphs: bool, kv_dtype: str | None = None, kv_budget: float | None = None,
        setting: Callable[[], Any] = contextlib.nullcontext,
    ) -> Callable[[int], Callable[[int], torch.Tensor]]:
        def rows(r: int) -> list[str]:
            return row_adapters(names[r:] + names[:r], len(names), batch)

        return lambda r: ours(rows(r), graphs, kv_dtype, kv_budget, setting)

    variants: dict[str, Callable[[int], Callable[[int], torch.Tensor]]] = {
        "static (base)": lambda r: static,
        "graphs, no adapter": lambda r: ours(None, True),
    }
    if args.skip_static:
        del variants["static (base)"]
    setup_of: dict[str, str | None] = {"static (base)": None, "graphs, no adapter": None}
    for setup, names in sets.items():
        variants[f"graphs x{len(names)} {setup}"] = rotated(names, True)
        setup_of[f"graphs x{len(names)} {setup}"] = setup
    first = next(iter(sets))
    variants[f"eager x{len(sets[first])} {first}"] = rotated(sets[first], False)
    setup_of[f"eager x{len(sets[first])} {first}"] = first
    for suffix, setting in settings.items():
        name = f"graphs x{len(sets[first])} {first}, {suffix}"
        variants[name], setup_of[name] = rotated(sets[first], True, setting=setting.active), first
    kv_of: dict[str, str | None] = {}  # rows with a KV cache setting: their kv_cache_dtype
    budget_of: dict[str, float] = {}
    kv_dtypes = list(filter(None, args.kv_dtypes.split(",")))
    for kv_dtype in kv_dtypes:
        name = f"graphs x{len(sets[first])} {first} kv {kv_dtype}"
        variants[name], setup_of[name], kv_of[name] = rotated(sets[first], True, kv_dtype), first, kv_dtype
    for budget in map(float, filter(None, args.kv_budgets.split(","))):
        for kv_dtype in [None, *kv_dtypes]:
            name = f"graphs x{len(sets[first])} {first}{f' kv {kv_dtype}' if kv_dtype else ''} budget {budget:g}"
            variants[name] = rotated(sets[first], True, kv_dtype, budget)
            setup_of[name], kv_of[name], budget_of[name] = first, kv_dtype, budget
    if args.kv_only:
        variants = {name: make for name, make in variants.items() if kv_of.get(name)}
    for name, make in variants.items():  # warm-up: compile, capture, Triton
        graph_gib = model.graph_stats().get("graph_pool_bytes", 0) / 2**30
        print(f"warm-up {name}: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB at most so far, graph pools {graph_gib:.1f} GiB")
        for _ in range(2):
            timed(make(0), device, args.new_tokens)
    captures_before = model.graph_stats().get("captures", 0)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(timed(variants[name](r), device, args.new_tokens))
            print(f"round {r} {name}: {decode_ms(times[name][-1:], args.new_tokens)[0]:.2f} ms per decode step",
                  flush=True)
    rows = []
    for name, pairs in times.items():
        step_ms = decode_ms(pairs, args.new_tokens)
        tok_s = [batch * args.new_tokens / full for full, _ in pairs]
        rows.append({"variant": name, "decode_ms_per_step": common.median(step_ms),
                     "tok_s": common.median(tok_s), "rounds": pairs})  # fmt: skip
    static_ms = decode_ms(times.get("static (base)", []), args.new_tokens)
    for row in rows:
        ours_ms = decode_ms(row["rounds"], args.new_tokens)
        ratios = [s / m for s, m in zip(static_ms, ours_ms, strict=True)] if static_ms else []  # --skip-static
        row["decode_speed_vs_static"] = common.median(ratios) if ratios else float("nan")
    eager = next((r for r in rows if r["variant"].startswith("eager")), None)
    graphs = next((r for r in rows if r["variant"].startswith("graphs x") and r["variant"] not in kv_of), None)
    context = prompt + args.new_tokens / 2
    for row in rows:
        if not row["variant"].startswith("eager"):  # transformers' static cache replays graphs too
            row["replay_gpu_ms"] = replay_gpu_ms(variants[row["variant"]](0), args.new_tokens)
        row["bytes_per_step"] = step_bytes(model, profile, setup_of[row["variant"]], args.distinct, batch, context,
                                           kv_of.get(row["variant"]), budget_of.get(row["variant"]))  # fmt: skip
        row["roofline_fraction"] = row["bytes_per_step"] / (row["decode_ms_per_step"] / 1000) / bandwidth
    captures = model.graph_stats().get("captures", 0) - captures_before
    print(f"\n== prompt {prompt}, batch {batch}, {args.new_tokens} new tokens, {args.rounds} rounds")
    print(common.format_table(
        ["variant", "decode ms/step", "GPU ms/replay", "tok/s", "decode speed / static", "GB/step", "of copy bw"],
        [[r["variant"], round(r["decode_ms_per_step"], 2), round(r.get("replay_gpu_ms", float("nan")), 2),
          round(r["tok_s"], 1), round(r["decode_speed_vs_static"], 3), round(r["bytes_per_step"] / 1e9, 2),
          round(r["roofline_fraction"], 3)] for r in rows],
    ))  # fmt: skip
    print(f"captures during the timed rounds: {captures}")
    if graphs is None or eager is None:  # --kv-only
        return {"prompt": prompt, "rows": rows, "captures_in_timed_rounds": captures}
    print(f"{graphs['variant']} end-to-end / eager: {graphs['tok_s'] / eager['tok_s']:.2f}x")
    own_ms = decode_ms(graphs["rounds"], args.new_tokens)
    for row in rows:
        if row["variant"] in kv_of:  # decode speed against the same call with the model's own KV dtype, per round
            kv_ms = decode_ms(row["rounds"], args.new_tokens)
            row["decode_speed_vs_own_kv"] = common.median([a / b for a, b in zip(own_ms, kv_ms, strict=True)])
            print(f"{row['variant']}: decode speed / {graphs['variant']}: {row['decode_speed_vs_own_kv']:.2f}x")
    return {"prompt": prompt, "rows": rows, "captures_in_timed_rounds": captures}


if __name__ == "__main__":
    sys.exit(main())
