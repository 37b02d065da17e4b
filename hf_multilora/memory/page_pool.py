"""The unified page pool: one device allocation cut into fixed-size pages.

KV blocks and adapter weight rows are both allocated from the same pages, so memory moves freely
between the KV cache and resident adapters (S-LoRA's unified paging). All bookkeeping is host-side
(a free-list stack and a per-page kind array), so allocating and freeing never touch the device and
never synchronise with it. Every call validates its whole input before changing anything: a failed
call leaves the pool exactly as it was.
"""

from __future__ import annotations

import gc
import operator
import threading
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import torch

from ..kernels.sgmv import WEIGHT_ALIGN

KINDS = ("kv", "adapter")


class PoolExhaustedError(RuntimeError):
    """Not enough pages, even counting what the reclaimer could free. Nothing was changed."""

    def __init__(self, needed: int, available: int, kind: str) -> None:
        self.needed, self.available, self.kind = needed, available, kind
        super().__init__(
            f"page pool exhausted: {needed} {kind!r} pages needed, only {available} available "
            "(free plus reclaimable)"
        )


class Reclaimer(Protocol):
    """Something that holds pages it can give back on demand (e.g. the residency of idle adapters)."""

    def reclaimable_pages(self) -> int: ...

    def reclaim(self, n: int) -> None:
        """Free at least `n` pages through `PagePool.free`."""


class PagePool:
    """`num_pages` pages of `page_elems` elements each in ONE flat tensor `storage`.

    Page `p` is `storage[p * page_elems : (p + 1) * page_elems]`. `page_elems` is a multiple of
    WEIGHT_ALIGN so every page starts at an offset the kernels may load with vector loads.
    """

    def __init__(
        self, num_pages: int, page_elems: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        pages, elems = _as_int(num_pages), _check_page_elems(page_elems)
        if pages is None or pages < 1:
            raise ValueError(f"num_pages must be an int >= 1, got {num_pages!r}")
        self.num_pages, self.page_elems = pages, elems
        self.dtype, self.device = dtype, torch.device(device)
        self.storage = torch.empty(self.num_pages * self.page_elems, dtype=dtype, device=self.device)
        self.page_bytes = self.page_elems * self.storage.element_size()
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))  # stack; pops lowest id first
        self._kind: list[str | None] = [None] * self.num_pages
        self._counts = dict.fromkeys(KINDS, 0)
        self._reclaimer: weakref.ref[Reclaimer] | None = None
        self._lock = threading.RLock()  # reentrant: reclaim() calls free() from inside allocate()

    @classmethod
    def for_device(
        cls,
        page_elems: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pool_bytes: int | None = None,
        fraction: float | None = None,
    ) -> PagePool:
        """Size the pool by bytes, or by a fraction of the device's free memory now (CUDA only)."""
        device = torch.device(device)
        if (pool_bytes is None) == (fraction is None):
            raise ValueError(f"give exactly one of pool_bytes / fraction, got {pool_bytes=}, {fraction=}")
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
            if device.type != "cuda" or not torch.cuda.is_available():
                raise ValueError(
                    f"fraction sizes a pool from free CUDA memory; {device} is not an available CUDA "
                    "device: give pool_bytes"
                )
            gc.collect()  # memory only unreachable objects hold (a dropped model in a cycle) counts as free
            torch.cuda.empty_cache()
            pool_bytes = int(torch.cuda.mem_get_info(device)[0] * fraction)
        size = _as_int(pool_bytes)
        if size is None or size < 0:
            raise ValueError(f"pool_bytes must be an int >= 0, got {pool_bytes!r}")
        page_bytes = _check_page_elems(page_elems) * dtype.itemsize
        num_pages = size // page_bytes
        if num_pages < 1:
            raise ValueError(f"pool of {pool_bytes} bytes holds no page of {page_bytes} bytes")
        return cls(num_pages, page_elems, dtype, device)

    def set_reclaimer(self, reclaimer: Reclaimer | None) -> None:
        """Called when `allocate` finds too few free pages; None removes it. Held weakly: the
        reclaimer (the adapter residency) holds the pool, and a strong reference back made a cycle
        that kept a dropped model's pages in memory until Python's cyclic collector ran."""
        with self._lock:
            self._reclaimer = weakref.ref(reclaimer) if reclaimer is not None else None

    def allocate(self, n: int, kind: str) -> list[int]:
        """Take `n` pages for `kind`, reclaiming first if needed; all or nothing."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        count = _as_int(n)
        if count is None or count < 0:
            raise ValueError(f"number of pages must be an int >= 0, got {n!r}")
        n = count
        with self._lock:
            free = len(self._free)
            if n > free:
                available = free
                reclaimer = self._reclaimer() if self._reclaimer is not None else None
                if reclaimer is not None:
                    available += reclaimer.reclaimable_pages()
                if n > available:
                    raise PoolExhaustedError(needed=n, available=available, kind=kind)
                reclaimer.reclaim(n - free)  # type: ignore[union-attr]  # frees via self.free
                if n > len(self._free):
                    raise RuntimeError(
                        f"reclaimer promised {available - free} pages but only {len(self._free) - free} "
                        f"were freed: {n} {kind!r} pages needed, {len(self._free)} free"
                    )
            pages = self._free[len(self._free) - n :][::-1]
            del self._free[len(self._free) - n :]
            for p in pages:
                self._kind[p] = kind
            self._counts[kind] += n
            return pages

    def free(self, pages: Iterable[int]) -> None:
        """Give pages back; every page is checked before any is freed."""
        ids = list(pages)
        # A cache gives back tens of thousands of pages at once: check plain ints in bulk, and
        # anything else page by page.
        if not ids or not all(type(p) is int for p in ids) or min(ids) < 0 or max(ids) >= self.num_pages:
            ids = [self._check_page(p) for p in ids]
        with self._lock:
            kinds = [self._kind[p] for p in ids]
            if None in kinds:
                raise ValueError(f"page {ids[kinds.index(None)]} is not allocated (double free?)")
            if len(set(ids)) != len(ids):
                twice = next(p for p, n in Counter(ids).items() if n > 1)
                raise ValueError(f"page {twice} appears twice in one free() call")
            for kind, n in Counter(kinds).items():
                self._counts[kind] -= n  # type: ignore[index]
            for p in ids:
                self._kind[p] = None
            self._free.extend(ids)

    def kind_of(self, page: int) -> str | None:
        """The kind a page was allocated for; None if it is free."""
        return self._kind[self._check_page(page)]

    def offset(self, page: int) -> int:
        """Element offset of `page` in `storage` (a multiple of WEIGHT_ALIGN)."""
        return self._check_page(page) * self.page_elems

    def _check_page(self, page: object) -> int:
        p = _as_int(page)
        if p is None or not 0 <= p < self.num_pages:
            raise ValueError(f"page {page!r} is not a page id in [0, {self.num_pages})")
        return p

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_kv(self) -> int:
        return self._counts["kv"]

    @property
    def num_adapter(self) -> int:
        return self._counts["adapter"]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "pages_total": self.num_pages,
                "pages_free": len(self._free),
                "pages_kv": self._counts["kv"],
                "pages_adapter": self._counts["adapter"],
                "page_bytes": self.page_bytes,
            }


def _check_page_elems(page_elems: object) -> int:
    elems = _as_int(page_elems)
    if elems is None or elems < 1 or elems % WEIGHT_ALIGN:
        raise ValueError(
            f"page_elems must be a positive multiple of WEIGHT_ALIGN={WEIGHT_ALIGN}, got {page_elems!r}"
        )
    return elems


def _as_int(x: object) -> int | None:
    """`x` as an int if it is a Python/NumPy integer; None for anything else (bools, floats, tensors)."""
    if isinstance(x, (bool, torch.Tensor)) or not hasattr(x, "__index__"):
        return None
    return operator.index(x)  # type: ignore[arg-type]
