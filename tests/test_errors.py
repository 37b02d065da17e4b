"""Bad input gets a clear error before any work, and leaves the model as it was."""

import pytest
import torch
from conftest import VOCAB, build_base, save_adapter

from hf_multilora import AdapterShapeError, MultiLoraModel, UnsupportedAdapterError


@pytest.fixture
def model(llama_zoo):
    names = list(llama_zoo.paths)[:2]
    return MultiLoraModel.from_pretrained(
        llama_zoo.fresh_base(), adapters={n: llama_zoo.paths[n] for n in names}
    )


def ids(rows=2):
    return torch.randint(0, VOCAB, (rows, 4), generator=torch.Generator().manual_seed(0))


def test_unknown_adapter_lists_the_known_ones(model):
    with pytest.raises(
        KeyError, match=r"unknown adapter 'nope' \(row 1\); known adapters: \['attn_r8', 'qv_r4'\]"
    ):
        model.generate(ids(), adapter_ids=["attn_r8", "nope"], max_new_tokens=2)
    with pytest.raises(KeyError, match="index 5"):
        model(ids(), adapter_ids=[5, None])


def test_adapter_ids_length_must_match_the_batch(model):
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        model.generate(ids(), adapter_ids=["attn_r8", None, None], max_new_tokens=2)
    with pytest.raises(ValueError, match="1 entries but the batch has 2 rows"):
        model(input_ids=ids(), adapter_ids=["attn_r8"])


def test_malformed_adapter_ids(model):
    with pytest.raises(TypeError, match="one entry per row"):
        model(ids(), adapter_ids="attn_r8")
    with pytest.raises(TypeError, match=r"adapter_ids\[0\]"):
        model(ids(), adapter_ids=[1.5, None])
    with pytest.raises(ValueError, match="not both"):
        model(ids(), adapter_ids=[None, None], adapter_names=["__base__", "__base__"])


def test_duplicate_name_needs_replace(model, llama_zoo):
    before = model.adapter_names
    with pytest.raises(ValueError, match="already loaded; pass replace=True"):
        model.load_adapter(llama_zoo.paths["mlp_r16"], "attn_r8")
    assert model.adapter_names == before
    old = model(ids(), adapter_ids=["attn_r8", None]).logits
    model.load_adapter(llama_zoo.paths["mlp_r16"], "attn_r8", replace=True)
    new = model(ids(), adapter_ids=["attn_r8", None]).logits
    expected = llama_zoo.peft("mlp_r16")(ids()[:1]).logits[0]
    torch.testing.assert_close(new[0], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(old[0], new[0])


def test_failed_loads_leave_the_registry_as_it_was(model, llama_zoo, tmp_path):
    before = model.adapter_names
    reference = model(ids(), adapter_ids=["attn_r8", "qv_r4"]).logits

    other_base = build_base("llama")
    other_base.model.layers[0].self_attn.q_proj = torch.nn.Linear(
        64, 32, bias=False
    )  # trained on another shape
    wrong = save_adapter(other_base, tmp_path / "wrong", seed=3, r=4, target_modules=["q_proj"])
    with pytest.raises(AdapterShapeError, match=r"model\.layers\.0\.self_attn\.q_proj.*32"):
        model.load_adapter(wrong, "wrong")

    dora = save_adapter(
        llama_zoo.base, tmp_path / "dora", seed=4, r=4, target_modules=["v_proj"], use_dora=True
    )
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        model.load_adapter(dora, "dora")
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        model.load_adapter(dora, "attn_r8", replace=True)
    with pytest.raises(FileNotFoundError, match="missing"):
        model.load_adapter(tmp_path / "missing", "missing")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((dora / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors or adapter_model\.bin"):
        model.load_adapter(no_weights, "no_weights")
    bad = save_adapter(llama_zoo.base, tmp_path / "bad", seed=5, r=4, target_modules=["v_proj"])
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        model.load_adapter(tmp_path / "bad", "bad")

    assert model.adapter_names == before
    torch.testing.assert_close(
        model(ids(), adapter_ids=["attn_r8", "qv_r4"]).logits, reference, rtol=0, atol=0
    )


def test_unload(model):
    model.unload_adapter("attn_r8")
    assert model.adapter_names == ["qv_r4"]
    with pytest.raises(KeyError, match="unknown adapter 'attn_r8'"):
        model.unload_adapter("attn_r8")
    with pytest.raises(KeyError, match="known adapters: \\['qv_r4'\\]"):
        model(ids(), adapter_ids=["attn_r8", None])


def test_invalid_names_and_arguments(model, llama_zoo):
    for bad in ("", "__base__", 3):
        with pytest.raises(ValueError, match="invalid adapter name"):
            model.load_adapter(llama_zoo.paths["mlp_r16"], bad)
    with pytest.raises(TypeError, match="already loaded"):
        MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), torch_dtype=torch.float16)


@pytest.mark.parametrize("bad", [{"attn_r8", None}, {"attn_r8": 0, "qv_r4": 1}, (n for n in ["attn_r8", None])])
def test_adapter_ids_must_be_an_ordered_sequence(model, bad):
    """A set's order of strings depends on the hash seed: rows would get adapters at random."""
    with pytest.raises(TypeError, match=r"adapter_ids must be a list or tuple with one entry per row, got"):
        model(ids(), adapter_ids=bad)
    with pytest.raises(TypeError, match="list or tuple"):
        model.generate(ids(), adapter_ids=torch.tensor([0, 1]), max_new_tokens=1)
    # tuples and other sequences are fine
    torch.testing.assert_close(
        model(ids(), adapter_ids=("attn_r8", None)).logits,
        model(ids(), adapter_ids=["attn_r8", None]).logits,
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("bad", [" ", "\t\n", "a\nb", "red\x1b[31m", "x\u202eevil", "nul\x00"])
def test_blank_names_and_names_with_control_characters_are_refused(model, llama_zoo, bad):
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.load_adapter(llama_zoo.paths["mlp_r16"], bad)
    assert model.adapter_names == ["attn_r8", "qv_r4"]
    model.load_adapter(llama_zoo.paths["mlp_r16"], "ünïcode name ok")


def test_pool_settings_are_checked_when_the_model_is_wrapped(llama_zoo):
    base = llama_zoo.fresh_base()
    with pytest.raises(ValueError, match=r"pool_bytes=100 holds no page: this model's pages are \d+ bytes"):
        MultiLoraModel(base, pool_bytes=100)
    with pytest.raises(ValueError, match="base model is on cpu: move it to CUDA before wrapping it"):
        MultiLoraModel(base, pool_fraction=0.5)
    with pytest.raises(ValueError, match=r"pool_fraction must be in \(0, 1\]"):
        MultiLoraModel(base, pool_fraction=1.5)
    assert not base._forward_pre_hooks  # nothing was attached to the base
    model = MultiLoraModel(base, pool_bytes=2**20)
    model.load_adapter(llama_zoo.paths["qv_r4"], "qv_r4")
    model(ids(), adapter_ids=["qv_r4", None])
    assert model.memory_stats()["pages_total"] > 0


def test_a_failed_placement_gives_back_every_page_it_took():
    """Host-side tables fail (a scale float32 cannot hold) or a later step fails: the pool, the row
    table and the slots are as before, and the cache keeps working."""
    from hf_multilora.adapters.host_store import pack_adapter
    from hf_multilora.memory.page_pool import PagePool
    from hf_multilora.memory.residency import AdapterResidency

    gen = torch.Generator().manual_seed(0)

    def adapter(name, scale):
        loras = {m: (torch.randn(4, 16, generator=gen), torch.randn(24, 4, generator=gen), scale) for m in "qv"}
        return pack_adapter(name, "test", {}, loras, torch.float32)

    pool = PagePool(16, 64, torch.float32, "cpu")
    cache = AdapterResidency(["q", "v"], pool)
    cache.acquire([adapter("good", 0.5)])
    cache.release(["good"])
    state = lambda: (pool.num_free, cache._rows_end, list(cache._free_row_ranges), sorted(cache._free_slots))  # noqa: E731
    before = state()

    with pytest.raises(ValueError, match=r"adapter 'huge' module 'q': scale 1e\+307 is not a finite float32"):
        cache.acquire([adapter("huge", 1e307)])
    assert state() == before and cache.resident("huge") is None

    def broken_slot():
        raise RuntimeError("no slot")

    cache._take_slot = broken_slot
    with pytest.raises(RuntimeError, match="no slot"):
        cache.acquire([adapter("unlucky", 0.5)])
    assert state() == before and cache.resident("unlucky") is None
    del cache._take_slot
    second = adapter("second", 2.0)
    placed = cache.acquire([second])[0]
    first_row = cache.rows[placed.row_base].item()
    torch.testing.assert_close(pool.storage[first_row : first_row + 16], second.flat[:16], rtol=0, atol=0)
    assert pool.num_free == before[0] - len(placed.pages)
