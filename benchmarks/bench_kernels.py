"""SGMV kernel timings against the base GEMM of the same projection (CUDA only).

For N distinct rank-r adapters (default 32 x rank 16) on a hidden x hidden projection (default 4096):
  - one slice (an o_proj-like layer) and three slices sharing their input (q/k/v in one launch);
  - decode (rows x 1 token) and prefill (rows x prefill tokens);
  - shrink only, expand only, shrink + expand, and the base GEMM(s) `F.linear(x, W)`;
  - for one slice also the whole LoRA layer: the GEMM writing y, then shrink and expand adding to
    it. Its excess over the GEMM alone is what the adapters cost in the model; it differs from
    shrink + expand because decode kernels may overlap the kernel before them (PDL, Hopper+);
  - for q/k/v also the runtime's form: one 3-slice shrink, then one 1-slice expand per projection.

Kernel outputs are checked against the plain-PyTorch references on fresh random inputs first; any
failure aborts before timing. Steps are timed as the runtime runs them: ShrinkCall / ExpandCall
prepared once, then called. Device times are medians of CUDA-graph replays
(`triton.testing.do_bench_cudagraph`), so host launch gaps are not counted, and every timed function
rotates over several independent input/weight sets, so no run reads data the previous one left in
L2. Host cost per call is timed separately (no synchronisation), because generate() is driven by
the host and pays it on every layer. Achieved
bandwidth counts the fewest bytes each step must move and is compared with a measured
device-to-device copy.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import common
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_multilora.adapters.host_store import pack_adapter
from hf_multilora.kernels.sgmv import (
    ExpandCall,
    SgmvPlan,
    ShrinkCall,
    align_up,
    plan_sgmv,
    sgmv_expand_reference,
    sgmv_shrink_reference,
)
from hf_multilora.memory.page_pool import PagePool
from hf_multilora.memory.residency import AdapterResidency, page_layout

TOLERANCE = 2e-2  # relative error of bf16 kernel outputs against the fp32-product references
TARGET_DECODE_RATIO = 0.5  # (shrink + expand) / base GEMM at decode
LAYER_STEP = "base GEMM, then shrink+expand"
HOST_CALLS = 200
PAGE_ELEMS = 131072  # the pool page of Llama-2-7B: one layer's K and V for 16 tokens

Timer = Callable[[Callable[[], Any]], float]  # fn -> milliseconds


@dataclass(frozen=True)
class Case:
    """One shape: `rows` x `tokens_per_row` tokens through `len(widths)` slices of in -> width."""

    name: str
    rows: int
    tokens_per_row: int
    in_features: int
    widths: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.rows * self.tokens_per_row

    @property
    def offsets(self) -> list[int]:
        return [0, *itertools.accumulate(self.widths)]


@dataclass
class Operands:
    """One independent set of everything a timed call reads or writes."""

    weights: torch.Tensor  # a page pool's storage
    rows: torch.Tensor
    locations: torch.Tensor
    scales: torch.Tensor
    base: list[torch.Tensor]  # one [width, in] base weight per slice
    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor | None = None  # shrink output, for expand-only timings
    shrink: Any = None  # prepared ShrinkCall / ExpandCall(s) over this set, as the runtime uses them
    expand: Any = None
    per_slice: Any = None


# ----------------------------------------------------------------------------- inputs


def pack_adapters(
    n_adapters: int,
    rank: int,
    in_features: int,
    widths: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
) -> AdapterResidency:
    """Random adapters laid out exactly as the runtime lays them out: host tensors packed by
    `pack_adapter`, their rank rows copied into pages of a pool by an AdapterResidency (one module per
    slice), all resident."""
    modules = [f"slice{s}" for s in range(len(widths))]
    adapters = [
        pack_adapter(
            f"adapter{i}",
            "bench",
            {},
            {
                m: (
                    torch.randn(rank, in_features) / in_features**0.5,
                    torch.randn(width, rank) / rank**0.5,
                    float(torch.rand(()) * 2 + 0.25),
                )
                for m, width in zip(modules, widths, strict=True)
            },
            dtype,
        )
        for i in range(n_adapters)
    ]
    page_elems = align_up(max(PAGE_ELEMS, in_features, *widths))
    pages = sum(len(page_layout(a, page_elems).ranges) for a in adapters)
    cache = AdapterResidency(modules, PagePool(pages, page_elems, dtype, device))
    cache.acquire(adapters)
    if [cache.resident(a.name).slot for a in adapters] != list(range(n_adapters)):
        raise SystemExit("expected adapter i in slot i (make_plan relies on it)")
    return cache


def make_operands(
    case: Case, n_adapters: int, rank: int, dtype: torch.dtype, device: torch.device
) -> Operands:
    cache = pack_adapters(n_adapters, rank, case.in_features, case.widths, dtype, device)
    base = [
        torch.randn(w, case.in_features, device=device, dtype=dtype) / case.in_features**0.5
        for w in case.widths
    ]
    x = torch.randn(case.tokens, case.in_features, device=device, dtype=dtype)
    y = torch.randn(case.tokens, sum(case.widths), device=device, dtype=dtype)
    return Operands(cache.pool.storage, cache.rows, cache.locations, cache.scales, base, x, y)


def make_plan(case: Case, n_adapters: int, rank: int, device: torch.device) -> SgmvPlan:
    """Rows take adapters round-robin: with n_adapters == rows every row has its own adapter."""
    return plan_sgmv([i % n_adapters for i in range(case.rows)], case.tokens_per_row, rank, device)


def rotation(sets: Sequence[Operands]) -> Callable[[], Operands]:
    """Each call returns the next set, so consecutive timed calls never share data in L2."""
    cycle: Iterator[Operands] = itertools.cycle(sets)
    return lambda: next(cycle)


# ----------------------------------------------------------------------------- correctness


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| in float64; NaN when anything is not finite."""
    got, expected = got.double(), expected.double()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def launch_again(call: Callable[[torch.Tensor], Any], target: torch.Tensor) -> Any:
    """`call(target)`, after a first launch on a copy: a prepared call's first launch is an ordinary
    one, later launches take the compiled launcher (with PDL on Hopper+), and those are timed."""
    call(target.clone())
    return call(target)


def check_case(
    case: Case, n_adapters: int, rank: int, dtype: torch.dtype, device: torch.device
) -> dict[str, float]:
    """Kernels vs references on a fresh random set: shrink, expand (on the reference v), and both,
    through prepared calls launched as the timings launch them (see `launch_again`).

    Every token has an adapter of rank == max_rank, so every entry of v and every column of y is
    written: an unwritten output shows up as garbage in the error.
    """
    ops = make_operands(case, n_adapters, rank, dtype, device)
    plan = make_plan(case, n_adapters, rank, device)
    offsets = case.offsets
    shrink = ShrinkCall(ops.x, ops.weights, ops.rows, ops.locations, plan)
    v = launch_again(shrink, ops.x)
    v_ref = sgmv_shrink_reference(ops.x, ops.weights, ops.rows, ops.locations, plan)

    y_ref = ops.y.clone()
    sgmv_expand_reference(y_ref, v_ref, ops.weights, ops.rows, ops.locations, ops.scales, plan, offsets)
    tables = (ops.weights, ops.rows, ops.locations, ops.scales, plan, offsets)
    y_expand = ops.y.clone()
    launch_again(ExpandCall(y_expand, v_ref, *tables), y_expand)
    y_both = ops.y.clone()
    launch_again(ExpandCall(y_both, v, *tables), y_both)

    delta_ref = y_ref.float() - ops.y.float()
    return {
        "shrink": relative_error(v.sum(0), v_ref[0]),
        "expand": relative_error(y_expand.float() - ops.y.float(), delta_ref),
        "shrink+expand": relative_error(y_both.float() - ops.y.float(), delta_ref),
    }


# ----------------------------------------------------------------------------- timing

READ_CHUNK = 4096  # elements per program of the read-floor kernel


@triton.jit
def _read_kernel(src_ptr, out_ptr, CHUNK: tl.constexpr):
    """Reads CHUNK elements and writes their sum: the least work that still moves the bytes."""
    pid = tl.program_id(0)
    chunk = tl.load(src_ptr + pid.to(tl.int64) * CHUNK + tl.arange(0, CHUNK))
    tl.store(out_ptr + pid, tl.sum(chunk.to(tl.float32), axis=0))


def read_floor(weights: torch.Tensor, sink: torch.Tensor) -> None:
    """Two back-to-back trivial kernels reading the adapter bytes (half each): what any two-launch
    shrink + expand costs at least on this device, before doing any of the work."""
    half = weights.numel() // 2 // READ_CHUNK
    for part in (weights[: half * READ_CHUNK], weights[half * READ_CHUNK : 2 * half * READ_CHUNK]):
        _read_kernel[(half,)](part, sink, CHUNK=READ_CHUNK, num_warps=4)


def bytes_moved(case: Case, n_adapters: int, rank: int, v: torch.Tensor, elt: int) -> dict[str, int]:
    """Fewest bytes each step must move: adapters' A and B once, x once, y read and written,
    v (fp32 partials, as the kernel lays them out) written by shrink and read by expand."""
    a = n_adapters * rank * case.in_features * len(case.widths) * elt
    b = n_adapters * rank * sum(case.widths) * elt
    x = case.tokens * case.in_features * elt
    y = 2 * case.tokens * sum(case.widths) * elt
    v_bytes = v.numel() * v.element_size()
    base = sum(case.widths) * case.in_features * elt + x + y // 2
    return {
        "shrink": a + x + v_bytes,
        "expand": b + v_bytes + y,
        "shrink+expand": a + b + x + y + 2 * v_bytes,
        "base": base,
    }


def time_case(
    case: Case, sets: list[Operands], plan: SgmvPlan, graph_timer: Timer
) -> tuple[dict[str, float], dict[str, float]]:
    """Device ms and host µs per call of every step of one case, through prepared calls as the
    runtime makes them (plan once, run many). Device time comes from CUDA-graph replays, so host
    launch gaps are not counted; host µs is measured separately on the same calls."""
    offsets = case.offsets
    slices = list(itertools.pairwise(offsets))
    for s in sets:
        s.shrink = ShrinkCall(s.x, s.weights, s.rows, s.locations, plan)
        s.v = s.shrink(s.x)
        s.expand = ExpandCall(s.y, s.v, s.weights, s.rows, s.locations, s.scales, plan, offsets)
        s.per_slice = [
            ExpandCall(
                s.y[:, lo:hi], s.v[:, i : i + 1], s.weights, s.rows, s.locations[i : i + 1], s.scales[i : i + 1], plan
            )
            for i, (lo, hi) in enumerate(slices)
        ]
    pick = rotation(sets)

    def base() -> None:
        s = pick()
        for w in s.base:
            F.linear(s.x, w)

    def shrink() -> None:
        s = pick()
        s.shrink(s.x)

    def expand() -> None:
        s = pick()
        s.expand(s.y)

    def both() -> None:
        s = pick()
        s.shrink(s.x)
        s.expand(s.y)

    sink = torch.empty(sets[0].weights.numel() // READ_CHUNK + 1, device=sets[0].x.device)

    def floor() -> None:
        read_floor(pick().weights, sink)

    steps: dict[str, Callable[[], None]] = {
        "base": base,
        "shrink": shrink,
        "expand": expand,
        "shrink+expand": both,
        "read floor (2 launches)": floor,
    }
    if len(case.widths) == 1:

        def layer() -> None:
            """The base GEMM into y, then the LoRA delta added to it: one layer as the model runs it."""
            s = pick()
            torch.mm(s.x, s.base[0].T, out=s.y)
            s.shrink(s.x)
            s.expand(s.y)

        steps[LAYER_STEP] = layer
    if len(case.widths) > 1:

        def per_slice_expand() -> None:
            """What the runtime does for q/k/v: one multi-slice shrink, one expand per projection."""
            s = pick()
            s.shrink(s.x)
            for i, (lo, hi) in enumerate(slices):
                s.per_slice[i](s.y[:, lo:hi])

        steps["runtime form"] = per_slice_expand

    for fn in steps.values():  # compile and load every kernel before any graph capture
        for _ in sets:
            fn()
    device_ms = {name: graph_timer(fn) for name, fn in steps.items()}
    host_us = {name: host_us_per_call(fn, sets[0].x.device) for name, fn in steps.items()}
    return device_ms, host_us


def host_us_per_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Median host time of one call while the device keeps up (launch cost, no sync inside)."""
    common.synchronize(device)
    times = common.host_seconds(fn, HOST_CALLS)
    common.synchronize(device)
    return common.median(times) * 1e6


def plan_host_us(case: Case, n_adapters: int, rank: int, device: torch.device) -> float:
    """plan_sgmv runs once per forward on the host (the layers reuse it)."""
    return host_us_per_call(lambda: make_plan(case, n_adapters, rank, device), device)


def copy_bandwidth(device: torch.device, timer: Timer, n_bytes: int) -> float:
    """Device-to-device copy rate in bytes/s (bytes read + written): the memory roofline here."""
    src = torch.randn(n_bytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


# ----------------------------------------------------------------------------- driver


def make_cases(args: argparse.Namespace) -> list[Case]:
    hidden = args.hidden
    single, qkv = (hidden,), (hidden, hidden, hidden)
    return [
        Case("1 slice decode", args.rows, 1, hidden, single),
        Case("1 slice prefill", args.rows, args.prefill_tokens, hidden, single),
        Case("qkv decode", args.rows, 1, hidden, qkv),
        Case("qkv prefill", args.rows, args.prefill_tokens, hidden, qkv),
    ]


def run_case(
    case: Case, args: argparse.Namespace, device: torch.device, timer: Timer, copy_bps: float
) -> dict[str, Any]:
    dtype = torch.bfloat16
    errors = check_case(case, args.adapters, args.rank, dtype, device)
    failed = {k: e for k, e in errors.items() if not e < TOLERANCE}
    if failed:
        raise SystemExit(
            f"{case.name}: kernel output differs from the reference: {failed} (tolerance {TOLERANCE})"
        )
    sets = [make_operands(case, args.adapters, args.rank, dtype, device) for _ in range(args.sets)]
    plan = make_plan(case, args.adapters, args.rank, device)
    device_ms, host_us = time_case(case, sets, plan, timer)
    moved = bytes_moved(case, args.adapters, args.rank, sets[0].v, dtype.itemsize)
    moved["runtime form"] = moved["shrink+expand"]
    moved[LAYER_STEP] = moved["shrink+expand"] + moved["base"]
    moved["read floor (2 launches)"] = sets[0].weights.numel() * dtype.itemsize
    bandwidth = {k: moved[k] / (device_ms[k] * 1e-3) for k in device_ms}
    result = {
        "case": asdict(case),
        "tokens": case.tokens,
        "plan": {"num_tiles": plan.num_tiles, "block_m": plan.block_m, "v_shape": list(sets[0].v.shape)},
        "rel_errors": errors,
        "device_ms": device_ms,
        "host_us": host_us,
        "plan_host_us": plan_host_us(case, args.adapters, args.rank, device),
        "bytes": moved,
        "bandwidth_Bps": bandwidth,
        "fraction_of_copy_bw": {k: b / copy_bps for k, b in bandwidth.items()},
        "lora_over_base": device_ms["shrink+expand"] / device_ms["base"],
    }
    del sets
    common.free_memory()
    print(f"  {case.name}: done (max rel err {max(errors.values()):.2e})", flush=True)
    return result


def print_tables(results: list[dict[str, Any]], copy_bps: float, args: argparse.Namespace) -> None:
    print(f"\ncopy bandwidth {copy_bps / 1e9:,.0f} GB/s (read + write)")
    print(
        f"{args.adapters} distinct adapters of rank {args.rank}, {args.hidden} -> {args.hidden} per slice, bf16"
    )
    rows = []
    for r in results:
        for step in r["device_ms"]:
            rows.append(
                (
                    f"{r['case']['name']} T={r['tokens']} {step}",
                    r["device_ms"][step] * 1e3,
                    r["device_ms"][step] / r["device_ms"]["base"],
                    r["bandwidth_Bps"][step] / 1e9,
                    r["fraction_of_copy_bw"][step],
                    r["host_us"][step],
                )
            )
    print(common.format_table(("case / step", "dev µs", "/base", "GB/s", "/copy", "host µs"), rows))
    plan_rows = [(f"{r['case']['name']} T={r['tokens']}", r["plan_host_us"]) for r in results]
    print(common.format_table(("plan_sgmv (once per forward)", "host µs"), plan_rows))
    for r in results:
        if r["case"]["tokens_per_row"] == 1:
            ratio = r["lora_over_base"]
            verdict = "MET" if ratio <= TARGET_DECODE_RATIO else "MISSED"
            floor = r["device_ms"]["read floor (2 launches)"] / r["device_ms"]["base"]
            print(
                f"  target {r['case']['name']} T={r['tokens']}: (shrink+expand)/base = {ratio:.3g} "
                f"(<= {TARGET_DECODE_RATIO}) {verdict}; two trivial reads of the same bytes: {floor:.3g}"
            )
            if LAYER_STEP in r["device_ms"]:
                extra = r["device_ms"][LAYER_STEP] / r["device_ms"]["base"] - 1
                print(f"    in the layer (after its GEMM) the adapters add {extra:.3g} of the GEMM's time")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapters", type=int, default=32, help="distinct adapters N (rows take them round-robin)"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096, help="in and out features of each slice")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=128, help="tokens per row of the prefill cases")
    parser.add_argument(
        "--sets", type=int, default=8, help="independent input/weight sets rotated while timing"
    )
    parser.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up time")
    parser.add_argument("--rep-ms", type=float, default=200, help="do_bench timed repetition time")
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth buffer")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    args = parser.parse_args(argv)
    if not 1 <= args.adapters <= args.rows:
        parser.error("--adapters must be between 1 and --rows (each adapter needs a row)")
    if min(args.rank, args.hidden, args.sets, args.prefill_tokens) < 1:
        parser.error("sizes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels.py times Triton kernels on a CUDA GPU; no GPU here, nothing to do.",
            file=sys.stderr,
        )
        return 2
    import triton.testing  # do_bench lives in a submodule

    device = torch.device("cuda")
    torch.manual_seed(0)

    def timer(fn: Callable[[], Any]) -> float:
        return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

    def graph_timer(fn: Callable[[], Any]) -> float:
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")

    env = common.environment(device)
    print(f"device {env['device']}; torch {env['torch']}, triton {env['triton']}", flush=True)
    copy_bps = copy_bandwidth(device, timer, args.copy_mib * 2**20)
    results = [run_case(case, args, device, graph_timer, copy_bps) for case in make_cases(args)]
    if args.json:
        common.write_json(
            args.json,
            {"environment": env, "args": vars(args), "copy_bandwidth_Bps": copy_bps, "cases": results},
        )
    print_tables(results, copy_bps, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
