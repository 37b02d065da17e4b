"""PagePool: random allocate/free/exhaustion sequences against a model, plus the error paths."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hf_multilora.kernels.sgmv import WEIGHT_ALIGN
from hf_multilora.memory.page_pool import PagePool, PoolExhaustedError


class FakeReclaimer:
    """Owns some "adapter" pages (like the residency of idle adapters) and frees them when asked.

    `shortfall` > 0 makes it buggy: it promises all its pages but frees `shortfall` fewer than asked.
    """

    def __init__(self, pool: PagePool) -> None:
        self.pool, self.owned, self.calls, self.shortfall = pool, [], [], 0

    def take(self, n: int) -> None:
        self.owned += self.pool.allocate(n, "adapter")

    def reclaimable_pages(self) -> int:
        return len(self.owned)

    def reclaim(self, n: int) -> None:
        self.calls.append(n)
        k = max(0, min(n - self.shortfall, len(self.owned)))
        victims, self.owned = self.owned[:k], self.owned[k:]
        self.pool.free(victims)


def snapshot(pool: PagePool) -> tuple:
    return (list(pool._free), [pool.kind_of(p) for p in range(pool.num_pages)], pool.stats())


def check_consistent(pool: PagePool, held: dict[int, str]) -> None:
    """`held`: every allocated page (by the test or the reclaimer) -> its kind."""
    free = pool._free
    assert len(free) == len(set(free)), "a page is on the free list twice"
    assert set(free).isdisjoint(held), "a handed-out page is also free"
    assert set(free) | set(held) == set(range(pool.num_pages)), "a page leaked"
    kinds = [pool.kind_of(p) for p in range(pool.num_pages)]
    assert kinds == [held.get(p) for p in range(pool.num_pages)]
    assert pool.num_free == len(free)
    assert pool.num_kv == sum(k == "kv" for k in held.values())
    assert pool.num_adapter == sum(k == "adapter" for k in held.values())
    assert pool.num_free + pool.num_kv + pool.num_adapter == pool.num_pages
    assert pool.stats() == {
        "pages_total": pool.num_pages,
        "pages_free": pool.num_free,
        "pages_kv": pool.num_kv,
        "pages_adapter": pool.num_adapter,
        "page_bytes": pool.page_bytes,
    }


class PoolMachine(RuleBasedStateMachine):
    """The model: `held` (pages the test holds) and the reclaimer's `owned`; every page is one of
    those or free. Each rule predicts the outcome from the model before calling the pool."""

    @initialize(num_pages=st.integers(1, 24), with_reclaimer=st.booleans())
    def setup(self, num_pages: int, with_reclaimer: bool) -> None:
        self.pool = PagePool(num_pages, WEIGHT_ALIGN, torch.float32, "cpu")
        self.rec = FakeReclaimer(self.pool)
        if with_reclaimer:
            self.pool.set_reclaimer(self.rec)
        self.reclaimer_on = with_reclaimer
        self.held: dict[int, str] = {}

    def all_held(self) -> dict[int, str]:
        return {**self.held, **dict.fromkeys(self.rec.owned, "adapter")}

    @rule(on=st.booleans())
    def toggle_reclaimer(self, on: bool) -> None:
        self.pool.set_reclaimer(self.rec if on else None)
        self.reclaimer_on = on

    @rule(data=st.data())
    def reclaimer_takes(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, self.pool.num_free))
        self.rec.take(n)

    @rule(n=st.integers(0, 30), kind=st.sampled_from(["kv", "adapter"]), buggy=st.booleans())
    def allocate(self, n: int, kind: str, buggy: bool) -> None:
        free = self.pool.num_free
        reclaimable = len(self.rec.owned) if self.reclaimer_on else 0
        self.rec.shortfall, self.rec.calls = (1 if buggy else 0), []
        before = snapshot(self.pool)
        if n > free + reclaimable:
            with pytest.raises(PoolExhaustedError) as err:
                self.pool.allocate(n, kind)
            assert (err.value.needed, err.value.available) == (n, free + reclaimable)
            assert snapshot(self.pool) == before and self.rec.calls == []
        elif n > free and buggy:
            with pytest.raises(RuntimeError, match="reclaimer"):
                self.pool.allocate(n, kind)
            assert self.rec.calls == [n - free]
            assert self.pool.num_free == free + max(0, n - free - 1)  # what it did free, stays free
        else:
            pages = self.pool.allocate(n, kind)
            assert len(pages) == len(set(pages)) == n
            assert set(pages).isdisjoint(self.all_held()), "handed out a page that was not free"
            assert self.rec.calls == ([n - free] if n > free else [])
            self.held.update(dict.fromkeys(pages, kind))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free_some(self, data: st.DataObject) -> None:
        pages = data.draw(st.lists(st.sampled_from(sorted(self.held)), unique=True))
        self.pool.free(iter(pages))  # any iterable
        for p in pages:
            del self.held[p]

    @rule(data=st.data())
    def free_bad(self, data: st.DataObject) -> None:
        """A mix of valid pages and one bad entry: nothing at all may be freed."""
        n = self.pool.num_pages
        good = data.draw(st.lists(st.sampled_from(sorted(self.held)), unique=True)) if self.held else []
        free_pages = sorted(set(range(n)) - set(self.all_held()))
        bad_choices = [st.sampled_from([-1, n, n + 5, 1.0, "0", None, True])]
        if free_pages:
            bad_choices.append(st.sampled_from(free_pages))  # double free
        if good:
            bad_choices.append(st.sampled_from(good))  # duplicate within the call
        bad = data.draw(st.one_of(bad_choices))
        pages = list(good)
        pages.insert(data.draw(st.integers(0, len(pages))), bad)
        before = snapshot(self.pool)
        with pytest.raises(ValueError, match="page"):
            self.pool.free(pages)
        assert snapshot(self.pool) == before

    @rule(n=st.sampled_from([-1, 1.5, "2", None, True]), kind=st.sampled_from(["kv", "lora", None]))
    def allocate_bad(self, n: object, kind: object) -> None:
        before = snapshot(self.pool)
        with pytest.raises(ValueError):
            self.pool.allocate(n, kind)  # type: ignore[arg-type]
        assert snapshot(self.pool) == before

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "pool"):
            check_consistent(self.pool, self.all_held())


PoolMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPoolMachine = PoolMachine.TestCase


# ---- plain tests -----------------------------------------------------------------------------


def test_storage_layout_and_offsets() -> None:
    pool = PagePool(5, 16, torch.bfloat16, "cpu")
    assert pool.storage.shape == (5 * 16,) and pool.storage.dtype == torch.bfloat16
    assert pool.storage.device == torch.device("cpu") and pool.storage.is_contiguous()
    assert (pool.num_pages, pool.page_elems, pool.page_bytes) == (5, 16, 32)
    assert pool.dtype == torch.bfloat16 and pool.device == torch.device("cpu")
    assert [pool.offset(p) for p in range(5)] == [0, 16, 32, 48, 64]
    for bad in (-1, 5, 1.0):
        with pytest.raises(ValueError, match="page"):
            pool.offset(bad)  # type: ignore[arg-type]
    assert pool.stats() == {
        "pages_total": 5,
        "pages_free": 5,
        "pages_kv": 0,
        "pages_adapter": 0,
        "page_bytes": 32,
    }


@pytest.mark.parametrize(
    ("num_pages", "page_elems", "named"),
    [(0, 8, "0"), (-3, 8, "-3"), (2, 12, "12"), (2, 0, "0"), (2.0, 8, "2.0")],
)
def test_constructor_rejects(num_pages: object, page_elems: object, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        PagePool(num_pages, page_elems, torch.float16, "cpu")  # type: ignore[arg-type]


def test_allocate_all_kinds_and_kind_of() -> None:
    pool = PagePool(4, 8, torch.float32, "cpu")
    kv, ad = pool.allocate(3, "kv"), pool.allocate(1, "adapter")
    assert sorted(kv + ad) == [0, 1, 2, 3] and pool.allocate(0, "kv") == []
    assert [pool.kind_of(p) for p in kv] == ["kv"] * 3 and pool.kind_of(ad[0]) == "adapter"
    assert (pool.num_free, pool.num_kv, pool.num_adapter) == (0, 3, 1)
    pool.free(kv[:1])
    assert pool.kind_of(kv[0]) is None and pool.allocate(1, "adapter") == kv[:1]


def test_bad_kind() -> None:
    pool = PagePool(2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="'weights'"):
        pool.allocate(1, "weights")
    assert pool.num_free == 2


def test_double_free_and_out_of_range() -> None:
    pool = PagePool(3, 8, torch.float32, "cpu")
    a, b = pool.allocate(2, "kv")
    pool.free([a])
    with pytest.raises(ValueError, match=f"page {a} is not allocated"):
        pool.free([b, a])
    with pytest.raises(ValueError, match="page 3 "):
        pool.free([b, 3])
    with pytest.raises(ValueError, match=f"page {b} appears twice"):
        pool.free([b, b])
    assert pool.kind_of(b) == "kv" and pool.num_kv == 1  # b survived all the failed calls


def test_exhausted_message_and_attributes() -> None:
    pool = PagePool(4, 8, torch.float32, "cpu")
    pool.allocate(1, "kv")
    with pytest.raises(PoolExhaustedError, match=r"\b7\b.*'adapter'.*\b3\b") as err:
        pool.allocate(7, "adapter")
    assert (err.value.needed, err.value.available) == (7, 3) and isinstance(err.value, RuntimeError)
    rec = FakeReclaimer(pool)
    rec.take(2)
    pool.set_reclaimer(rec)
    with pytest.raises(PoolExhaustedError, match=r"\b5\b.*\b3\b"):  # 1 free + 2 reclaimable
        pool.allocate(5, "kv")
    assert rec.calls == [] and pool.num_adapter == 2


def test_reclaim_frees_exactly_the_shortfall() -> None:
    pool = PagePool(6, 8, torch.float32, "cpu")
    rec = FakeReclaimer(pool)
    rec.take(4)
    pool.set_reclaimer(rec)
    pages = pool.allocate(5, "kv")
    assert rec.calls == [3] and len(rec.owned) == 1 and pool.num_free == 0
    assert set(pages).isdisjoint(rec.owned) and pool.num_kv == 5


def test_bookkeeping_does_not_touch_storage() -> None:
    """Allocation is host-only: it works with no storage tensor at all (so no device op, no sync)."""
    pool = PagePool(4, 8, torch.float32, "cpu")
    pool.storage = None  # type: ignore[assignment]
    pages = pool.allocate(3, "kv")
    pool.free(pages)
    assert pool.num_free == 4


def test_for_device_pool_bytes() -> None:
    pool = PagePool.for_device(8, torch.float32, "cpu", pool_bytes=1000)  # 32-byte pages
    assert pool.num_pages == 31 and pool.storage.numel() == 31 * 8
    with pytest.raises(ValueError, match="31 bytes"):
        PagePool.for_device(8, torch.float32, "cpu", pool_bytes=31)
    with pytest.raises(ValueError, match="10"):
        PagePool.for_device(10, torch.float32, "cpu", pool_bytes=1000)
    with pytest.raises(ValueError, match="-5"):
        PagePool.for_device(8, torch.float32, "cpu", pool_bytes=-5)


@pytest.mark.parametrize("sizes", [{}, {"pool_bytes": 100, "fraction": 0.5}])
def test_for_device_needs_exactly_one_size(sizes: dict) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PagePool.for_device(8, torch.float32, "cpu", **sizes)


def test_for_device_fraction_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        PagePool.for_device(8, torch.float32, "cpu", fraction=0.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):  # a clear error, not torch's "not compiled with CUDA"
        PagePool.for_device(8, torch.float32, "cuda", fraction=0.5)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, True])
def test_for_device_fraction_range(fraction: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so only the range can fail
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (64_000, 80_000))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        PagePool.for_device(8, torch.float32, "cuda", fraction=fraction)


def test_for_device_fraction_of_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sized from free memory now; the CUDA calls are faked so this runs on CPU."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (asked.append(d), (64_000, 80_000))[1])

    class Captured(PagePool):
        def __init__(self, *args: object) -> None:
            self.args = args

    pool = Captured.for_device(8, torch.float16, "cuda:0", fraction=0.25)  # 16 000 bytes / 16-byte pages
    assert pool.args == (1000, 8, torch.float16, torch.device("cuda:0"))
    assert asked == [torch.device("cuda:0")]


def test_buggy_reclaimer_runtime_error() -> None:
    pool = PagePool(4, 8, torch.float32, "cpu")
    rec = FakeReclaimer(pool)
    rec.take(3)
    rec.shortfall = 2
    pool.set_reclaimer(rec)
    with pytest.raises(RuntimeError, match="reclaimer") as err:
        pool.allocate(4, "kv")
    assert not isinstance(err.value, PoolExhaustedError)
    check_consistent(pool, dict.fromkeys(rec.owned, "adapter"))
    assert pool.num_free == 2 and pool.num_kv == 0


def test_threads_never_share_a_page() -> None:
    """8 threads allocate and free at once (with reclaims); `owner` catches a page handed out twice."""
    pool = PagePool(24, 8, torch.float32, "cpu")

    class SlowReclaimer(FakeReclaimer):
        def reclaim(self, n: int) -> None:
            time.sleep(0)  # lets other threads run mid-allocate: a missing lock shows up here
            super().reclaim(n)

    rec = SlowReclaimer(pool)
    rec.take(16)
    pool.set_reclaimer(rec)
    lock, owner, errors = threading.Lock(), {}, []

    def work(me: int) -> None:
        mine: list[int] = []
        for i in range(300):
            try:
                pages = pool.allocate((me + i) % 6, "kv" if i % 2 else "adapter")
            except PoolExhaustedError:
                pages = []
            with lock:
                errors.extend(p for p in pages if p in owner)
                owner.update(dict.fromkeys(pages, me))
            mine += pages
            if len(mine) > 10:
                with lock:  # un-own before freeing: once freed, another thread may get it
                    for p in mine[:5]:
                        del owner[p]
                pool.free(mine[:5])
                mine = mine[5:]
        with lock:
            for p in mine:
                del owner[p]
        pool.free(mine)

    def worker(me: int) -> None:
        try:
            work(me)
        except Exception as e:  # a thread's exception would otherwise only be printed
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and owner == {}
    check_consistent(pool, dict.fromkeys(rec.owned, "adapter"))
    assert pool.num_free + len(rec.owned) == 24 and len(rec.owned) < 16  # some reclaims happened
