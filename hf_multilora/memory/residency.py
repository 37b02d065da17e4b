"""Device residency of adapters: their rank rows live in pages of the unified pool.

The host store is the source of truth; the device holds copies of some adapters. A resident adapter has
- pages of the pool (kind "adapter"), filled with its rank rows in host order, so a page holds one
  contiguous range of the host tensor and placing an adapter costs one copy per page;
- a range of the row table `rows` (element offset of each of its rank rows in the pool storage);
- a slot: a column of the location and scale tables [modules, slots] that the kernels index.

Copies run on a side CUDA stream; a call's stream waits on the copy event of each adapter it uses,
so nothing synchronises with the host. Adapters a running call uses are pinned and never evicted;
the others are evicted least recently used when the pool needs pages, for adapters or for KV
blocks (this object is the pool's reclaimer).
"""

from __future__ import annotations

import bisect
import math
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.host_store import HostAdapter
from ..kernels.sgmv import LOCATION_FIELDS
from ..transfer import to_device
from .page_pool import PagePool, PoolExhaustedError

_FLOAT32_MAX = torch.finfo(torch.float32).max
ROW_TABLE_ENTRIES = 1 << 20  # 8 MiB: the rank rows of ~250 Llama-2-7B q/k/v/o rank-16 adapters


@dataclass(frozen=True)
class PageLayout:
    """Where an adapter's rows go: page i receives host elements [start, start + length) of
    `ranges[i]`; row j (in ModuleLora.row_starts order, module by module) sits in page
    `row_page[j]` at element `row_offset[j]` (int64 tensors)."""

    ranges: list[tuple[int, int]]
    row_page: torch.Tensor
    row_offset: torch.Tensor


def page_layout(adapter: HostAdapter, page_elems: int) -> PageLayout:
    """Greedy in host order: a row that does not fit the current page opens the next one. One step
    per page, not per row: a 7B q/k/v/o rank-16 adapter has 4,096 rows, and a loop over them cost
    ~6 ms of host time for every adapter placed (a miss in serving)."""
    modules = list(adapter.modules.items())
    for name, m in modules:
        if m.rank and max(m.a_stride, m.b_stride) > page_elems:
            raise ValueError(
                f"adapter {adapter.name!r} module {name!r}: a rank row of {max(m.a_stride, m.b_stride)} "
                f"elements does not fit a page of {page_elems}"
            )
    # Segments: each module's A rows, then its B rows; rank rows of one width each, back to back.
    segments = torch.tensor([(offset, stride, m.rank) for _, m in modules
                             for offset, stride in ((m.a_offset, m.a_stride), (m.b_offset, m.b_stride))],
                            dtype=torch.int64).reshape(-1, 3)  # fmt: skip
    base, stride, count = segments.unbind(1)
    seg_first = torch.cumsum(count, 0) - count
    segment = torch.repeat_interleave(torch.arange(len(count)), count)
    start = base[segment] + (torch.arange(segment.numel()) - seg_first[segment]) * stride[segment]
    end = start + stride[segment]
    ends, starts, firsts, row = end.tolist(), start.tolist(), [], 0
    while row < len(starts):  # a page holds the rows that end within page_elems of its first row's start
        firsts.append(row)
        row = bisect.bisect_right(ends, starts[row] + page_elems, lo=row + 1)
    first = torch.tensor(firsts, dtype=torch.int64)
    counts = torch.diff(first, append=torch.tensor([len(starts)]))
    ranges = list(zip(start[first].tolist(), (end[first + counts - 1] - start[first]).tolist(), strict=True))
    row_page = torch.repeat_interleave(torch.arange(first.numel()), counts)
    return PageLayout(ranges, row_page, start - start[first][row_page])


def copy_runs(pages: Sequence[int], ranges: Sequence[tuple[int, int]], page_elems: int) -> list[tuple[int, int, int]]:
    """(first page, host start, elements) per copy: consecutive pages whose host ranges follow each
    other, every one but the last a full page, go in one copy. A 7B q/k/v/o adapter's rows fill
    its 64-128 pages exactly (32 rows of 4,096 per page), and each copy is a call of its own on the
    host, on the engine's critical path when a request's adapter is not resident."""
    runs: list[tuple[int, int, int]] = []
    for page, (start, length) in zip(pages, ranges, strict=True):
        if runs:
            first, begin, elems = runs[-1]
            if elems % page_elems == 0 and page == first + elems // page_elems and start == begin + elems:
                runs[-1] = (first, begin, elems + length)
                continue
        runs.append((page, start, length))
    return runs


@dataclass(frozen=True)
class Placement:
    """What placing an adapter needs besides pages, computed once per host copy (`AdapterResidency.
    placement`): ~1 ms of host time for a 7B q/k/v/o adapter, paid on every miss before, and a pool
    that holds ~80 of 400 adapters misses ~150 times in a 256-request serving run."""

    layout: PageLayout
    column: torch.Tensor  # int64 [modules, LOCATION_FIELDS], rows counted from the adapter's first row
    scales: torch.Tensor  # float32 [modules]
    module_mask: int
    narrowest_row: int  # elements of its narrowest rank row
    copied_elems: int  # elements its pages receive


@dataclass
class Resident:
    slot: int
    pages: list[int]
    row_base: int  # first entry of its range in the row table
    n_rows: int
    max_rank: int
    module_mask: int  # bit m set when the adapter targets module m
    ready: Any = None  # CUDA event recorded after its copies (None: already usable)
    host: torch.Tensor | None = None  # the copied host tensor, kept alive until `ready`


class AdapterResidency:
    def __init__(self, module_names: Sequence[str], pool: PagePool) -> None:
        self.module_index = {name: i for i, name in enumerate(module_names)}
        self.pool = pool
        self.device, self.dtype = pool.device, pool.dtype
        n = len(module_names)
        self.locations = torch.zeros(n, 0, LOCATION_FIELDS, dtype=torch.int64, device=self.device)
        self.scales = torch.zeros(n, 0, dtype=torch.float32, device=self.device)
        self.rows = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._free_row_ranges: list[tuple[int, int]] = []  # (start, length), sorted, coalesced
        self._rows_end = 0
        self._free_slots: list[int] = []
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # LRU order, oldest first
        self._by_slot: dict[int, Resident] = {}
        self._in_use: Counter[str] = Counter()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # name -> (its host adapter, weakly: a host copy the host store drops must not stay alive, Placement)
        self._placements: dict[str, tuple[weakref.ref, Placement]] = {}
        self.version = 0  # bumped whenever a table or slot changes: prepared launches key on it
        self.hits = self.misses = self.evictions = self.bytes_copied = 0
        pool.set_reclaimer(self)

    # ------------------------------------------------------------------ calls

    def acquire(self, adapters: Sequence[HostAdapter]) -> list[Resident]:
        """Make `adapters` resident and pin them until `release`. Raises PoolExhaustedError before
        changing anything when they cannot all be placed, even after evicting unpinned adapters."""
        distinct = list({a.name: a for a in adapters}.values())
        missing = [a for a in distinct if a.name not in self._resident]
        placements = {a.name: self.placement(a) for a in missing}
        needed = sum(len(p.layout.ranges) for p in placements.values())
        protected = {a.name for a in distinct}
        available = self.pool.num_free + self._reclaimable(protected)
        if needed > available:
            raise PoolExhaustedError(needed=needed, available=available, kind="adapter")
        self._in_use.update(dict.fromkeys(protected, 1))
        try:
            for adapter in missing:
                self._place(adapter, placements[adapter.name])
        except BaseException:
            self._in_use.subtract(dict.fromkeys(protected, 1))
            self._in_use += Counter()
            raise
        self.hits += len(distinct) - len(missing)
        self._use([a.name for a in distinct])
        return [self._resident[a.name] for a in adapters]

    def pin(self, names: Sequence[str]) -> None:
        """Keep resident adapters from eviction until `release` (as `acquire` does)."""
        unknown = [n for n in names if n not in self._resident]
        if unknown:
            raise KeyError(f"adapters {unknown} are not resident")
        self._in_use.update(dict.fromkeys(names, 1))
        self.hits += len(set(names))
        self._use(names)

    def _use(self, names: Sequence[str]) -> None:
        """Most recently used now; the current stream waits for their copies (a prefetch may
        still be copying)."""
        stream = torch.cuda.current_stream(self.device) if self._copy_stream is not None else None
        for name in names:
            self._resident.move_to_end(name)
            resident = self._resident[name]
            if resident.ready is not None and stream is not None:
                stream.wait_event(resident.ready)
                if resident.ready.query():  # copied: the source may go (the host store decides)
                    resident.ready = resident.host = None

    def release(self, names: Sequence[str]) -> None:
        """Unpin what `acquire` pinned (names as given to it, repeats allowed)."""
        self._in_use.subtract({n: 1 for n in dict.fromkeys(names)})
        self._in_use += Counter()  # drops zero counts

    def acquire_names(self, names: Sequence[str], load: Callable[[list[str]], list[HostAdapter]]) -> list[Resident]:
        """`acquire` by name: resident adapters are only pinned, as their host copy may have left
        the host store and nothing needs copying; `load(names)` gives the host adapters of the
        others (it may leave some out: they are then not resident). Unpin with `release(names)`."""
        names = list(dict.fromkeys(names))
        resident = [n for n in names if n in self._resident]
        self.pin(resident)
        try:
            self.acquire(load([n for n in names if n not in self._resident]))
        except BaseException:
            self.release(resident)
            raise
        return [self._resident[n] for n in names if n in self._resident]

    def drop(self, name: str) -> None:
        if self._in_use[name]:
            raise RuntimeError(f"adapter {name!r} is in use by a running call")
        if name in self._resident:
            self._evict(name)
        self._placements.pop(name, None)

    def placement(self, adapter: HostAdapter) -> Placement:
        """`adapter`'s Placement, computed at its first placement and kept while its host copy lives.
        Raises ValueError (an adapter this pool cannot hold) before anything changes."""
        known = self._placements.get(adapter.name)
        if known is not None and known[0]() is adapter:
            return known[1]
        column, scales, mask = self._slot_tables(adapter)
        narrowest = min(min(m.a_stride, m.b_stride) for m in adapter.modules.values())
        layout = page_layout(adapter, self.pool.page_elems)
        placement = Placement(layout, column, scales, mask, narrowest, sum(n for _, n in layout.ranges))
        self._placements[adapter.name] = (weakref.ref(adapter), placement)
        return placement

    # ------------------------------------------------------------------ queries

    def resident(self, name: str) -> Resident | None:
        return self._resident.get(name)

    def resident_at(self, slot: int) -> Resident:
        return self._by_slot[slot]

    @property
    def resident_names(self) -> list[str]:
        return list(self._resident)

    def stats(self) -> dict[str, Any]:
        return {
            **self.pool.stats(),
            "adapters_resident": self.resident_names,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes_copied_to_device": self.bytes_copied,
        }

    # ------------------------------------------------------------------ pool reclaimer

    def reclaimable_pages(self) -> int:
        return self._reclaimable(set())

    def reclaim(self, n: int) -> None:
        """Evict unpinned adapters, least recently used first, until `n` pages were freed."""
        freed = 0
        for name in [m for m in self._resident if not self._in_use[m]]:
            if freed >= n:
                break
            freed += len(self._resident[name].pages)
            self._evict(name)
            self.evictions += 1

    # ------------------------------------------------------------------ internals

    def _reclaimable(self, protected: set[str]) -> int:
        return sum(
            len(r.pages) for n, r in self._resident.items() if not self._in_use[n] and n not in protected
        )

    def _place(self, adapter: HostAdapter, placement: Placement) -> None:
        """Copy `adapter` into fresh pages and give it a slot. A failure after the pages are taken
        gives back what was taken: nothing leaks."""
        layout = placement.layout
        pages = sorted(self.pool.allocate(len(layout.ranges), "adapter"))  # ascending: longer runs to copy
        row_base = slot = None
        try:
            ready = self._copy_into(pages, adapter.flat, layout)
            n_rows = layout.row_page.numel()
            row_base = self._allocate_rows(n_rows, placement.narrowest_row)
            page_elems = self.pool.page_elems
            addresses = torch.tensor(pages, dtype=torch.int64)[layout.row_page] * page_elems + layout.row_offset
            # Pinned, stream-ordered copies: a pageable one waits for all queued work, and the
            # serving engine places a newly admitted request's adapter while a decode step runs.
            self.rows[row_base : row_base + n_rows] = to_device(addresses, self.device)
            slot = self._take_slot()
            column = placement.column.clone()
            column[column[:, 2] > 0, :2] += row_base
            self.locations[:, slot] = to_device(column, self.device)
            self.scales[:, slot] = to_device(placement.scales, self.device)
        except BaseException:
            if slot is not None:
                self.locations[:, slot, 2] = 0
                self._free_slots.append(slot)
            if row_base is not None:
                self._release_rows(row_base, n_rows)
            self.pool.free(pages)
            raise
        self.bytes_copied += placement.copied_elems * self.pool.storage.element_size()
        self.misses += 1
        resident = Resident(slot, pages, row_base, n_rows, adapter.max_rank, placement.module_mask, ready, adapter.flat)
        self._resident[adapter.name] = self._by_slot[slot] = resident
        self.version += 1

    def _slot_tables(self, adapter: HostAdapter) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(location column [modules, LOCATION_FIELDS] with rows counted from the adapter's first row,
        scale column [modules] in float32, module mask). Raises for a scale float32 cannot hold."""
        index, ranks, factors = [], [], []
        for module_name, m in adapter.modules.items():
            if not math.isfinite(m.scale) or abs(m.scale) > _FLOAT32_MAX:
                raise ValueError(
                    f"adapter {adapter.name!r} module {module_name!r}: scale {m.scale!r} is not a finite "
                    "float32"
                )
            index.append(self.module_index[module_name])
            ranks.append(m.rank)
            factors.append(m.scale)
        # Whole columns at once (an element assignment per module cost ~5 ms for a 7B adapter).
        column = torch.zeros(len(self.module_index), LOCATION_FIELDS, dtype=torch.int64)
        scales = torch.zeros(len(self.module_index), dtype=torch.float32)
        rank = torch.tensor(ranks, dtype=torch.int64)
        first = torch.cumsum(2 * rank, 0) - 2 * rank  # rows counted from the adapter's first
        rows = torch.tensor(index, dtype=torch.int64)
        column[rows] = torch.stack([first, first + rank, rank], dim=1)
        scales[rows] = torch.tensor(factors, dtype=torch.float32)
        mask = sum(1 << i for i in index)
        return column, scales, mask

    def _copy_into(self, pages: list[int], flat: torch.Tensor, layout: PageLayout) -> Any:
        """Copy the page ranges of `flat` into `pages`, one copy per run (`copy_runs`); on CUDA on the
        side stream, returning the event that marks the copy done (None on CPU: done already)."""
        page_elems, storage = self.pool.page_elems, self.pool.storage
        runs = copy_runs(pages, layout.ranges, page_elems)
        if self._copy_stream is None:
            for page, start, length in runs:
                storage[page * page_elems : page * page_elems + length].copy_(flat[start : start + length])
            return None
        # Pages may have held data that work already queued still reads: copy after it.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            for page, start, length in runs:
                dst = storage[page * page_elems : page * page_elems + length]
                dst.copy_(flat[start : start + length], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return ready

    def _evict(self, name: str) -> None:
        resident = self._resident.pop(name)
        del self._by_slot[resident.slot]
        self.locations[:, resident.slot, 2] = 0
        self._free_slots.append(resident.slot)
        self._release_rows(resident.row_base, resident.n_rows)
        self.pool.free(resident.pages)
        self.version += 1

    def _take_slot(self) -> int:
        if not self._free_slots:
            old = self.locations.shape[1]
            new = max(8, 2 * old)
            grown = torch.zeros(self.locations.shape[0], new, LOCATION_FIELDS, dtype=torch.int64, device=self.device)
            grown[:, :old] = self.locations
            scales = torch.zeros(self.scales.shape[0], new, dtype=torch.float32, device=self.device)
            scales[:, :old] = self.scales
            self.locations, self.scales = grown, scales
            self._free_slots = list(range(new - 1, old - 1, -1))
        return self._free_slots.pop()

    def _allocate_rows(self, n: int, narrowest: int) -> int:
        """A range of `n` entries of the row table. The table grows at most to what a pool full of
        rows `narrowest` elements wide needs, up to ROW_TABLE_ENTRIES, at once: captured decode graphs
        read it by address, so each growth recaptured every batch size (11 captures in a 400-adapter
        serving run). Past that (or a free range too fragmented) it doubles."""
        for i, (start, free) in enumerate(self._free_row_ranges):
            if free >= n:
                self._free_row_ranges[i : i + 1] = [(start + n, free - n)] if free > n else []
                return start
        start, self._rows_end = self._rows_end, self._rows_end + n
        if self._rows_end > self.rows.numel():
            full_pool = self.pool.num_pages * (self.pool.page_elems // narrowest)
            size = max(self._rows_end, 2 * self.rows.numel(), min(full_pool, ROW_TABLE_ENTRIES))
            grown = torch.zeros(size, dtype=torch.int64, device=self.device)
            grown[: self.rows.numel()] = self.rows
            self.rows = grown
        return start

    def _release_rows(self, start: int, n: int) -> None:
        merged: list[tuple[int, int]] = []
        for s, size in sorted([*self._free_row_ranges, (start, n)]):
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((s, size))
        if merged and merged[-1][0] + merged[-1][1] == self._rows_end:
            self._rows_end = merged.pop()[0]
        self._free_row_ranges = merged
