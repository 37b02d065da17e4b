"""Serving under load: the engine on an open-loop trace, against one generate() per request and the
base model alone through transformers' continuous batching and static compiled batches.

The trace (seeded): `--requests` requests with Poisson arrivals at each `--rates` (requests per
second; `inf`: all at once, i.e. saturation), prompt lengths uniform in `--prompt-lens`, output
lengths uniform in `--output-lens` (EOS ignored, so every request decodes exactly its length), and
adapters drawn Zipf(`--zipf`) (or `--popularity uniform`) over each count in `--adapters` registered ones (q/k/v/o, ranks 8/16;
folders written as bench_adapter_scale.py writes them, all read into host memory first, as S-LoRA's
setting is).

Rows, in one process:
  engine           Engine.submit at each arrival (a thread waits for each request's tokens):
                   throughput = output tokens / (last finish - first arrival); TTFT and time per
                   output token (TPOT), p50 / p99; its phases: wall seconds in prefills and in decode
                   steps, prompt tokens and padded slots prefilled, and on CUDA the GPU seconds of
                   the decode steps' graph replays (the rest of decode_seconds is host time);
                   where TTFT goes (`ttft_parts_s`: queued until the prefill forward that took the
                   request, that forward, the rest) and the 8 slowest requests with their prefill
                   group; Python's garbage collections inside the run (`gc_pauses`, per generation)
                   and the CUDA segments the allocator took (`cuda_allocations`); the engine
                   freezes its start-up heap (`freeze_gc`), as the server does
  (a) generate     one MultiLoraModel.generate per request, in arrival order (a request starts when
                   it has arrived and the one before has finished); same metrics (`--generate-requests
                   N`: the trace's first N requests only, for its throughput)
  (b) hf cb        the base model alone through transformers' `generate_batch` (its continuous
                   batching), every prompt at once, max_new_tokens = the trace's mean output length
                   (same output tokens in total; it takes one length for all)
  (c) hf static    the base model alone in static batches of 32 in arrival order through generate
                   with `cache_implementation="static"` (compiled on CUDA); a batch decodes to its
                   longest request, throughput counts the tokens asked for; timed on a second pass
                   (the first compiles)
(b) and (c) run at saturation only. Llama-2-7B shapes on CUDA; `--tiny` checks the script on CPU.

`--host-profile` runs each trace once more with the engine's decode steps and prefill forwards
each under a cProfile of its own and puts the top functions by own time in the JSON (where a
phase's host time goes; GPU time shows as the wait in the sampling's `tolist`).

`--capture-graphs`: each engine captures its decode graphs before its warm-up run
(`Engine.capture_decode_graphs` for the longest request, with its default adapters: batches without
adapters and one adapter per rank capacity), as a server does at start-up; the JSON gives the
seconds it took.

`--kv-cache-dtypes model,int4` runs the engine once per KV dtype on each trace (quantized KV pages in
the same pool: more requests fit), `--scheduling async,sync` once with each engine scheduling
(`async_scheduling`: a decode step launched before the last one's tokens are read, or not). Every
adapter count's adapters are registered up front, and `--rounds N` runs every (count, rate, KV
dtype, scheduling) N times, alternating the order between rounds (the host drifts); ratios
(quantized KV / the model's dtype, each count / the fewest, async / sync) are of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import math
import pstats
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_adapter_scale as scale
import common
import torch
from bench_generate import FULL, TINY, build_base

from hf_multilora import MultiLoraModel
from hf_multilora.kernels.launch import compiled_variants
from hf_multilora.serving import Engine, SamplingParams


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds from the start
    prompt_ids: list[int]
    output_len: int
    adapter: str | None


def make_trace(args: argparse.Namespace, rate: float, names: list[str], vocab: int) -> list[TraceRequest]:
    rng = random.Random(args.seed)
    weights = scale.popularity_weights(len(names), args.popularity, args.zipf, rng) if names else None
    clock, trace = 0.0, []
    for _ in range(args.requests):
        clock += 0.0 if math.isinf(rate) else rng.expovariate(rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*args.prompt_lens))]
        adapter = rng.choices(names, weights=weights)[0] if names else None
        trace.append(TraceRequest(clock, prompt, rng.randint(*args.output_lens), adapter))
    return trace


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan")}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99)}


def summary(trace: list[TraceRequest], firsts: list[float], ends: list[float]) -> dict:
    """Times are seconds from the trace's start."""
    tokens = sum(r.output_len for r in trace)
    ttft = [f - r.arrival for r, f in zip(trace, firsts, strict=True)]
    tpot = [(e - f) / max(r.output_len - 1, 1) for r, f, e in zip(trace, firsts, ends, strict=True)]
    return {"tok_s": tokens / max(ends) if ends else 0.0, "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "seconds": max(ends)}  # fmt: skip


def run_engine(engine: Engine, trace: list[TraceRequest]) -> dict:
    firsts, ends = [0.0] * len(trace), [0.0] * len(trace)
    start = time.perf_counter()
    waiters, ids = [], []
    prefills: dict[str, tuple[float, float, int, int, int]] = {}  # request id -> its prefill (see ttft_parts)
    prefill = engine._prefill

    def timed_prefill(requests: list[Any]) -> None:
        width, running = max(r.context_length() for r in requests), len(engine._running) - len(requests)
        began = time.perf_counter() - start
        prefill(requests)
        done = time.perf_counter() - start
        for request in requests:
            prefills[request.request_id] = (began, done, len(requests), width, running)

    engine._prefill = timed_prefill

    def wait(i: int, stream: Any) -> None:
        for event in stream:
            if event.token_id is not None and not firsts[i]:
                firsts[i] = time.perf_counter() - start
        ends[i] = time.perf_counter() - start

    for i, request in enumerate(trace):
        delay = request.arrival - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        params = SamplingParams(max_tokens=request.output_len, temperature=0, ignore_eos=True)
        stream = engine.submit(request.prompt_ids, request.adapter, params)
        ids.append(stream.request_id)
        waiters.append(threading.Thread(target=wait, args=(i, stream)))
        waiters[-1].start()
    for waiter in waiters:
        waiter.join()
    engine._prefill = prefill
    phases = {k: engine.stats[k] for k in ("prefills", "prefill_tokens", "prefill_padding", "prefill_seconds",
                                           "decode_steps", "decode_seconds", "reserve_seconds", "prefetch_seconds")}  # fmt: skip
    return {**summary(trace, firsts, ends), "preemptions": engine.stats["preemptions"],
            "max_batch": max(engine.batch_sizes, default=0), "phases": phases,
            **ttft_parts(trace, firsts, [prefills.get(i) for i in ids])}  # fmt: skip


def ttft_parts(trace: list[TraceRequest], firsts: list[float], prefills: list[tuple | None]) -> dict:
    """Where time to first token goes: queued (arrival to the start of the prefill forward that took
    the request), that forward, and the rest (the token's way to the client); and the slowest
    requests, each with its prefill group (rows, width) and the rows already running."""
    parts, slowest = {"queued": [], "prefill": [], "after": []}, []
    for request, first, timing in zip(trace, firsts, prefills, strict=True):
        if timing is None:  # its prefill ran alone after a group's failed: not split
            continue
        began, done, rows, width, running = timing
        parts["queued"].append(began - request.arrival)
        parts["prefill"].append(done - began)
        parts["after"].append(first - done)
        slowest.append({"ttft": first - request.arrival, "arrival": request.arrival, "queued": began - request.arrival,
                        "prefill": done - began, "rows": rows, "width": width, "running": running})  # fmt: skip
    slowest.sort(key=lambda s: -s["ttft"])
    return {"ttft_parts_s": {k: percentiles(v) for k, v in parts.items()}, "slowest": slowest[:8]}


def host_profiles(engine: Engine, trace: list[TraceRequest], top: int = 30) -> dict[str, list[dict]]:
    """The trace once more with the engine thread's decode steps and prefill forwards each under a
    cProfile of its own (it slows them, so not in the timed run): per phase, the `top` functions by
    own time, where its host time goes."""
    profiles = {"decode": cProfile.Profile(), "prefill": cProfile.Profile()}
    originals = {"decode": engine._decode, "prefill": engine._prefill}

    def profiled(phase: str) -> Callable[..., None]:
        def run(*args: Any) -> None:
            profiles[phase].enable()
            try:
                originals[phase](*args)
            finally:
                profiles[phase].disable()

        return run

    engine._decode, engine._prefill = profiled("decode"), profiled("prefill")
    try:
        run_engine(engine, trace)
    finally:
        engine._decode, engine._prefill = originals["decode"], originals["prefill"]
    tables = {}
    for phase, profile in profiles.items():
        rows = sorted(pstats.Stats(profile).stats.items(), key=lambda item: -item[1][2])[:top]
        tables[phase] = [{"function": f"{path}:{line}({name})", "calls": calls, "own_s": own, "cumulative_s": cumulative}
                         for (path, line, name), (_, calls, own, cumulative, _) in rows]  # fmt: skip
    return tables


def run_trace(
    model: MultiLoraModel, tokenizer: Any, trace: list[TraceRequest], args: argparse.Namespace, kv_dtype: str,
    scheduling: str, warm_up: bool,
) -> dict:
    """One engine over the trace; with `warm_up`, the whole trace at once first: compiles, plans, and
    captures the decode graphs of the batch buckets and table widths the trace reaches (a server's
    first minutes). Residency, graph and Triton compile counts are the timed run's (the model's run
    from its wrapping)."""
    kv_cache_dtype = None if kv_dtype == "model" else kv_dtype
    with Engine(model, tokenizer, max_running=args.max_running, kv_cache_dtype=kv_cache_dtype,
                async_scheduling=scheduling == "async", freeze_gc=True) as engine:
        capture_seconds = None
        if warm_up and args.capture_graphs and engine.cuda_graphs:
            started = time.perf_counter()
            engine.capture_decode_graphs(max(args.prompt_lens) + max(args.output_lens))
            capture_seconds = time.perf_counter() - started
        if warm_up:
            run_engine(engine, [dataclasses.replace(r, arrival=0.0) for r in trace])
            engine.stats.clear(), engine.batch_sizes.clear()
        before, graphs, compiles = model.memory_stats(), model.graph_stats(), compiled_variants()
        timing = common.timed_replays() if torch.cuda.is_available() else contextlib.nullcontext([])
        allocations = cuda_allocations()
        with timing as replays, common.gc_pauses() as gc_pauses:
            result = run_engine(engine, trace)
        result["gc_pauses"] = gc_pauses
        result["cuda_allocations"] = {k: v - allocations[k] for k, v in cuda_allocations().items()}
        after, graphs_after = model.memory_stats(), model.graph_stats()
        compiled = compiled_variants() - compiles  # inside the timed run
        result["triton_compiles"], result["triton_compiled"] = compiled.total(), dict(compiled)
        if capture_seconds is not None:
            result["capture_decode_graphs_seconds"] = capture_seconds
        if args.host_profile:
            result["host_profiles"] = host_profiles(engine, trace)
    if replays:  # the decode steps' GPU time, against their wall time (result["phases"]["decode_seconds"])
        torch.cuda.synchronize()
        gpu_ms = [start.elapsed_time(end) for start, end in replays]
        result["phases"]["replay_gpu_seconds"] = sum(gpu_ms) / 1000
        result["phases"]["replay_gpu_ms_p50"] = common.median(gpu_ms)
    result["residency"] = {k: after[k] - before[k] for k in ("hits", "misses", "evictions")}
    result["graphs"] = {k: graphs_after.get(k, 0) - graphs.get(k, 0) for k in ("captures", "replays")}
    return result


def cuda_allocations() -> dict[str, int]:
    """The caching allocator's segments taken from the driver (cudaMalloc) and its retries after
    freeing its cache, so far: what a run's difference names as a stall of its own."""
    if not torch.cuda.is_available():
        return {"segments": 0, "retries": 0}
    stats = torch.cuda.memory_stats()
    return {"segments": stats.get("segment.all.allocated", 0), "retries": stats.get("num_alloc_retries", 0)}


def run_generate_each(model: MultiLoraModel, trace: list[TraceRequest], device: torch.device) -> dict:
    """(a): requests one after another, each when it has arrived and the previous one is done (the
    clock is simulated from measured durations, so the run does not sleep)."""
    firsts, ends, clock = [], [], 0.0
    for request in trace:
        ids = torch.tensor([request.prompt_ids], device=device)
        common.synchronize(device)
        began = time.perf_counter()
        model.generate(ids, adapter_ids=[request.adapter], max_new_tokens=1, min_new_tokens=1, do_sample=False)
        common.synchronize(device)
        first = time.perf_counter() - began
        began = time.perf_counter()
        model.generate(ids, adapter_ids=[request.adapter], max_new_tokens=request.output_len,
                       min_new_tokens=request.output_len, do_sample=False)  # fmt: skip
        common.synchronize(device)
        clock = max(clock, request.arrival)
        firsts.append(clock + first)
        clock += time.perf_counter() - began
        ends.append(clock)
    return summary(trace, firsts, ends)


def run_hf_continuous(base: Any, trace: list[TraceRequest]) -> dict:
    from transformers import GenerationConfig

    mean = round(sum(r.output_len for r in trace) / len(trace))
    config = GenerationConfig(max_new_tokens=mean, min_new_tokens=mean, do_sample=False, eos_token_id=None,
                              pad_token_id=0)  # fmt: skip
    started = time.perf_counter()
    base.generate_batch(inputs=[r.prompt_ids for r in trace], generation_config=config, progress_bar=False)
    seconds = time.perf_counter() - started
    return {"tok_s": mean * len(trace) / seconds, "seconds": seconds}


def run_hf_static(base: Any, trace: list[TraceRequest], device: torch.device, batch: int) -> dict:
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(trace), batch):
        group = trace[i : i + batch]
        width = max(len(r.prompt_ids) for r in group)
        ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in group], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= torch.tensor(
            [width - len(r.prompt_ids) for r in group], device=device)[:, None]).long()  # fmt: skip
        longest = max(r.output_len for r in group)
        base.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                      cache_implementation="static", eos_token_id=None, pad_token_id=0)  # fmt: skip
        tokens += sum(r.output_len for r in group)
    common.synchronize(device)
    seconds = time.perf_counter() - started
    return {"tok_s": tokens / seconds, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--rates", default="inf", help="requests per second, comma-separated; inf: saturation")
    parser.add_argument("--adapters", type=common.parse_int_list, help="registered adapter counts")
    parser.add_argument("--popularity", choices=("zipf", "uniform"), default="zipf", help="how requests pick adapters")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--prompt-lens", type=common.parse_int_list, help="min,max prompt tokens")
    parser.add_argument("--output-lens", type=common.parse_int_list, help="min,max output tokens")
    parser.add_argument("--baselines", default="generate,hf-cb,hf-static")
    parser.add_argument("--generate-requests", type=int, help="(a) on the trace's first N requests only (default: all)")
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--kv-cache-dtypes", type=lambda s: s.split(","), default=["model"],
                        help="the engine's KV pages, one engine run each in turn per trace: model (the "
                             "model's dtype), fp8, int4")  # fmt: skip
    parser.add_argument("--scheduling", type=lambda s: s.split(","), default=["async"],
                        help="the engine's scheduling, one engine run each in turn per trace: async, sync")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every (adapter count, rate, KV dtype), in alternating order (the host drifts)")
    parser.add_argument("--pool-gib", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capture-graphs", action="store_true",
                        help="each engine captures its decode graphs at start (Engine.capture_decode_graphs), "
                             "before the warm-up run")  # fmt: skip
    parser.add_argument("--host-profile", action="store_true",
                        help="after each timed engine run, the trace again with its decode steps and prefills "
                             "under cProfile (top functions by own time in the JSON, per phase)")  # fmt: skip
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    started = common.start(args.tiny)
    if started is None:
        return 1
    device, env = started
    profile, dtype = (TINY, torch.float32) if args.tiny else (FULL, torch.bfloat16)
    args.requests = args.requests or (24 if args.tiny else 256)
    args.adapters = args.adapters or ((3, 10) if args.tiny else (10, 100, 1000))
    args.prompt_lens = args.prompt_lens or ((4, 24) if args.tiny else (64, 512))
    args.output_lens = args.output_lens or ((4, 16) if args.tiny else (32, 256))
    rates = [float(r) for r in args.rates.split(",")]
    base = build_base(profile, device, dtype)
    vocab = profile.config["vocab_size"]
    pool_bytes = 2**22 if args.tiny else int(args.pool_gib * 2**30)
    model = MultiLoraModel(base, pool_bytes=pool_bytes)
    tokenizer = None
    results: list[dict] = []
    ranks = (4, 8) if args.tiny else (8, 16)
    with tempfile.TemporaryDirectory() as tmp:
        weights = scale.write_weight_files(Path(tmp) / "weights", profile.config, ranks, per_rank=4)
        catalogue = {}  # adapter count -> its names, all registered at once so that rounds can alternate
        for count in args.adapters:
            names = scale.adapter_names(count, prefix=f"n{count}-")
            folders = scale.make_folders(Path(tmp) / f"n{count}", scale.draw_ranks(count, ranks, args.seed), weights, names)
            for name, folder in folders.items():
                model.load_adapter(folder, name)
            model.prefetch_adapters(names, host_only=True)
            catalogue[count] = names
        runs = [(count, rate, kv_dtype, scheduling) for count in args.adapters for rate in rates
                for kv_dtype in args.kv_cache_dtypes for scheduling in args.scheduling]  # fmt: skip
        saturated = make_trace(args, math.inf, [], vocab)
        static_rounds = []  # (c) runs once per round, between the engine's runs: the host drifts
        if "hf-static" in args.baselines:
            run_hf_static(base, saturated, device, batch=32)  # warm-up: compiles the shapes of the trace's batches
        for turn in range(args.rounds):
            if "hf-static" in args.baselines:
                static_rounds.append(run_hf_static(base, saturated, device, batch=32))
                print(f"round {turn}: hf static batches of 32: {static_rounds[-1]}", flush=True)
            for count, rate, kv_dtype, scheduling in runs if turn % 2 == 0 else runs[::-1]:
                trace = make_trace(args, rate, catalogue[count], vocab)
                row = {"adapters": count, "rate": rate, "kv_cache_dtype": kv_dtype, "scheduling": scheduling,
                       "round": turn, "engine": run_trace(model, tokenizer, trace, args, kv_dtype, scheduling,
                                                          warm_up=turn == 0)}  # fmt: skip
                first = turn == 0 and kv_dtype == args.kv_cache_dtypes[0] and scheduling == args.scheduling[0]
                if "generate" in args.baselines and math.isinf(rate) and first:
                    row["generate_each"] = run_generate_each(model, trace[: args.generate_requests], device)
                results.append(row)
                print(f"adapters {count}, rate {rate}: {row}", flush=True)
    baselines: dict[str, Any] = {}
    if "hf-cb" in args.baselines:
        try:
            baselines["hf_continuous_batching"] = run_hf_continuous(base, saturated)
        except Exception as error:  # report, do not lose the rest of the run
            baselines["hf_continuous_batching"] = {"failed": f"{type(error).__name__}: {error}"}
    if static_rounds:
        speeds = [run["tok_s"] for run in static_rounds]
        baselines["hf_static_batches_32"] = {"tok_s": common.median(speeds), "rounds": speeds}
    print(f"baselines (base model alone, saturation): {baselines}", flush=True)
    print_table(results, baselines)
    if args.json:
        common.write_json(args.json, {"environment": env, "args": vars(args), "results": results,
                                      "baselines": baselines})  # fmt: skip
    return 0


def print_table(results: list[dict], baselines: dict[str, Any]) -> None:
    header = ["adapters", "rate", "KV", "scheduling", "engine tok/s", "TTFT p50 / p99 s", "TPOT p50 / p99 ms", "(a) tok/s",
              "engine / (a)"]  # fmt: skip
    rows = []
    for row in results:
        engine, each = row["engine"], row.get("generate_each")
        rows.append([
            row["adapters"], row["rate"], row["kv_cache_dtype"], row["scheduling"], round(engine["tok_s"], 1),
            f"{engine['ttft_s']['p50']:.3f} / {engine['ttft_s']['p99']:.3f}",
            f"{1000 * engine['tpot_s']['p50']:.1f} / {1000 * engine['tpot_s']['p99']:.1f}",
            round(each["tok_s"], 1) if each else "-", round(engine["tok_s"] / each["tok_s"], 2) if each else "-",
        ])  # fmt: skip
    print(common.format_table(header, rows))
    by_run: dict[tuple, list[float]] = {}
    for row in results:
        key = (row["adapters"], row["rate"], row["kv_cache_dtype"], row["scheduling"])
        by_run.setdefault(key, []).append(row["engine"]["tok_s"])
    fewest_count = min(r["adapters"] for r in results)
    for (count, rate, kv_dtype, scheduling), speeds in by_run.items():
        run = f"{count} adapters, rate {rate}, {scheduling} scheduling"
        own = by_run.get((count, rate, "model", scheduling))
        if kv_dtype != "model" and own:
            print(f"{run}: {kv_dtype} KV / the model's dtype: {common.median(speeds) / common.median(own):.2f}x")
        sync = by_run.get((count, rate, kv_dtype, "sync"))
        if scheduling != "sync" and sync:
            per_round = [round(a / b, 3) for a, b in zip(speeds, sync, strict=True)]
            print(f"{run}, {kv_dtype} KV: async / sync: {common.median(speeds) / common.median(sync):.3f}x "
                  f"(rounds {per_round})")  # fmt: skip
        fewest = by_run.get((fewest_count, rate, kv_dtype, scheduling))
        if fewest is not speeds and fewest:
            per_round = [round(a / b, 3) for a, b in zip(speeds, fewest, strict=True)]
            print(f"rate {rate}, {kv_dtype} KV, {scheduling} scheduling: {count} adapters / the fewest: "
                  f"{common.median(speeds) / common.median(fewest):.3f}x (rounds {per_round})")  # fmt: skip
    for name, values in baselines.items():
        if "tok_s" in values:
            per_round = values.get("rounds")  # the same round's run where the baseline ran every round
            ratios = ", ".join(f"{r['adapters']} adapters {r['engine']['tok_s'] / values['tok_s']:.2f}x"
                               + (f" (same round {r['engine']['tok_s'] / per_round[r['round']]:.2f}x)" if per_round else "")
                               for r in results if math.isinf(r["rate"]))  # fmt: skip
            print(f"engine at saturation / {name}: {ratios}")


if __name__ == "__main__":
    sys.exit(main())
