"""Decode with CUDA graphs vs eager vs transformers' compiled static cache, side by side in one process.

Rows, in interleaved rounds (every variant once per round, the order rotated; the host drifts):
  static (base)        the plain base model, `cache_implementation="static"` (transformers compiles
                       the decode step with CUDA graphs), warmed up first
  graphs, no adapter   MultiLoraModel.generate(cuda_graphs=True) without adapter_ids
  graphs x32           MultiLoraModel.generate(cuda_graphs=True), 32 distinct adapters, rows rotated
  eager x32            the same call with cuda_graphs=False

Each variant runs twice per round, with `new_tokens` and with 1 new token: the difference is the
decode time (prefill differenced out), reported per step. Llama-2-7B shapes, random bf16 weights,
rank-16 q/k/v/o adapters; `--tiny` checks the script on a toy model (CUDA still needed for graphs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import common
import torch
from bench_generate import FULL, TINY, add_adapters, build_base, row_adapters

from hf_multilora import MultiLoraModel


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


def replay_gpu_ms(call: Callable[[int], torch.Tensor], new_tokens: int) -> float:
    """Median GPU time of one graph replay during a call (CUDA events around each replay): what a
    decode step costs the GPU, against the step's wall time, which adds HF's loop on the host."""
    events = []
    replay = torch.cuda.CUDAGraph.replay

    def timed(graph: torch.cuda.CUDAGraph) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay(graph)
        end.record()
        events.append((start, end))

    torch.cuda.CUDAGraph.replay = timed
    try:
        call(new_tokens)
    finally:
        torch.cuda.CUDAGraph.replay = replay
    torch.cuda.synchronize()
    return common.median([start.elapsed_time(end) for start, end in events])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-lens", type=common.parse_int_list, default=(128, 512))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--distinct", type=int, default=32)
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
    setup = profile.setups["qkvo-r16"]
    base = build_base(profile, device, dtype)
    peft_model, names = add_adapters(base, setup, args.distinct, dtype, keep_fp32=False)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        base = peft_model.unload()
        del peft_model
        common.free_memory()
        paths = {n: f"{tmp}/{n}" for n in names}
        model = MultiLoraModel.from_pretrained(base, adapters=paths)
        model.prefetch_adapters(names)
        results = [run_prompt(model, names, prompt, args, device, profile.batch) for prompt in args.prompt_lens]
    payload = {"environment": env, "args": vars(args), "graph_stats": model.graph_stats(), "results": results}
    if args.json:
        common.write_json(args.json, payload)
    return 0


def run_prompt(model: MultiLoraModel, names: list[str], prompt: int, args: Any, device: torch.device, batch: int):
    torch.manual_seed(prompt)
    input_ids = torch.randint(3, 32000 if not args.tiny else 128, (batch, prompt), device=device)
    mask = torch.ones_like(input_ids)
    fixed = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    base = model.base_model

    def static(n: int) -> torch.Tensor:
        return base.generate(input_ids, max_new_tokens=n, min_new_tokens=n, cache_implementation="static", **fixed)

    def ours(rows: list[str] | None, graphs: bool) -> Callable[[int], torch.Tensor]:
        def call(n: int) -> torch.Tensor:
            return model.generate(input_ids, adapter_ids=rows, max_new_tokens=n, min_new_tokens=n,
                                  cuda_graphs=graphs, **fixed)  # fmt: skip
        return call

    variants: dict[str, Callable[[int], Callable[[int], torch.Tensor]]] = {
        "static (base)": lambda r: static,
        "graphs, no adapter": lambda r: ours(None, True),
        f"graphs x{len(names)}": lambda r: ours(row_adapters(names[r:] + names[:r], len(names), batch), True),
        f"eager x{len(names)}": lambda r: ours(row_adapters(names[r:] + names[:r], len(names), batch), False),
    }
    for make in variants.values():  # warm-up: compile, capture, Triton
        for _ in range(2):
            timed(make(0), device, args.new_tokens)
    captures_before = model.graph_stats().get("captures", 0)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(timed(variants[name](r), device, args.new_tokens))
    steps = args.new_tokens - 1
    rows = []
    for name, pairs in times.items():
        step_ms = [1000 * (full - one) / steps for full, one in pairs]
        tok_s = [batch * args.new_tokens / full for full, _ in pairs]
        rows.append({"variant": name, "decode_ms_per_step": common.median(step_ms),
                     "tok_s": common.median(tok_s), "rounds": pairs})  # fmt: skip
    static_ms = [1000 * (f - o) / steps for f, o in times["static (base)"]]
    for row in rows:
        ours_ms = [1000 * (f - o) / steps for f, o in row["rounds"]]
        row["decode_speed_vs_static"] = common.median([s / m for s, m in zip(static_ms, ours_ms, strict=True)])
    eager = next(r for r in rows if r["variant"].startswith("eager"))
    graphs = next(r for r in rows if r["variant"].startswith("graphs x"))
    for row in rows:
        if row["variant"].startswith("graphs"):
            row["replay_gpu_ms"] = replay_gpu_ms(variants[row["variant"]](0), args.new_tokens)
    captures = model.graph_stats().get("captures", 0) - captures_before
    print(f"\n== prompt {prompt}, batch {batch}, {args.new_tokens} new tokens, {args.rounds} rounds")
    print(common.format_table(
        ["variant", "decode ms/step", "GPU ms/replay", "tok/s", "decode speed / static"],
        [[r["variant"], round(r["decode_ms_per_step"], 2), round(r.get("replay_gpu_ms", float("nan")), 2),
          round(r["tok_s"], 1), round(r["decode_speed_vs_static"], 3)] for r in rows],
    ))  # fmt: skip
    print(f"graphs x{len(names)} end-to-end / eager: {graphs['tok_s'] / eager['tok_s']:.2f}x; "
          f"captures during the timed rounds: {captures}")  # fmt: skip
    return {"prompt": prompt, "rows": rows, "captures_in_timed_rounds": captures}


if __name__ == "__main__":
    sys.exit(main())
