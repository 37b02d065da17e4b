"""Throughput as the number of registered adapters grows: batches streamed over N = 5 ... 2000 adapters.

For each N in --adapters and each popularity (uniform, Zipf), a seeded stream of batches (32 rows, one
adapter per row drawn from the popularity over the N registered names) runs through ONE
`MultiLoraModel.generate()` per batch. Reported per stream: throughput (generated tokens / wall seconds of
the timed batches), the residency hit rate of the page pool (hits / (hits + misses) over the timed batches,
counted once per distinct adapter of a batch), evictions, host->GPU bytes and host loads (adapter weights
read from disk because the host copy was not cached). Target (the issue, after S-LoRA's 0.945x): throughput
at the largest N >= 0.9x throughput at the smallest N, per popularity.

How it runs, on ONE MultiLoraModel (so one page pool, sized identically for every N; MultiLoraModel has
no public way to unwrap a base, so adapters are registered and unloaded between N values instead):
  1. compile pass: every Triton kernel configuration the batches of this N's streams will
     need (the SGMV plans' tile shape and count, prefill and decode, and the rank tiles of the widest
     adapter) is run once by a 2-token generate, on stand-in adapters with the same ranks and rows per
     adapter, registered for it and unloaded after; so no compilation lands in a timed batch and the
     measured adapters are not touched by it;
  2. write the N adapter folders and register them (lazy: config + safetensors header only; the seconds
     are reported, and so are those of unloading them all at the end), then read every adapter into
     host memory (`prefetch_adapters(host_only=True)`, timed): the issue's setting, as S-LoRA's, is
     that all adapters live in host memory and only the GPU pool swaps; --cold-host skips it, so that
     first uses in the timed batches read from disk;
  3. per popularity: a base-model probe batch (no adapters), a pre-warm that prefetches adapters drawn
     from the popularity until the pool is in its steady state (all N resident, or full and holding only
     adapters this pre-warm drew; --no-prewarm skips it), one untimed warm-up batch, the timed batches,
     and a second base probe.
HF's eager generate is host-bound, and on the lent machines host speed drifts by up to ~25% within one
run, more than the effect measured. So every timed batch of a stream runs right after a batch of a paired
reference stream: 5 adapters with the large-N rank mix (8, 16) and the same popularity, registered and
resident for the whole run. The target line uses that paired ratio (stream tok/s over its reference's);
the table also gives the unpaired ratio to the smallest N's stream, and that ratio normalised by base-model
probes run before and after each stream ("norm").

Adapters are written directly in PEFT's format (adapter_config.json + adapter_model.safetensors, q/k/v/o,
random small bf16 A and B, lora_alpha = 2 x rank), not built with PEFT. Ranks are drawn per adapter from
--ranks-small (default 8,16,32,64) when N <= --small-max (100), else from --ranks-large (8,16), so 2000
adapters fit host memory (~24 MB each at Llama-2-7B shapes). So the rank mix differs between small and
large N: large-N streams read fewer adapter bytes per token. To keep disk use small (2000 distinct
7B-shaped adapters would be ~50 GB), only --weight-files distinct weight files exist per rank and every
adapter folder hard-links (symlinks if that fails) one of them. Each registered adapter is still a distinct
name, read from its own folder into its own host copy and copied to the GPU on its own, so identical bytes
do not change the measured costs; but these few files sit in the OS page cache, so a "host load" reads
from memory rather than from the disk.

Everything runs in one process on one device. Full size (Llama-2-7B shapes, bf16, random weights, the
same base as bench_generate.py) needs a CUDA GPU; `--tiny` runs a toy config in float32 on CPU in
seconds, to check the script end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import bench_generate
import common
import torch
from safetensors.torch import save_file

from hf_multilora import MultiLoraModel
from hf_multilora.kernels.sgmv import RANK_TILE, plan_sgmv

POPULARITIES = ("uniform", "zipf")
TARGET = 0.9  # throughput at the largest N / at the smallest N, same popularity
SLORA = 0.945  # S-LoRA's reported ratio (2000 vs 5 adapters)
COMPILE_NEW_TOKENS = 2  # the compile pass: prefill plus one decode step
REFERENCE_N = 5  # adapters of the paired reference stream every timed batch is compared with


@dataclass(frozen=True)
class Profile:
    """Model shape and workload; `--tiny` swaps the whole profile, CLI options override fields."""

    config: dict[str, int]
    batch: int
    prompt_len: int
    new_tokens: int
    adapters: tuple[int, ...]  # the N values
    batches: int  # timed batches per stream
    ranks_small: tuple[int, ...]  # drawn from when N <= small_max
    ranks_large: tuple[int, ...]
    small_max: int
    pool_bytes: int
    host_cache_bytes: int | None
    warm_requests: int  # most adapter draws the pre-warm prefetches


FULL = Profile(
    config=bench_generate.FULL.config,
    batch=32,
    prompt_len=128,
    new_tokens=32,
    adapters=(5, 100, 1000, 2000),
    batches=8,
    ranks_small=(8, 16, 32, 64),
    ranks_large=(8, 16),
    small_max=100,
    pool_bytes=20 * 2**30,
    host_cache_bytes=None,  # the setting (as S-LoRA's): every adapter fits host memory
    warm_requests=8192,
)
TINY = Profile(
    config=bench_generate.TINY.config,
    batch=8,
    prompt_len=16,
    new_tokens=4,
    adapters=(3, 10, 60),
    batches=3,
    ranks_small=(2, 4, 8, 16),
    ranks_large=(4, 8),
    small_max=10,
    pool_bytes=2**20,  # 128 pages of 8 KiB: 32 for the KV of a batch, the rest ~30 adapters
    host_cache_bytes=2**20,  # ~40 adapters: N=60 re-reads some from disk
    warm_requests=256,
)


@dataclass(frozen=True)
class Stream:
    """The seeded requests of one (N, popularity): warm-up batch first, then the timed ones."""

    n: int
    popularity: str
    warmup: list[str]
    batches: list[list[str]]
    weights: list[float] | None  # per adapter index (None: uniform)
    seed: int


# ----------------------------------------------------------------------------- adapters on disk


def module_shapes(config: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of q/k/v/o for a Llama config."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim", hidden // heads)
    kv = config.get("num_key_value_heads", heads) * head_dim
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
    }


def write_weight_file(path: Path, config: dict[str, int], rank: int, seed: int, noise: torch.Tensor) -> int:
    """One adapter_model.safetensors in PEFT's key layout, bf16; returns its size in bytes.

    Tensors are slices of a shared random buffer at seeded offsets (generating fresh normal samples for
    gigabytes of adapters would dominate the run): random, small, different per file.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, (fin, fout) in module_shapes(config).items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            for ab, shape in (("lora_A", (rank, fin)), ("lora_B", (fout, rank))):
                numel = shape[0] * shape[1]
                start = int(torch.randint(0, noise.numel() - numel + 1, (1,), generator=gen))
                tensors[f"{key}.{ab}.weight"] = noise[start : start + numel].view(shape).clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def adapter_config(rank: int) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for a plain q/k/v/o LoRA."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(bench_generate.ATTN),
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


@dataclass
class WeightFiles:
    """The distinct weight files, per rank; adapter folders link to them."""

    root: Path
    per_rank: int
    files: dict[int, list[Path]]
    bytes_on_disk: int
    seconds: float
    link_mode: str = "hardlink"

    def link(self, folder: Path, rank: int, index: int) -> None:
        source = self.files[rank][index % self.per_rank]
        target = folder / "adapter_model.safetensors"
        if self.link_mode == "hardlink":
            try:
                os.link(source, target)
                return
            except OSError:
                self.link_mode = "symlink"
        os.symlink(source, target)


def write_weight_files(
    root: Path, config: dict[str, int], ranks: Sequence[int], per_rank: int
) -> WeightFiles:
    started = time.perf_counter()
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(7)
    noise = (torch.randn(2**22, generator=gen) * 0.02).to(torch.bfloat16)
    files: dict[int, list[Path]] = {}
    total = 0
    for rank in sorted(set(ranks)):
        files[rank] = []
        for j in range(per_rank):
            path = root / f"r{rank}_{j:02d}.safetensors"
            total += write_weight_file(path, config, rank, seed=rank * 1000 + j, noise=noise)
            files[rank].append(path)
    return WeightFiles(root, per_rank, files, total, time.perf_counter() - started)


def write_folder(folder: Path, rank: int, weights: WeightFiles, index: int) -> None:
    """One PEFT adapter folder: its own adapter_config.json, weights linked to a shared file."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(rank), indent=2))
    weights.link(folder, rank, index)


def make_folders(root: Path, ranks: Sequence[int], weights: WeightFiles, names: Sequence[str]) -> dict[str, Path]:
    """Adapter names[i] has rank ranks[i]; the adapters of one rank cycle through that rank's weight
    files. Returns name -> folder."""
    seen: Counter[int] = Counter()
    paths = {}
    for name, rank in zip(names, ranks, strict=True):
        write_folder(root / name, rank, weights, seen[rank])
        seen[rank] += 1
        paths[name] = root / name
    return paths


# ----------------------------------------------------------------------------- streams


def draw_ranks(n: int, ranks: Sequence[int], seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(list(ranks)) for _ in range(n)]


def popularity_weights(n: int, popularity: str, alpha: float, rng: random.Random) -> list[float] | None:
    """None for uniform; Zipf: the k-th most popular adapter has weight 1 / k^alpha, and which adapter
    is k-th is a seeded permutation (popularity independent of rank and registration order)."""
    if popularity == "uniform":
        return None
    order = rng.sample(range(n), n)
    weights = [0.0] * n
    for k, i in enumerate(order):
        weights[i] = 1.0 / (k + 1) ** alpha
    return weights


def make_stream(
    n: int, popularity: str, profile: Profile, alpha: float, seed: int, prefix: str = "a"
) -> Stream:
    seed = seed * 1_000_003 + n * 10 + POPULARITIES.index(popularity)
    rng = random.Random(seed)
    names = adapter_names(n, prefix)
    weights = popularity_weights(n, popularity, alpha, rng)
    batches = [rng.choices(names, weights=weights, k=profile.batch) for _ in range(profile.batches + 1)]
    return Stream(n, popularity, batches[0], batches[1:], weights, seed)


def adapter_names(n: int, prefix: str = "a") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def kernel_signature(rows: Sequence[str], rank_of: dict[str, int], prompt_len: int) -> tuple[int, ...]:
    """What decides which Triton kernel configurations a batch compiles: the SGMV plans' tile shape and
    count (prefill and decode; they set block_m and the split-K factor) and the rank tiles of the
    widest adapter. Computed with the library's own planner, on the host."""
    slot: dict[str, int] = {}
    row_slots = [slot.setdefault(name, len(slot)) for name in rows]
    max_rank = max(rank_of[name] for name in rows)
    prefill = plan_sgmv(row_slots, prompt_len, max_rank, "cpu")
    decode = plan_sgmv(row_slots, 1, max_rank, "cpu")
    return (
        math.ceil(max_rank / RANK_TILE),
        prefill.block_m,
        prefill.num_tiles,
        decode.block_m,
        decode.num_tiles,
    )


# ----------------------------------------------------------------------------- running


class Bench:
    """The one MultiLoraModel, the fixed inputs of every generate() call, and the adapter folders."""

    def __init__(
        self, multi: MultiLoraModel, profile: Profile, device: torch.device, weights: WeightFiles, tmp: Path
    ) -> None:
        self.multi, self.profile, self.device = multi, profile, device
        self.weights, self.tmp = weights, tmp
        gen = torch.Generator().manual_seed(1234)
        input_ids = torch.randint(
            1, profile.config["vocab_size"], (profile.batch, profile.prompt_len), generator=gen
        )
        self.input_ids = input_ids.to(device)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.paths: dict[str, Path] = {}
        self.compiled: set[tuple[int, ...]] = set()
        self.reference_ranks: dict[str, int] = {}  # the paired reference adapters, registered throughout
        self.references: dict[str, Stream] = {}  # per popularity

    def generate(self, rows: list[str] | None, new_tokens: int | None = None) -> float:
        """One batch (rows: adapter per row, None: the plain base model); returns its wall seconds."""
        n = self.profile.new_tokens if new_tokens is None else new_tokens
        extra: dict[str, Any] = {} if rows is None else {"adapter_ids": rows}
        common.synchronize(self.device)
        start = time.perf_counter()
        out = self.multi.generate(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **extra,
        )
        common.synchronize(self.device)
        seconds = time.perf_counter() - start
        expected = (self.profile.batch, self.profile.prompt_len + n)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {expected}")
        return seconds

    def register(self, paths: dict[str, Path]) -> float:
        started = time.perf_counter()
        for name, path in paths.items():
            self.multi.load_adapter(path, name)
        self.paths = dict(paths)
        return time.perf_counter() - started

    def unregister_all(self) -> float:
        started = time.perf_counter()
        for name in reversed(list(self.paths)):
            self.multi.unload_adapter(name)
        self.paths = {}
        return time.perf_counter() - started

    def compile_pass(self, streams: Sequence[Stream], rank_of: dict[str, int]) -> tuple[int, float]:
        """A 2-token generate for every kernel configuration (see `kernel_signature`) that the streams'
        batches need and this process has not run yet, so no Triton compilation lands in a timed batch.

        It runs before the stream's adapters are registered, on stand-ins: a batch with the same rows
        per adapter and the same ranks, made of separate compile adapters (linked to the same weight
        files) that are unloaded afterwards. So the streams' adapters are not read, cached or made
        resident by it, and the pool holds no adapter when it ends.
        """
        started, runs = time.perf_counter(), 0
        registered: dict[str, Path] = {}
        try:
            for stream in streams:
                for rows in [stream.warmup, *stream.batches]:
                    key = kernel_signature(rows, rank_of, self.profile.prompt_len)
                    if key in self.compiled:
                        continue
                    stand_in, seen = {}, Counter()
                    for name in dict.fromkeys(rows):
                        rank = rank_of[name]
                        stand_in[name] = f"compile_r{rank}_{seen[rank]}"
                        seen[rank] += 1
                        if stand_in[name] not in registered:
                            folder = self.tmp / "compile" / stand_in[name]
                            if not folder.exists():
                                write_folder(folder, rank, self.weights, seen[rank])
                            self.multi.load_adapter(folder, stand_in[name])
                            registered[stand_in[name]] = folder
                    self.generate([stand_in[name] for name in rows], COMPILE_NEW_TOKENS)
                    self.compiled.add(key)
                    runs += 1
        finally:
            for name in registered:
                self.multi.unload_adapter(name)
        return runs, time.perf_counter() - started

    def prewarm(self, stream: Stream, limit: int) -> dict[str, Any]:
        """Prefetch adapters drawn from the stream's popularity (own seed), 32 draws at a time, until the
        pool is in that popularity's steady state: every adapter resident, or the pool full (it evicted)
        and holding only adapters drawn here (what an earlier stream left has been evicted); at most
        `limit` draws. The timed batches then meet neither a cold pool nor another stream's leftovers."""
        names = list(self.paths)
        rng = random.Random(stream.seed + 1)
        started = time.perf_counter()
        before, draws, drawn, reason = self.stats(), 0, set(), "limit"
        while draws < limit:
            picks = list(dict.fromkeys(rng.choices(names, weights=stream.weights, k=self.profile.batch)))
            drawn.update(picks)
            self.multi.prefetch_adapters(picks)
            draws += self.profile.batch
            now = self.stats()
            resident = set(now["adapters_resident"]) - set(self.reference_ranks)
            if len(resident) == len(names):
                reason = "all resident"
                break
            if now["evictions"] > before["evictions"] and drawn.issuperset(resident):
                reason = "pool turned over"
                break
        common.synchronize(self.device)
        now = self.stats()
        return {
            "draws": draws,
            "stopped": reason,
            "seconds": time.perf_counter() - started,
            "resident": len(now["adapters_resident"]),
            "host_loads": now["host_loads"] - before["host_loads"],
            "bytes_copied_to_device": now["bytes_copied_to_device"] - before["bytes_copied_to_device"],
        }

    def stats(self) -> dict[str, Any]:
        stats = self.multi.memory_stats()
        for key in ("hits", "misses", "evictions", "bytes_copied_to_device", "pages_total"):
            stats.setdefault(key, 0)
        stats.setdefault("adapters_resident", [])
        return stats


COUNTERS = ("hits", "misses", "evictions", "bytes_copied_to_device", "host_loads")


def run_stream(
    bench: Bench, stream: Stream, reference: Stream, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    """The stream's timed batches, each right after a batch of the paired reference stream (5
    adapters, same popularity and rank mix, resident throughout): host speed drifts by tens of
    percent within a run, and a pair shares it. Counters cover the stream's own batches only."""
    profile = bench.profile
    probe_before = bench.generate(None)
    warm = bench.prewarm(stream, profile.warm_requests) if not args.no_prewarm else None
    bench.generate(reference.warmup)
    warmup_s = bench.generate(stream.warmup)
    seconds, reference_seconds, delta = [], [], dict.fromkeys(COUNTERS, 0)
    for rows, reference_rows in zip(stream.batches, reference.batches, strict=True):
        reference_seconds.append(bench.generate(reference_rows))
        before = bench.stats()
        seconds.append(bench.generate(rows))
        after = bench.stats()
        for key in COUNTERS:
            delta[key] += after[key] - before[key]
    probe_after = bench.generate(None)

    tokens = profile.batch * profile.new_tokens * len(seconds)
    lookups = delta["hits"] + delta["misses"]
    base_tok_s = 2 * profile.batch * profile.new_tokens / (probe_before + probe_after)
    result = {
        "n": stream.n,
        "popularity": stream.popularity,
        "seconds": seconds,
        "tokens": tokens,
        "tok_s": tokens / sum(seconds),
        "reference_tok_s": tokens / sum(reference_seconds),
        "vs_reference": sum(reference_seconds) / sum(seconds),
        "hit_rate": delta["hits"] / lookups if lookups else None,
        **delta,
        "distinct_per_batch": sum(len(set(rows)) for rows in stream.batches) / len(stream.batches),
        "distinct_in_stream": len({name for rows in stream.batches for name in rows}),
        "resident_after": len(after["adapters_resident"]),
        "pages_total": after["pages_total"],
        "host_bytes_after": after.get("host_bytes"),
        "warmup_s": warmup_s,
        "prewarm": warm,
        "base_probe_s": [probe_before, probe_after],
        "base_tok_s": base_tok_s,
    }
    result["vs_base_probe"] = result["tok_s"] / base_tok_s
    prewarm = (
        f"  [pre-warm: {warm['draws']} draws, {warm['host_loads']} host loads, {warm['resident']} resident "
        f"({warm['stopped']}), {warm['seconds']:.1f} s]"
        if warm
        else ""
    )
    log(
        f"  N={stream.n:<5} {stream.popularity:<7} {result['tok_s']:9.1f} tok/s ({len(seconds)} batches, "
        f"{sum(seconds):.1f} s; paired 5-adapter reference {result['reference_tok_s']:.1f} tok/s, "
        f"ratio {result['vs_reference']:.3f})  hit rate {_fmt(result['hit_rate'])}  evictions {delta['evictions']}  "
        f"H2D {delta['bytes_copied_to_device'] / 1e9:.2f} GB  host loads {delta['host_loads']}  "
        f"base probe {base_tok_s:.1f} tok/s{prewarm}"
    )
    return result


def register_reference(bench: Bench, args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """The paired reference: REFERENCE_N adapters with the large-N rank mix, registered and read into
    host memory for the whole run (so resident whenever a pair starts), one stream per popularity."""
    profile = bench.profile
    names = adapter_names(REFERENCE_N, "ref")
    ranks = draw_ranks(REFERENCE_N, profile.ranks_large, seed=args.seed * 7919 - 1)
    paths = make_folders(bench.tmp / "reference", ranks, bench.weights, names)
    for name, path in paths.items():
        bench.multi.load_adapter(path, name)
    bench.multi.prefetch_adapters(names, host_only=True)
    bench.reference_ranks = dict(zip(names, ranks, strict=True))
    bench.references = {
        pop: make_stream(REFERENCE_N, pop, profile, args.zipf_alpha, args.seed, prefix="ref")
        for pop in args.popularity
    }
    log(f"paired reference: {REFERENCE_N} adapters, ranks {dict(sorted(Counter(ranks).items()))}")


def run_n(bench: Bench, n: int, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    profile = bench.profile
    rank_set = profile.ranks_small if n <= profile.small_max else profile.ranks_large
    ranks = draw_ranks(n, rank_set, seed=args.seed * 7919 + n)
    names = adapter_names(n)
    rank_of = dict(zip(names, ranks, strict=True))
    streams = [make_stream(n, pop, profile, args.zipf_alpha, args.seed) for pop in args.popularity]
    compile_runs, compile_s = (
        (0, 0.0)
        if args.no_compile_pass
        else bench.compile_pass(
            [*streams, *bench.references.values()], {**rank_of, **bench.reference_ranks}
        )
    )
    if compile_runs:
        log(f"[N={n}] compile pass: {compile_runs} short generates in {compile_s:.1f} s")

    started = time.perf_counter()
    paths = make_folders(bench.tmp / f"n{n}", ranks, bench.weights, names)
    folders_s = time.perf_counter() - started
    register_s = bench.register(paths)
    log(
        f"[N={n}] {n} adapter folders in {folders_s:.1f} s, registered in {register_s:.2f} s; "
        f"ranks {dict(sorted(Counter(ranks).items()))}"
    )
    host_read_s = None
    if not args.cold_host:
        started = time.perf_counter()
        bench.multi.prefetch_adapters(names, host_only=True)
        host_read_s = time.perf_counter() - started
        host_bytes = bench.stats()["host_bytes"]
        log(f"[N={n}] all {n} read into host memory in {host_read_s:.1f} s ({host_bytes / 1e9:.1f} GB)")
    results = []
    for stream in streams:
        result = run_stream(bench, stream, bench.references[stream.popularity], args, log)
        result.update(
            register_s=register_s, folders_s=folders_s, host_read_s=host_read_s, ranks=dict(Counter(ranks))
        )
        results.append(result)
    unregister_s = bench.unregister_all()
    shutil.rmtree(bench.tmp / f"n{n}")
    log(f"[N={n}] unregistered in {unregister_s:.2f} s")
    return {
        "n": n,
        "register_s": register_s,
        "host_read_s": host_read_s,
        "unregister_s": unregister_s,
        "compile_runs": compile_runs,
        "compile_s": compile_s,
        "streams": results,
    }


# ----------------------------------------------------------------------------- reporting


def with_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratio of each stream to the smallest N with the same popularity (raw and over the base probes)."""
    for row in rows:
        ref = min((r for r in rows if r["popularity"] == row["popularity"]), key=lambda r: r["n"])
        row["vs_smallest_n"] = row["tok_s"] / ref["tok_s"]
        row["vs_smallest_n_normalised"] = row["vs_base_probe"] / ref["vs_base_probe"]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for pop in dict.fromkeys(r["popularity"] for r in rows):
        mine = [r for r in rows if r["popularity"] == pop]
        small, large = min(mine, key=lambda r: r["n"]), max(mine, key=lambda r: r["n"])
        value = large["vs_reference"]
        found.append(
            {
                "what": f"N={large['n']} / paired N={REFERENCE_N} ({pop})",
                "value": value,
                "unpaired": large["tok_s"] / small["tok_s"],
                "unpaired_what": f"N={large['n']} / N={small['n']} stream",
                "normalised": large["vs_smallest_n_normalised"],
                "target": TARGET,
                "met": value >= TARGET,
            }
        )
    return found


def print_summary(rows: list[dict[str, Any]], found: list[dict[str, Any]], header: str) -> None:
    print(f"\n== {header}")
    smallest = min(r["n"] for r in rows)
    table = [
        (
            r["n"],
            r["popularity"],
            r["tok_s"],
            r["vs_reference"],
            r["vs_smallest_n"],
            r["vs_smallest_n_normalised"],
            r["hit_rate"],
            r["evictions"],
            r["bytes_copied_to_device"] / 1e9,
            r["host_loads"],
            r["distinct_per_batch"],
            r["resident_after"],
            r["register_s"],
        )
        for r in rows
    ]
    headers = (
        "N", "popularity", "tok/s", f"/paired {REFERENCE_N}", f"/N={smallest}", f"/N={smallest} norm", "hit rate",
        "evictions", "H2D GB", "host loads", "distinct/batch", "resident", "register s",
    )  # fmt: skip
    print(common.format_table(headers, table))
    print(
        f"  (/paired {REFERENCE_N}: over the {REFERENCE_N}-adapter batches interleaved with the stream's; "
        "norm: each stream's tok/s over its base-model probes, then the ratio; hit rate, evictions, "
        "H2D and host loads cover the timed batches only)"
    )
    for t in found:
        verdict = "MET" if t["met"] else "MISSED"
        print(
            f"  target {t['what']}: {t['value']:.3g} (>= {t['target']:g}; S-LoRA {SLORA}) {verdict}"
            f"  [unpaired {t['unpaired_what']}: {t['unpaired']:.3g}, drift-normalised {t['normalised']:.3g}]"
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------- main


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_bytes(text: str) -> int:
    """'20GiB', '512MiB', '1.5GB' or a plain byte count."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 20GiB, 512MiB or a byte count, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def parse_bytes_or_none(text: str) -> int | str:
    """A size, or 'none' (no bound): kept as the string, so that None still means 'not given'."""
    return "none" if text.strip().lower() == "none" else parse_bytes(text)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", default=None, help="N values (default 5,100,1000,2000; tiny 3,10,60)")
    parser.add_argument(
        "--popularity",
        default=",".join(POPULARITIES),
        help="comma-separated, from: uniform,zipf (default both)",
    )
    parser.add_argument("--zipf-alpha", type=float, default=1.0, help="Zipf exponent (default 1.0)")
    parser.add_argument(
        "--batches", type=int, default=None, help="timed batches per stream (default 8; tiny 3)"
    )
    parser.add_argument("--batch", type=int, default=None, help="rows per batch (default 32; tiny 8)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; tiny 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32; tiny 4)")
    parser.add_argument(
        "--ranks-small", default=None, help="ranks drawn when N <= --small-max (default 8,16,32,64)"
    )
    parser.add_argument("--ranks-large", default=None, help="ranks drawn when N > --small-max (default 8,16)")
    parser.add_argument(
        "--small-max", type=int, default=None, help="largest N that uses --ranks-small (default 100)"
    )
    parser.add_argument(
        "--pool-bytes",
        type=parse_bytes,
        default=None,
        help="MultiLoraModel pool_bytes (default 20GiB; tiny 1MiB)",
    )
    parser.add_argument(
        "--host-cache-bytes",
        type=parse_bytes_or_none,
        default=None,
        help="MultiLoraModel host_cache_bytes, or 'none' (default none; tiny 1MiB)",
    )
    parser.add_argument(
        "--weight-files",
        type=int,
        default=8,
        help="distinct weight files per rank that adapter folders link to (default 8)",
    )
    parser.add_argument(
        "--warm-requests", type=int, default=None, help="most adapter draws of the pre-warm (default 8192)"
    )
    parser.add_argument(
        "--no-compile-pass", action="store_true", help="skip the pass that compiles kernels before timing"
    )
    parser.add_argument("--no-prewarm", action="store_true", help="start every stream with a cold pool")
    parser.add_argument(
        "--cold-host",
        action="store_true",
        help="do not read every adapter into host memory after registering (first uses read from disk)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    parser.add_argument("--tmp-dir", default=None, help="where adapter folders are written (system temp)")
    parser.add_argument("--tiny", action="store_true", help="toy config that runs on CPU in seconds")
    return parser.parse_args(argv)


def resolve_profile(args: argparse.Namespace) -> Profile:
    """The profile with CLI overrides applied; invalid combinations fail here."""
    profile = TINY if args.tiny else FULL
    host_cache = {None: profile.host_cache_bytes, "none": None}.get(
        args.host_cache_bytes, args.host_cache_bytes
    )
    profile = replace(
        profile,
        batch=args.batch or profile.batch,
        prompt_len=args.prompt_len or profile.prompt_len,
        new_tokens=args.new_tokens or profile.new_tokens,
        adapters=common.parse_int_list(args.adapters) if args.adapters else profile.adapters,
        batches=args.batches or profile.batches,
        ranks_small=common.parse_int_list(args.ranks_small) if args.ranks_small else profile.ranks_small,
        ranks_large=common.parse_int_list(args.ranks_large) if args.ranks_large else profile.ranks_large,
        small_max=args.small_max or profile.small_max,
        pool_bytes=args.pool_bytes or profile.pool_bytes,
        host_cache_bytes=host_cache,
        warm_requests=args.warm_requests or profile.warm_requests,
    )
    args.popularity = [p for p in args.popularity.split(",") if p]
    unknown = [p for p in args.popularity if p not in POPULARITIES]
    if unknown or not args.popularity:
        raise SystemExit(f"unknown popularity {unknown}; choose from {list(POPULARITIES)}")
    if args.weight_files < 1:
        raise SystemExit("--weight-files must be >= 1")
    if args.zipf_alpha < 0:
        raise SystemExit("--zipf-alpha must be >= 0")
    return profile


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = resolve_profile(args)
    started_on = common.start(args.tiny)
    if started_on is None:
        return 2
    device, env = started_on
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    dtype = bench_generate.dtype_for(device)
    base = bench_generate.build_base(bench_generate.TINY if args.tiny else bench_generate.FULL, device, dtype)
    multi = MultiLoraModel(base, pool_bytes=profile.pool_bytes, host_cache_bytes=profile.host_cache_bytes)
    needed = sorted(
        {
            r
            for n in profile.adapters
            for r in (profile.ranks_small if n <= profile.small_max else profile.ranks_large)
        }
        | set(profile.ranks_large)  # the paired reference's
    )
    per_n: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_adapter_scale_", dir=args.tmp_dir) as tmp_name:
        tmp = Path(tmp_name)
        weights = write_weight_files(tmp / "weights", profile.config, needed, args.weight_files)
        bench = Bench(multi, profile, device, weights, tmp)
        log(
            f"base built ({dtype}); {args.weight_files} distinct weight files per rank {needed}: "
            f"{weights.bytes_on_disk / 1e9:.2f} GB in {weights.seconds:.1f} s"
        )
        # The first generate builds the pool and compiles the paged-attention kernels: keep that out of
        # the first stream's base probe.
        log(f"base warm-up batch: {bench.generate(None):.1f} s")
        register_reference(bench, args, log)

        def payload(complete: bool) -> dict[str, Any]:
            rows = [stream for entry in per_n for stream in entry["streams"]]
            with_ratios(rows)
            stats = multi.memory_stats()
            return {
                "complete": complete,
                "environment": env,
                "args": vars(args),
                "profile": asdict(profile),
                "dtype": str(dtype),
                "pool": {"pages_total": stats.get("pages_total"), "page_bytes": stats.get("page_bytes")},
                "weight_files": {
                    "per_rank": args.weight_files,
                    "ranks": needed,
                    "bytes_on_disk": weights.bytes_on_disk,
                    "seconds": weights.seconds,
                    "link_mode": weights.link_mode,
                },
                "total_s": time.perf_counter() - started,
                "per_n": [{k: v for k, v in e.items() if k != "streams"} for e in per_n],
                "results": rows,
                "targets": targets(rows),
            }

        for n in profile.adapters:
            per_n.append(run_n(bench, n, args, log))
            common.free_memory()
            if args.json and n != profile.adapters[-1]:
                common.write_json(args.json, payload(complete=False))  # kept if a later N runs out of time
        result = payload(complete=True)
    if args.json:
        common.write_json(args.json, result)
    rows, pool = result["results"], result["pool"]
    pools = {r["pages_total"] for r in rows}
    if len(pools) != 1:
        raise RuntimeError(f"the pool changed size between streams: {sorted(pools)} pages")
    print(f"\n{env['device']}: {result['total_s']:.0f} s in all")
    pool_size = _size(pool["pages_total"] * pool["page_bytes"])
    host = "unbounded" if profile.host_cache_bytes is None else _size(profile.host_cache_bytes)
    header = (
        f"batch {profile.batch}, prompt {profile.prompt_len}, {profile.new_tokens} new tokens, "
        f"{profile.batches} timed batches per stream; pool {pool['pages_total']} pages ({pool_size}), "
        f"host cache {host}; ranks {list(profile.ranks_small)} for N <= {profile.small_max}, else "
        f"{list(profile.ranks_large)}; Zipf alpha {args.zipf_alpha:g}; adapters share {args.weight_files} "
        f"weight files per rank ({result['weight_files']['link_mode']}s)"
    )
    print_summary(rows, result["targets"], header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
