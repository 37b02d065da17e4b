"""Helpers shared by the benchmark scripts: environment facts, host timing, memory, tables, JSON.

Importing this module also puts the Hugging Face hub in offline mode (unless the caller chose
otherwise): the GPU machine has no network, and a hub lookup there would wait on timeouts instead of
failing fast. Import it before transformers/peft for that to take effect.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

try:
    import hf_multilora.app  # noqa: F401  (the package maps app/ into it: needs an install)
except ModuleNotFoundError as err:
    raise SystemExit(
        "hf_multilora is not importable here; from the repository root run "
        "`pip install --no-deps --no-build-isolation -e .` first"
    ) from err


def parse_int_list(text: str) -> tuple[int, ...]:
    """'1,4,8' -> (1, 4, 8), for comma-separated CLI options."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Return cached blocks after the caller dropped its references, so phases do not stack up."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def host_seconds(fn: Callable[[], Any], calls: int) -> list[float]:
    """Host wall time of each of `calls` calls (no device synchronisation: pure host cost)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and library versions, stored with every result so numbers stay comparable."""
    import peft
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton missing off Linux
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def start(tiny: bool) -> tuple[torch.device, dict[str, Any]] | None:
    """The device of a generate benchmark and its environment, printed; None (after saying why)
    when the full-size run has no CUDA GPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not tiny:
        print("the full-size benchmark needs a CUDA GPU; use --tiny to check the script on CPU", file=sys.stderr)
        return None
    env = environment(device)
    print(f"device {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}, triton {env['triton']}", flush=True)  # fmt: skip
    return device, env


@contextlib.contextmanager
def explained_oom(enabled: bool, top: int = 15) -> Iterator[None]:
    """With `enabled` (CUDA): record where every allocation was made, and on an out-of-memory error
    print the live memory grouped by the code that allocated it (largest first), then re-raise: one
    failed run says what filled the GPU."""
    if not enabled:
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        yield
    except torch.OutOfMemoryError:
        sizes: collections.Counter[str] = collections.Counter()
        states: collections.Counter[str] = collections.Counter()  # every block, by state and memory pool
        for segment in torch.cuda.memory._snapshot().get("segments", []):
            for block in segment.get("blocks", []):
                states[f"{block.get('state')} in pool {tuple(segment.get('segment_pool_id', ()))}"] += block.get("size", 0)
                if block.get("state") != "active_allocated":
                    continue
                frames = [f for f in block.get("frames", []) if f.get("filename", "").endswith(".py")
                          and "/torch/" not in f["filename"]][:3]  # fmt: skip  (innermost Python first)
                where = " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames)
                sizes[where or "?"] += block.get("size", 0)
        print(f"live CUDA memory at the OOM, by allocating code (top {top}):", file=sys.stderr)
        for where, size in sizes.most_common(top):
            print(f"  {size / 2**30:8.2f} GiB  {where}", file=sys.stderr)
        print("every block, by state and memory pool ((0, 0): the default pool):", file=sys.stderr)
        for where, size in states.most_common():
            print(f"  {size / 2**30:8.2f} GiB  {where}", file=sys.stderr)
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def graph_of(call: Callable[[], Any], calls: int = 1) -> torch.cuda.CUDAGraph:
    """`calls` calls of `call` in one CUDA graph, captured after an eager call (it compiles) and one on
    a side stream, as torch's capture wants."""
    call()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    return graph


def replay_rounds(graphs: dict[str, torch.cuda.CUDAGraph], rounds: int, calls: int = 1) -> dict[str, list[float]]:
    """Microseconds per call of each graph (of `calls` calls), replayed once a round in `rounds`
    rounds whose order rotates (the host and the GPU's clocks drift), timed by CUDA events. Round 0
    is a warm-up: drop each list's first value."""
    times: dict[str, list[float]] = {name: [] for name in graphs}
    names = list(graphs)
    for turn in range(rounds):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[name].replay()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) * 1000 / calls)
    return times


@contextlib.contextmanager
def timed_replays() -> Iterator[list[tuple[torch.cuda.Event, torch.cuda.Event]]]:
    """CUDA events around every CUDA-graph replay in the block, from any thread (read them after a
    synchronize): what each decode step cost the GPU, against its wall time, which adds the host's
    work around it."""
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    replay = torch.cuda.CUDAGraph.replay

    def timed(graph: torch.cuda.CUDAGraph) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay(graph)
        end.record()
        events.append((start, end))

    torch.cuda.CUDAGraph.replay = timed
    try:
        yield events
    finally:
        torch.cuda.CUDAGraph.replay = replay


@contextlib.contextmanager
def gc_pauses() -> Iterator[dict[str, Any]]:
    """Python's garbage collections in the block, from any thread: per generation, how many and
    their total and longest seconds (a full collection stops every thread: a latency outlier)."""
    pauses: dict[str, Any] = {}
    started: list[float] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            seconds = time.perf_counter() - started.pop()
            entry = pauses.setdefault(f"generation {info['generation']}", {"count": 0, "seconds": 0.0, "longest": 0.0})
            entry["count"] += 1
            entry["seconds"] += seconds
            entry["longest"] = max(entry["longest"], seconds)

    gc.callbacks.append(note)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(note)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {target}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (value.rjust(width) for value, width in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)
