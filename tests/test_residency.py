"""Adapter residency in pool pages: the row layout, swapping through a small pool, pinning and
exhaustion."""

import json
import shutil

import pytest
import torch
from conftest import DEVICE
from helpers import prompts
from safetensors.torch import load_file, save_file

from hf_multilora import AdapterLoadError, MultiLoraModel, PoolExhaustedError
from hf_multilora.adapters.host_store import pack_adapter
from hf_multilora.kernels.sgmv import WEIGHT_ALIGN
from hf_multilora.memory.page_pool import PagePool
from hf_multilora.memory.residency import AdapterResidency, copy_runs, page_layout


def random_adapter(name: str, shapes: dict, seed: int, dtype=torch.float32):
    """shapes: module -> (rank, in, out)."""
    gen = torch.Generator().manual_seed(seed)
    loras = {
        m: (torch.randn(r, i, generator=gen), torch.randn(o, r, generator=gen), 0.5 + seed % 3)
        for m, (r, i, o) in shapes.items()
    }
    return pack_adapter(name, "test", {}, loras, dtype), loras


SHAPES = {"a.q": (8, 37, 21), "a.v": (5, 16, 64), "b.q": (16, 37, 21)}


def test_page_layout_keeps_rows_whole_aligned_and_in_host_order():
    adapter, loras = random_adapter("x", SHAPES, seed=1)
    page_elems = 160
    layout = page_layout(adapter, page_elems)
    storage = torch.full((len(layout.ranges) * page_elems,), float("nan"))
    for page, (start, length) in enumerate(layout.ranges):
        assert 0 < length <= page_elems
        storage[page * page_elems : page * page_elems + length] = adapter.flat[start : start + length]
    j = 0
    for name, m in adapter.modules.items():
        a, b, _ = loras[name]
        for r in range(2 * m.rank):
            width = m.in_features if r < m.rank else m.out_features
            offset = layout.row_page[j] * page_elems + layout.row_offset[j]
            assert offset % WEIGHT_ALIGN == 0
            expected = a[r] if r < m.rank else b[:, r - m.rank]
            torch.testing.assert_close(storage[offset : offset + width], expected, rtol=0, atol=0)
            j += 1
    rows_elems = sum(m.rank * (m.a_stride + m.b_stride) for m in adapter.modules.values())
    assert len(layout.ranges) <= 2 * rows_elems // page_elems + 1  # pages follow the real rank


def greedy_page_layout(adapter, page_elems):
    """The plain reference: row by row in host order, a row that does not fit opens the next page."""
    ranges, row_page, row_offset = [], [], []
    for m in adapter.modules.values():
        for start, width in zip(m.row_starts(), [m.a_stride] * m.rank + [m.b_stride] * m.rank, strict=True):
            if not ranges or start + width - ranges[-1][0] > page_elems:
                ranges.append([start, 0])
            ranges[-1][1] = start + width - ranges[-1][0]
            row_page.append(len(ranges) - 1)
            row_offset.append(start - ranges[-1][0])
    return [tuple(r) for r in ranges], row_page, row_offset


@pytest.mark.parametrize("page_elems", [64, 96, 160, 1000, 4096])
def test_page_layout_equals_the_row_by_row_greedy_reference(page_elems):
    gen = torch.Generator().manual_seed(page_elems)
    shapes = {f"m{i}": tuple(int(x) for x in torch.randint(1, 60, (3,), generator=gen)) for i in range(12)}
    shapes["wide"] = (3, 64, 9)
    adapter, _ = random_adapter("x", shapes, seed=page_elems)
    layout = page_layout(adapter, page_elems)
    ranges, row_page, row_offset = greedy_page_layout(adapter, page_elems)
    assert layout.ranges == ranges
    assert layout.row_page.tolist() == row_page and layout.row_offset.tolist() == row_offset


def test_page_layout_refuses_rows_wider_than_a_page():
    adapter, _ = random_adapter("x", {"m": (4, 300, 8)}, seed=2)
    with pytest.raises(ValueError, match="does not fit a page"):
        page_layout(adapter, 256)


def test_copies_run_over_consecutive_pages_whose_host_ranges_follow_each_other():
    full = [(0, 256), (256, 256), (512, 100), (612, 256)]
    assert copy_runs([3, 4, 5, 9], full, 256) == [(3, 0, 612), (9, 612, 256)]
    assert copy_runs([3, 5], full[:2], 256) == [(3, 0, 256), (5, 256, 256)]  # pages apart
    assert copy_runs([3, 4], [(0, 200), (256, 256)], 256) == [(3, 0, 200), (4, 256, 256)]  # a page not full
    assert copy_runs([3, 4], [(0, 256), (300, 256)], 256) == [(3, 0, 256), (4, 300, 256)]  # host gap


def test_an_adapter_whose_rows_fill_its_pages_is_placed_in_one_copy_row_for_row():
    """Rows of 64 elements fill 256-element pages exactly: one copy for the whole adapter, and
    every rank row lands where the row table says."""
    adapter, _ = random_adapter("x", {"a.q": (4, 64, 64), "a.v": (8, 64, 64)}, seed=5)
    pool = PagePool(16, 256, torch.float32, DEVICE)
    cache = AdapterResidency(["a.q", "a.v"], pool)
    layout = page_layout(adapter, 256)
    assert len(copy_runs(range(len(layout.ranges)), layout.ranges, 256)) == 1
    (resident,) = cache.acquire([adapter])
    assert resident.pages == sorted(resident.pages)
    rows = cache.rows[resident.row_base : resident.row_base + resident.n_rows].tolist()
    starts = [start for m in adapter.modules.values() for start in m.row_starts()]
    for address, start in zip(rows, starts, strict=True):
        torch.testing.assert_close(pool.storage[address : address + 64], adapter.flat[start : start + 64], rtol=0, atol=0)


def test_an_adapter_placed_again_reuses_its_placement_while_its_host_copy_lives(monkeypatch):
    """A pool smaller than the catalogue places the same adapters again and again (a miss in
    serving): their page layout is computed once per host copy, a new host copy of the name gets its
    own, and the cache does not keep a dropped host copy alive."""
    import gc
    import weakref

    import hf_multilora.memory.residency as residency

    computed = []
    monkeypatch.setattr(residency, "page_layout", lambda a, n: computed.append(a.name) or page_layout(a, n))
    adapters = [random_adapter(f"x{i}", SHAPES, seed=i)[0] for i in range(3)]
    cache = cache_with_pages(len(page_layout(adapters[0], 256).ranges))  # room for one at a time
    for adapter in adapters * 2:
        (resident,) = cache.acquire([adapter])
        cache.release([adapter.name])
        rows = cache.rows[resident.row_base : resident.row_base + resident.n_rows].cpu()
        starts = torch.tensor([start for m in adapter.modules.values() for start in m.row_starts()])
        assert torch.equal(cache.pool.storage[rows.to(DEVICE)].cpu(), adapter.flat[starts])  # each row's first element
    assert computed == ["x0", "x1", "x2"] and cache.misses == 6
    copy = random_adapter("x0", SHAPES, seed=7)[0]  # the name read again (replaced, or re-read from disk)
    cache.acquire([copy])
    cache.release(["x0"])
    assert computed[-1] == "x0" and len(computed) == 4
    gone = weakref.ref(copy)
    cache.drop("x0")
    del copy
    gc.collect()
    assert gone() is None


def cache_with_pages(n_pages: int, page_elems: int = 256) -> AdapterResidency:
    pool = PagePool(n_pages, page_elems, torch.float32, DEVICE)
    return AdapterResidency(sorted(SHAPES), pool)


def test_adapters_in_use_are_never_evicted_and_exhaustion_changes_nothing():
    adapters = [random_adapter(f"x{i}", SHAPES, seed=i)[0] for i in range(4)]
    per_adapter = len(page_layout(adapters[0], 256).ranges)
    cache = cache_with_pages(2 * per_adapter)
    cache.acquire(adapters[:1])  # pinned: a running call uses it
    cache.acquire(adapters[1:2])
    cache.release(["x1"])
    cache.acquire(adapters[2:3])  # evicts x1 (unpinned), never x0
    assert set(cache.resident_names) == {"x0", "x2"} and cache.evictions == 1
    before = (cache.resident_names, cache.pool.num_free, cache.version)
    with pytest.raises(PoolExhaustedError) as err:
        cache.acquire(adapters[1:2] + adapters[3:4])  # x2 is pinned too: no room for two more
    assert err.value.needed == 2 * per_adapter and err.value.available == 0
    assert (cache.resident_names, cache.pool.num_free, cache.version) == before
    with pytest.raises(RuntimeError, match="in use"):
        cache.drop("x0")
    cache.release(["x0", "x2"])
    cache.acquire(adapters[1:2] + adapters[3:4])
    assert set(cache.resident_names) == {"x1", "x3"}
    assert cache.stats()["pages_adapter"] == 2 * per_adapter


def test_eviction_takes_the_least_recently_used_adapter_not_the_oldest():
    """Adapters in use again since they were placed (acquired, or pinned as the model pins resident
    ones) outlive one used longer ago, whether adapter rows or KV blocks need the pages."""
    adapters = [random_adapter(f"x{i}", SHAPES, seed=i)[0] for i in range(4)]
    per_adapter = len(page_layout(adapters[0], 256).ranges)
    cache = cache_with_pages(3 * per_adapter)

    def use(adapter):
        cache.acquire([adapter])
        cache.release([adapter.name])

    for adapter in adapters[:3]:
        use(adapter)
    use(adapters[0])  # placed first, used last
    use(adapters[3])
    assert set(cache.resident_names) == {"x0", "x2", "x3"} and cache.evictions == 1
    cache.pin(["x2"])
    cache.release(["x2"])
    cache.pool.allocate(per_adapter, "kv")  # KV blocks take the pages of the least recently used
    assert set(cache.resident_names) == {"x2", "x3"} and cache.evictions == 2


def fresh_adapters(zoo, root, count: int) -> dict:
    """`count` distinct adapters shaped like the zoo's first one (random weights, same config)."""
    template = next(iter(zoo.paths.values()))
    weights = load_file(template / "adapter_model.safetensors")
    config = json.loads((template / "adapter_config.json").read_text())
    paths = {}
    for i in range(count):
        gen = torch.Generator().manual_seed(1000 + i)
        folder = root / f"a{i}"
        folder.mkdir()
        save_file({k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in weights.items()}, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config))
        paths[f"a{i}"] = folder
    return paths


def test_swapping_200_adapters_through_a_pool_of_8(llama_zoo, tmp_path):
    """Batches cycling through 200 registered adapters, with room for 8 in the pool, give the
    outputs of a model that keeps them all resident; the stats show the swaps."""
    paths = fresh_adapters(llama_zoo, tmp_path, 200)
    roomy = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=paths)
    input_ids = prompts(4, 6, seed=3)
    roomy(input_ids, adapter_ids=["a0", None, "a1", "a2"])
    stats = roomy.memory_stats()
    pages_per_adapter = stats["pages_adapter"] // 3
    small = MultiLoraModel.from_pretrained(
        llama_zoo.fresh_base(), adapters=paths, pool_bytes=8 * pages_per_adapter * stats["page_bytes"]
    )
    names = list(paths)
    for step in range(0, 200, 4):
        rows = [names[(step * 7 + i * 13) % 200] for i in range(4)]
        torch.testing.assert_close(
            small(input_ids, adapter_ids=rows).logits, roomy(input_ids, adapter_ids=rows).logits, rtol=0, atol=0
        )
    stats = small.memory_stats()
    assert len(stats["adapters_resident"]) <= 8
    assert stats["evictions"] >= 200 - 8 and stats["misses"] >= 200
    assert stats["pages_adapter"] <= 8 * pages_per_adapter
    assert stats["bytes_copied_to_device"] > 0
    shutil.rmtree(tmp_path)


def test_the_model_keeps_the_recently_used_adapters_resident(llama_zoo, tmp_path):
    """Through the public API: with room for three adapters, an adapter used again stays resident
    while one used longer ago is evicted, and using it again copies nothing."""
    paths = fresh_adapters(llama_zoo, tmp_path, 5)
    input_ids = prompts(2, 4, seed=11)
    probe = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=paths)
    probe(input_ids, adapter_ids=["a0", None])
    stats = probe.memory_stats()
    model = MultiLoraModel.from_pretrained(
        llama_zoo.fresh_base(), adapters=paths, pool_bytes=3 * stats["pages_adapter"] * stats["page_bytes"]
    )
    for name in ["a0", "a1", "a2", "a0", "a3"]:
        model(input_ids, adapter_ids=[name, None])
    after = model.memory_stats()
    assert sorted(after["adapters_resident"]) == ["a0", "a2", "a3"]
    assert (after["hits"], after["misses"], after["evictions"]) == (1, 4, 1)
    for name in ["a2", "a4", "a0"]:
        model(input_ids, adapter_ids=[name, None])
    after = model.memory_stats()
    assert sorted(after["adapters_resident"]) == ["a0", "a2", "a4"]  # a0 made room for a4, then a3 for a0
    assert (after["hits"], after["misses"], after["evictions"]) == (2, 6, 3)


def test_call_that_cannot_fit_the_pool_fails_cleanly(llama_zoo):
    names = list(llama_zoo.paths)
    input_ids = prompts(2, 5, seed=9)
    probe = MultiLoraModel(llama_zoo.fresh_base())
    probe(input_ids)
    one_page = probe.memory_stats()["page_bytes"]
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths, pool_bytes=one_page)
    with pytest.raises(PoolExhaustedError, match="pages"):
        model(input_ids, adapter_ids=names[:2])
    assert model.memory_stats()["adapters_resident"] == []
    base = llama_zoo.base(input_ids).logits
    torch.testing.assert_close(model(input_ids).logits, base)


def test_registration_reads_no_weights_and_host_budget_rereads_from_disk(llama_zoo, tmp_path):
    paths = fresh_adapters(llama_zoo, tmp_path, 12)
    roomy = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=paths)
    assert roomy.memory_stats()["host_loads"] == 0 and roomy.memory_stats()["adapters_in_host_memory"] == 0
    input_ids = prompts(2, 4, seed=5)
    roomy(input_ids, adapter_ids=["a0", "a1"])
    stats = roomy.memory_stats()
    assert stats["host_loads"] == 2 and stats["adapters_in_host_memory"] == 2
    budget = stats["host_bytes"]  # room for two host copies
    pool = 3 * (stats["pages_adapter"] // 2 + 1) * stats["page_bytes"]  # a few adapters: evicted ones come back
    small = MultiLoraModel.from_pretrained(
        llama_zoo.fresh_base(), adapters=paths, host_cache_bytes=budget, pool_bytes=pool
    )
    names = list(paths)
    for step in range(12):
        rows = [names[step], names[(step + 5) % 12]]
        torch.testing.assert_close(
            small(input_ids, adapter_ids=rows).logits, roomy(input_ids, adapter_ids=rows).logits, rtol=0, atol=0
        )
        assert small.memory_stats()["host_bytes"] <= budget
    assert small.memory_stats()["host_loads"] > 12


def test_prefetch_makes_adapters_resident_before_the_call(llama_zoo):
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    names = list(llama_zoo.paths)
    with pytest.raises(KeyError, match="unknown"):
        model.prefetch_adapters(["nope"])
    model.prefetch_adapters(names[:2])
    stats = model.memory_stats()
    assert sorted(stats["adapters_resident"]) == sorted(names[:2]) and stats["misses"] == 2
    model(prompts(2, 4, seed=6), adapter_ids=names[:2])
    assert model.memory_stats()["misses"] == 2 and model.memory_stats()["hits"] >= 2


def test_host_only_prefetch_reads_weights_but_takes_no_pages(llama_zoo, tmp_path):
    paths = fresh_adapters(llama_zoo, tmp_path, 11)
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=paths)
    model.prefetch_adapters(list(paths), host_only=True)  # more names than one parallel read
    stats = model.memory_stats()
    assert stats["host_loads"] == 11 and stats["adapters_in_host_memory"] == 11
    assert "pages_total" not in stats  # no pool yet: no call has needed one
    model(prompts(3, 4, seed=2), adapter_ids=["a0", "a5", "a10"])
    assert model.memory_stats()["host_loads"] == 11  # the call read nothing from disk
    budget = model.memory_stats()["host_bytes"] * 3 // 11  # room for three copies
    small = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=paths, host_cache_bytes=budget)
    small.prefetch_adapters(list(paths), host_only=True)
    assert small.memory_stats()["host_bytes"] <= budget + 8 * budget // 3  # at most one read batch over


def test_a_call_whose_adapters_fail_to_read_changes_nothing(llama_zoo, tmp_path):
    """Misses are read in parallel; one unreadable file fails the call before anything is kept."""
    paths = fresh_adapters(llama_zoo, tmp_path, 4)
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=paths)
    (paths["a2"] / "adapter_model.safetensors").write_bytes(b"not safetensors")
    input_ids = prompts(4, 4, seed=8)
    with pytest.raises(AdapterLoadError, match="a2"):
        model(input_ids, adapter_ids=["a0", "a1", "a2", "a3"])
    stats = model.memory_stats()
    assert stats["adapters_in_host_memory"] == 0 and stats["adapters_resident"] == []
    assert stats["pages_adapter"] == 0
    model(input_ids, adapter_ids=["a0", "a1", None, "a3"])
    assert model.memory_stats()["adapters_in_host_memory"] == 3


def test_generate_that_runs_out_of_kv_pages_fails_cleanly_and_the_next_call_works(llama_zoo):
    """KV blocks and adapter rows share the pool: a generate whose KV outgrows it raises
    PoolExhaustedError with numbers, returns every KV page, and a smaller call then works."""
    names = list(llama_zoo.paths)
    input_ids = prompts(2, 6, seed=12)
    probe = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    probe.generate(input_ids, adapter_ids=names[:2], max_new_tokens=1, do_sample=False)
    stats = probe.memory_stats()
    pages = stats["pages_adapter"] + 4  # both adapters, and only a few KV pages
    model = MultiLoraModel.from_pretrained(
        llama_zoo.fresh_base(), adapters=llama_zoo.paths, pool_bytes=pages * stats["page_bytes"]
    )
    with pytest.raises(PoolExhaustedError) as err:
        model.generate(input_ids, adapter_ids=names[:2], max_new_tokens=200, do_sample=False)
    assert err.value.needed > err.value.available
    after = model.memory_stats()
    assert after["pages_kv"] == 0 and after["pages_free"] + after["pages_adapter"] == after["pages_total"]
    small = model.generate(input_ids[:, :2], adapter_ids=names[:2], max_new_tokens=1, do_sample=False)
    expected = probe.generate(input_ids[:, :2], adapter_ids=names[:2], max_new_tokens=1, do_sample=False)
    assert torch.equal(small, expected)


def test_resident_adapters_are_not_read_again_from_disk(llama_zoo):
    """A host cache smaller than the pool drops host copies of resident adapters; using them
    again needs no disk read (nothing has to be copied to the device)."""
    names = list(llama_zoo.paths)[:2]
    input_ids = prompts(2, 4, seed=7)
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths, host_cache_bytes=1)
    first = model(input_ids, adapter_ids=names).logits
    loads = model.memory_stats()["host_loads"]
    torch.testing.assert_close(model(input_ids, adapter_ids=names).logits, first, rtol=0, atol=0)
    stats = model.memory_stats()
    assert loads == 2 and stats["host_loads"] == loads and stats["hits"] == 2 and stats["misses"] == 2


def test_hooks_follow_registration_and_replacement(llama_zoo):
    model = MultiLoraModel(llama_zoo.fresh_base())
    names = list(llama_zoo.paths)
    for name in names:
        model.load_adapter(llama_zoo.paths[name], name)
    targeted = set(model._hooks)
    model.load_adapter(llama_zoo.paths[names[0]], names[0], replace=True)
    assert set(model._hooks) == targeted
    for name in names:
        model.unload_adapter(name)
    assert model._hooks == {} and not +model._module_users


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pool_bytes=0), "pool_bytes"),
        (dict(pool_bytes=True), "pool_bytes"),
        (dict(pool_fraction=1.5), "pool_fraction"),
        (dict(pool_bytes=1 << 20, pool_fraction=0.5), "not both"),
        (dict(host_cache_bytes=-1), "host_cache_bytes"),
    ],
)
def test_bad_memory_settings_are_refused_at_construction(llama_zoo, kwargs, message):
    base = llama_zoo.fresh_base()
    with pytest.raises(ValueError, match=message):
        MultiLoraModel(base, **kwargs)
    assert not base._forward_pre_hooks  # the base is left as it was (no planning hook)


def test_the_row_table_keeps_its_address_while_adapters_come_and_go():
    """Captured decode graphs read the row table by address: it is sized for the pool at the first
    placement, not doubled as adapters arrive (each growth recaptured every batch size)."""
    adapters = [random_adapter(f"x{i}", SHAPES, seed=i)[0] for i in range(12)]
    cache = cache_with_pages(4 * len(page_layout(adapters[0], 256).ranges))
    cache.acquire(adapters[:1])
    table = cache.rows
    for adapter in adapters[1:]:
        cache.acquire([adapter])
        cache.release([adapter.name])
    assert cache.rows is table and cache.evictions > 0
