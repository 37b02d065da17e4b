"""Generate throughput, side by side in one process: base model, PEFT, and hf_multilora.

Rows per setup (tokens/s = batch x new tokens / wall seconds of one generate() call):
  base (first)            the plain base model, before any adapter exists
  peft active             PEFT with one adapter set active, plain generate()
  peft names xN           PEFT's mixed batch (`adapter_names`), N distinct adapters round-robin over rows
  dropin names xN         the same calls after `hf_multilora.enable(peft_model)`
  multilora xN            `MultiLoraModel.generate(adapter_ids=...)` on the unloaded base, same adapters
  ... (interleaved)       `--pairs` rounds of: the wrapped model without adapter_ids (base), multilora
                          xN, and multilora xN with `paged_cache=False` (transformers' default cache)
  base (last)             the plain base again: a drift check on the first number

Everything runs in one process on one device so the rows share clocks, allocator state and library
versions; only one copy of the base weights is ever in memory (PEFT wraps it, `unload()` hands it
back, MultiLoraModel wraps it next). Generate is driven by the host, so rows are timed with the wall
clock between device synchronisations; each row gets a warm-up call first.

Full size (Llama-2-7B shapes, bf16, random weights) needs a CUDA GPU; `--tiny` runs a toy config in
seconds, in float32 on CPU, to check the script end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import common
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_multilora import MultiLoraModel, disable, enable

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_VS_BASE = 0.85  # hf_multilora at max distinct / base (first)
TARGET_VS_PEFT = 20.0  # hf_multilora at max distinct / PEFT adapter_names at the same distinct count


@dataclass(frozen=True)
class Setup:
    """Which projections the adapters target and their ranks (cycled over adapters; alpha = 2 x rank)."""

    name: str
    targets: tuple[str, ...]
    ranks: tuple[int, ...]

    def rank(self, adapter: int) -> int:
        return self.ranks[adapter % len(self.ranks)]


@dataclass(frozen=True)
class Profile:
    """Model shape and workload; `--tiny` swaps the whole profile, CLI options override fields."""

    config: dict[str, int]
    batch: int
    prompt_len: int
    new_tokens: int
    distinct: tuple[int, ...]
    setups: dict[str, Setup]


FULL = Profile(
    config=dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    batch=32,
    prompt_len=128,
    new_tokens=64,
    distinct=(1, 4, 8, 32),
    setups={
        "qkvo-r16": Setup("qkvo-r16", ATTN, (16,)),
        "all7-mixed": Setup("all7-mixed", ATTN + MLP, (8, 16, 32, 64)),
    },
)
TINY = Profile(
    config=dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
    ),
    batch=4,
    prompt_len=8,
    new_tokens=4,
    distinct=(1, 2, 4),
    setups={
        "qkvo-r16": Setup("qkvo-r16", ATTN, (4,)),
        "all7-mixed": Setup("all7-mixed", ATTN + MLP, (2, 4, 8, 16)),
    },
)


@dataclass
class Row:
    """One measured configuration. `match` is the fraction of generated tokens equal to the
    reference row's (PEFT adapter_names with the same distinct count; base first for base last)."""

    name: str
    kind: str
    distinct: int | None
    seconds: list[float]
    tokens: int
    match: float | None = None
    outputs: torch.Tensor | None = field(default=None, repr=False)

    @property
    def median_s(self) -> float:
        return common.median(self.seconds)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.median_s


@dataclass
class Workload:
    """The fixed inputs of every generate() call of a run."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    new_tokens: int
    repeats: int
    peft_repeats: int
    peft_warmup_tokens: int

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    def kwargs(self, new_tokens: int | None = None) -> dict[str, Any]:
        """Greedy, exactly `new_tokens` tokens per row: min = max and no eos, so every row and every
        call does the same work."""
        n = self.new_tokens if new_tokens is None else new_tokens
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )


# ----------------------------------------------------------------------------- building


@contextlib.contextmanager
def default_placement(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on `device` in `dtype`: no host copy of 13 GB of weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_base(profile: Profile, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A randomly initialised Llama of the profile's shape (speed does not depend on trained weights)."""
    torch.manual_seed(0)
    with default_placement(device, dtype):
        model = LlamaForCausalLM(LlamaConfig(**profile.config)).eval()
    weight = model.model.layers[0].self_attn.q_proj.weight
    if weight.dtype != dtype or not torch.isfinite(weight).all() or weight.float().std() == 0:
        raise RuntimeError(f"base weights are not random finite {dtype}: init did not run as expected")
    return model


def add_adapters(
    base: LlamaForCausalLM, setup: Setup, count: int, dtype: torch.dtype, keep_fp32: bool
) -> tuple[PeftModel, list[str]]:
    """Wrap `base` with `count` random LoRA adapters (init_lora_weights=False, so B != 0).

    By default adapters stay in the base dtype (`autocast_adapter_dtype=False`), the same bytes the
    kernels read; `keep_fp32` keeps PEFT's own default (fp32 adapter weights) instead.
    """
    names = [f"a{i:02d}" for i in range(count)]
    device = base.model.embed_tokens.weight.device
    peft_model: PeftModel | None = None
    with default_placement(device, dtype):
        for i, name in enumerate(names):
            torch.manual_seed(1000 + i)
            rank = setup.rank(i)
            config = LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=list(setup.targets), init_lora_weights=False
            )
            if peft_model is None:
                peft_model = get_peft_model(base, config, adapter_name=name, autocast_adapter_dtype=keep_fp32)
            else:
                peft_model.add_adapter(name, config, autocast_adapter_dtype=keep_fp32)
    assert peft_model is not None
    peft_model.set_adapter(names[0])
    return peft_model.eval(), names


def row_adapters(names: Sequence[str], distinct: int, batch: int) -> list[str]:
    """Round-robin: row i uses adapter i mod distinct."""
    return [names[i % distinct] for i in range(batch)]


# ----------------------------------------------------------------------------- timing


def measure(
    name: str,
    kind: str,
    distinct: int | None,
    work: Workload,
    generate: Callable[..., torch.Tensor],
    *,
    repeats: int,
    warmup_tokens: int | None = None,
) -> Row:
    """Warm up once, then time `repeats` full generate() calls (wall clock between device syncs)."""
    device = work.input_ids.device
    started = time.perf_counter()
    generate(**work.kwargs(warmup_tokens))
    seconds, out = [], None
    for _ in range(repeats):
        common.synchronize(device)
        start = time.perf_counter()
        out = generate(**work.kwargs())
        common.synchronize(device)
        seconds.append(time.perf_counter() - start)
    assert out is not None
    expected = (work.batch, work.input_ids.shape[1] + work.new_tokens)
    if tuple(out.shape) != expected:
        raise RuntimeError(f"{name}: generate returned shape {tuple(out.shape)}, expected {expected}")
    row = Row(
        name, kind, distinct, seconds, work.batch * work.new_tokens, outputs=out[:, -work.new_tokens :].cpu()
    )
    print(
        f"  {name:<22} {row.tok_s:10.1f} tok/s  median {row.median_s:.3f} s of {repeats} "
        f"({time.perf_counter() - started:.1f} s with warm-up)",
        flush=True,
    )
    return row


def agreement(row: Row, reference: Row | None) -> float | None:
    """Fraction of generated tokens equal to the reference's, position by position."""
    if reference is None or row.outputs is None or reference.outputs is None:
        return None
    return (row.outputs == reference.outputs).float().mean().item()


def run_setup(
    profile: Profile, setup: Setup, distinct: Sequence[int], work: Workload, args: argparse.Namespace
) -> dict[str, Any]:
    """All rows of one setup, phase by phase, freeing each phase's memory before the next."""
    device, dtype = work.input_ids.device, dtype_for(work.input_ids.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(f"[{setup.name}] building base", flush=True)
    base = build_base(profile, device, dtype)
    rows = [measure("base (first)", "base", None, work, base.generate, repeats=work.repeats)]

    started = time.perf_counter()
    peft_model, names = add_adapters(base, setup, max(distinct), dtype, args.peft_fp32_adapters)
    print(f"[{setup.name}] added {len(names)} adapters in {time.perf_counter() - started:.1f} s", flush=True)
    del base
    rows += peft_rows(peft_model, names, distinct, work)

    # Registration is lazy (weights are read at first use): the folders live until the rows ran.
    with tempfile.TemporaryDirectory(prefix="bench_generate_", dir=args.tmp_dir) as tmp:
        started = time.perf_counter()
        peft_model.save_pretrained(tmp)
        paths = {name: Path(tmp) / name for name in names}
        print(f"[{setup.name}] saved adapters in {time.perf_counter() - started:.1f} s", flush=True)
        base = peft_model.unload()
        del peft_model
        common.free_memory()

        started = time.perf_counter()
        multi = MultiLoraModel.from_pretrained(base, adapters=paths)
        print(f"[{setup.name}] MultiLoraModel registered in {time.perf_counter() - started:.1f} s", flush=True)
        rows += multilora_rows(multi, names, distinct, work)
        rows += interleaved_rows(multi, names, max(distinct), work, args.pairs)
    for name in names:  # removes the per-layer hooks: the last base row runs the plain model
        multi.unload_adapter(name)
    rows.append(measure("base (last)", "base_last", None, work, base.generate, repeats=work.repeats))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del multi, base
    common.free_memory()
    return summarize(setup, rows, peak)


def peft_rows(peft_model: PeftModel, names: list[str], distinct: Sequence[int], work: Workload) -> list[Row]:
    """PEFT's own paths, then the same adapter_names calls through hf_multilora.enable()."""
    print("  (PEFT adapter_names rows are slow: short warm-up, --peft-repeats runs)", flush=True)
    rows = [measure("peft active", "peft_active", 1, work, peft_model.generate, repeats=work.repeats)]
    rows += adapter_names_rows(
        peft_model, names, distinct, work, "peft names", "peft_names",
        repeats=work.peft_repeats, warmup_tokens=work.peft_warmup_tokens or None,
    )  # fmt: skip
    enable(peft_model)
    try:
        rows += adapter_names_rows(
            peft_model, names, distinct, work, "dropin names", "dropin", repeats=work.repeats
        )
    finally:
        disable(peft_model)
    return rows


def adapter_names_rows(
    peft_model: PeftModel,
    names: list[str],
    distinct: Sequence[int],
    work: Workload,
    label: str,
    kind: str,
    **measure_kwargs: Any,
) -> list[Row]:
    """peft_model.generate(adapter_names=...) at each distinct count."""
    rows = []
    for d in distinct:
        mixed = row_adapters(names, d, work.batch)
        generate = partial(peft_model.generate, adapter_names=mixed)
        rows.append(measure(f"{label} x{d}", kind, d, work, generate, **measure_kwargs))
    return rows


def multilora_rows(
    multi: MultiLoraModel, names: list[str], distinct: Sequence[int], work: Workload
) -> list[Row]:
    rows = []
    for d in distinct:
        ids = row_adapters(names, d, work.batch)
        rows.append(
            measure(
                f"multilora x{d}",
                "multilora",
                d,
                work,
                lambda ids=ids, **kw: multi.generate(adapter_ids=ids, **kw),
                repeats=work.repeats,
            )
        )
    return rows


def interleaved_rows(
    multi: MultiLoraModel, names: list[str], distinct: int, work: Workload, pairs: int
) -> list[Row]:
    """The base and hf_multilora timed alternately on the same model object, and hf_multilora with
    transformers' default cache (`paged_cache=False`) instead of its paged KV cache.

    Host speed on the lent machines drifts by up to ~25% within one run (base first vs base last),
    which swamps a ratio of rows measured minutes apart; alternating exposes all to the same drift.
    The base runs are the same wrapped model called without adapter_ids.
    """
    ids = row_adapters(names, distinct, work.batch)
    device = work.input_ids.device
    base_s: list[float] = []
    multi_s: list[float] = []
    default_cache_s: list[float] = []
    variants = (
        (base_s, {}),
        (multi_s, {"adapter_ids": ids}),
        (default_cache_s, {"adapter_ids": ids, "paged_cache": False}),
    )
    for _ in range(pairs):
        for seconds, extra in variants:
            common.synchronize(device)
            start = time.perf_counter()
            multi.generate(**work.kwargs(), **extra)
            common.synchronize(device)
            seconds.append(time.perf_counter() - start)
    tokens = work.batch * work.new_tokens
    rows = [
        Row("base (interleaved)", "base_interleaved", None, base_s, tokens),
        Row(f"multilora x{distinct} (interleaved)", "multilora_interleaved", distinct, multi_s, tokens),
        Row(
            f"multilora x{distinct} (interleaved, default cache)",
            "multilora_interleaved_default_cache",
            distinct,
            default_cache_s,
            tokens,
        ),
    ]
    for row in rows:
        print(f"  {row.name:<22} {row.tok_s:10.1f} tok/s  median {row.median_s:.3f} s of {pairs}", flush=True)
    paged_vs_default = common.median([d / p for p, d in zip(multi_s, default_cache_s, strict=True)])
    print(f"  paged / default cache, median of the pairs' speed ratios: {paged_vs_default:.3f}", flush=True)
    return rows


# ----------------------------------------------------------------------------- reporting


def summarize(setup: Setup, rows: list[Row], peak_gib: float | None) -> dict[str, Any]:
    """Ratios, token agreement and the two targets of one setup, as plain data."""
    base = next(r for r in rows if r.kind == "base")
    peft_by_d = {r.distinct: r for r in rows if r.kind == "peft_names"}
    out_rows = []
    for row in rows:
        reference = base if row.kind == "base_last" else peft_by_d.get(row.distinct)
        if row.kind in ("base", "peft_names"):
            reference = None
        row.match = agreement(row, reference)
        vs_peft = (
            row.tok_s / peft_by_d[row.distinct].tok_s
            if row.kind in ("dropin", "multilora") and row.distinct in peft_by_d
            else None
        )
        out_rows.append(
            {
                **{k: v for k, v in asdict(row).items() if k != "outputs"},
                "median_s": row.median_s,
                "tok_s": row.tok_s,
                "vs_base": row.tok_s / base.tok_s,
                "vs_peft_names": vs_peft,
            }
        )
    return {"setup": asdict(setup), "rows": out_rows, "targets": targets(rows), "peak_gib": peak_gib}


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    """hf_multilora at the largest distinct count vs base (first) and vs PEFT adapter_names."""
    base = next(r for r in rows if r.kind == "base")
    top = max(r.distinct for r in rows if r.kind == "multilora")
    peft = next(r for r in rows if r.kind == "peft_names" and r.distinct == top)
    found = []
    for kind in ("multilora", "dropin"):
        row = next(r for r in rows if r.kind == kind and r.distinct == top)
        for label, value, goal in (
            (f"{row.name} / base (first)", row.tok_s / base.tok_s, TARGET_VS_BASE),
            (f"{row.name} / {peft.name}", row.tok_s / peft.tok_s, TARGET_VS_PEFT),
        ):
            found.append({"what": label, "value": value, "target": goal, "met": value >= goal})
    paired = [r for r in rows if r.kind in ("base_interleaved", "multilora_interleaved")]
    if len(paired) == 2:
        value = paired[1].tok_s / paired[0].tok_s
        found.append(
            {
                "what": f"{paired[1].name} / {paired[0].name}",
                "value": value,
                "target": TARGET_VS_BASE,
                "met": value >= TARGET_VS_BASE,
            }
        )
    return found


def print_summary(result: dict[str, Any], work: Workload) -> None:
    name = result["setup"]["name"]
    peak = f", peak {result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else ""
    print(
        f"\n== {name}: batch {work.batch}, prompt {work.input_ids.shape[1]}, {work.new_tokens} new tokens{peak}"
    )
    table = [
        (r["name"], r["tok_s"], r["vs_base"], r["vs_peft_names"], r["match"], len(r["seconds"]))
        for r in result["rows"]
    ]
    print(common.format_table(("row", "tok/s", "/base", "/peft same N", "match", "runs"), table))
    for t in result["targets"]:
        verdict = "MET" if t["met"] else "MISSED"
        print(f"  target {t['what']}: {t['value']:.3g} (>= {t['target']:g}) {verdict}")


# ----------------------------------------------------------------------------- main


def dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on the GPU (the served precision); float32 on CPU, where bf16 matmuls are slow and rare."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setups", default=None, help="comma-separated, from: qkvo-r16,all7-mixed (default both)"
    )
    parser.add_argument(
        "--distinct", default=None, help="distinct adapter counts (default 1,4,8,32; tiny 1,2,4)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument(
        "--pairs", type=int, default=5, help="alternating base / hf_multilora runs (drift-robust ratio)"
    )
    parser.add_argument(
        "--peft-repeats", type=int, default=1, help="timed runs for the slow PEFT adapter_names rows"
    )
    parser.add_argument(
        "--peft-warmup-tokens",
        type=int,
        default=4,
        help="new tokens of the PEFT adapter_names warm-up (it only loads kernels; 0: full length)",
    )
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument(
        "--peft-fp32-adapters",
        action="store_true",
        help="keep PEFT's default fp32 adapter weights (default: adapters in the base dtype, like hf_multilora)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    parser.add_argument(
        "--tmp-dir", default=None, help="where adapters are saved for MultiLoraModel (system temp)"
    )
    parser.add_argument("--tiny", action="store_true", help="toy config that runs on CPU in seconds")
    return parser.parse_args(argv)


def resolve_profile(args: argparse.Namespace) -> tuple[Profile, list[Setup]]:
    """The profile with CLI overrides applied, and the setups to run; invalid combinations fail here."""
    profile = TINY if args.tiny else FULL
    profile = replace(
        profile,
        batch=args.batch or profile.batch,
        prompt_len=args.prompt_len or profile.prompt_len,
        new_tokens=args.new_tokens or profile.new_tokens,
        distinct=common.parse_int_list(args.distinct) if args.distinct else profile.distinct,
    )
    wanted = args.setups.split(",") if args.setups else list(profile.setups)
    unknown = [s for s in wanted if s not in profile.setups]
    if unknown:
        raise SystemExit(f"unknown setup(s) {unknown}; choose from {list(profile.setups)}")
    if max(profile.distinct) > profile.batch:
        raise SystemExit(f"--distinct {max(profile.distinct)} exceeds the batch of {profile.batch} rows")
    if min(args.repeats, args.peft_repeats) < 1:
        raise SystemExit("--repeats and --peft-repeats must be >= 1")
    return profile, [profile.setups[s] for s in wanted]


def make_workload(profile: Profile, device: torch.device, args: argparse.Namespace) -> Workload:
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(
        1, profile.config["vocab_size"], (profile.batch, profile.prompt_len), generator=gen
    )
    return Workload(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids, device=device),
        new_tokens=profile.new_tokens,
        repeats=args.repeats,
        peft_repeats=args.peft_repeats,
        peft_warmup_tokens=args.peft_warmup_tokens,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile, setups = resolve_profile(args)
    started_on = common.start(args.tiny)
    if started_on is None:
        return 2
    device, env = started_on
    work = make_workload(profile, device, args)
    started = time.perf_counter()
    results = []
    for setup in setups:
        results.append(run_setup(profile, setup, profile.distinct, work, args))
        common.free_memory()
    total_s = time.perf_counter() - started
    if args.json:
        common.write_json(
            args.json,
            {
                "environment": env,
                "args": vars(args),
                "profile": {k: v for k, v in asdict(profile).items() if k != "setups"},
                "dtype": str(dtype_for(device)),
                "total_s": total_s,
                "results": results,
            },
        )
    print(f"\n{env['device']}: {total_s:.0f} s in all")
    for result in results:
        print_summary(result, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
