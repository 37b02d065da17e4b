"""Quantized KV pages (hf_multilora.kernels.kv_quant): layout, quantizer error bounds, and the
plain-PyTorch write / gather paths on random data."""

import json

import pytest
import torch
from hf_multilora.app.demo import read_demo
from hf_multilora.kernels.kv_quant import (
    FP8_MAX,
    INT4_LEVELS,
    KvLayout,
    dequantize,
    gather_kv_quant_torch,
    quantize,
    write_kv_quant_torch,
)
from transformers import DynamicCache

from hf_multilora import MultiLoraModel, PagePool
from hf_multilora.cache import PagedCache

LLAMA_7B_PAGE = 256 * 1024  # 16 bf16 tokens of 32 KV heads x 128


@pytest.mark.parametrize(("kv_dtype", "tokens"), [("fp8", 31), ("int4", 60)])
def test_llama_pages_hold_more_tokens(kv_dtype, tokens):
    layout = KvLayout.of(kv_dtype, 32, 128, LLAMA_7B_PAGE)
    assert layout.tokens == tokens
    assert layout.tokens / 16 >= {"fp8": 1.9, "int4": 3.7}[kv_dtype]
    regions = [layout.k_codes, layout.v_codes, layout.k_scale, layout.v_scale, layout.k_min, layout.v_min]
    regions = [r for r in regions if r >= 0]
    assert all(r % 16 == 0 for r in regions) and regions == sorted(regions)
    meta = 32 * tokens * 2
    end = regions[-1] + meta
    assert end <= LLAMA_7B_PAGE
    assert layout.v_codes - layout.k_codes >= 32 * tokens * layout.code_bytes  # regions do not overlap
    assert KvLayout._bytes(kv_dtype, 32, layout.code_bytes, tokens + 1) > LLAMA_7B_PAGE  # one more would not fit
    with pytest.raises(ValueError, match="cannot hold one"):
        KvLayout.of(kv_dtype, 32, 128, 64)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        KvLayout.of("int8", 4, 16, 4096)
    with pytest.raises(ValueError, match="head_dim must be even"):
        KvLayout.of("int4", 4, 15, 4096)


def test_fp8_error_bound():
    x = torch.randn(64, 8, 128, generator=torch.Generator().manual_seed(0)) * 3
    codes, scale, low = quantize(x, "fp8")
    assert low is None and codes.dtype == torch.uint8 and codes.shape == x.shape
    back = dequantize(codes, scale, None, "fp8")
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 on normal codes; values under the
    # smallest normal (2^-6 of the scale) are subnormal, with absolute error <= 2^-10 of the scale
    bound = torch.maximum(x.abs() * 2**-4, scale.float()[..., None] * 2**-9) + 1e-6
    assert ((back - x).abs() <= bound).all()
    assert torch.allclose(x.abs().amax(-1), (scale.float() * FP8_MAX), rtol=2**-10)


def test_int4_error_bound():
    x = torch.randn(64, 8, 128, generator=torch.Generator().manual_seed(1)) + 0.5
    codes, scale, low = quantize(x, "int4")
    assert codes.shape == (64, 8, 64) and low is not None
    back = dequantize(codes, scale, low, "int4")
    step = scale.float()[..., None]
    # half a step, plus what rounding the min to fp16 moves
    assert ((back - x).abs() <= step / 2 + x.abs().amax(-1, keepdim=True) * 2**-10).all()
    spread = x.amax(-1) - x.amin(-1)
    assert torch.allclose(scale.float(), spread / INT4_LEVELS, rtol=2**-10)


@pytest.mark.parametrize("kv_dtype", ["fp8", "int4"])
def test_constant_and_zero_heads_give_no_nan(kv_dtype):
    x = torch.zeros(3, 2, 16)
    x[1] = 2.5
    codes, scale, low = quantize(x, kv_dtype)
    back = dequantize(codes, scale, low, kv_dtype)
    assert torch.isfinite(back).all() and torch.equal(back[0], x[0]) and torch.equal(back[2], x[2])
    assert torch.allclose(back[1], x[1], rtol=2**-4) and (kv_dtype == "fp8" or torch.equal(back[1], x[1]))
    zero_page = torch.zeros(32, dtype=torch.uint8)
    none = None if kv_dtype == "fp8" else torch.zeros(2, dtype=torch.float16)
    assert torch.equal(dequantize(zero_page.view(2, 16), torch.zeros(2, dtype=torch.float16), none, kv_dtype), torch.zeros(2, 16 if kv_dtype == "fp8" else 32))


@pytest.mark.parametrize("kv_dtype", ["fp8", "int4"])
def test_written_tokens_gather_as_their_quantized_values(kv_dtype):
    """Rows of different lengths across pages in shuffled order, written in two chunks (a prompt
    then one token per row); the gather equals dequantize(quantize(x)) token for token."""
    heads, dim = 2, 16
    layout = KvLayout.of(kv_dtype, heads, dim, 1024)
    assert layout.tokens & (layout.tokens - 1)  # not a power of two: tiles cross pages oddly
    pool = torch.full((40 * 1024 // 4,), float("nan"))  # 40 pages of 1 KiB, float32 storage
    gen = torch.Generator().manual_seed(2)
    table = torch.randperm(40, generator=gen)[:12].view(2, 6).int()
    prompt = 2 * layout.tokens + 3
    k = torch.randn(2, prompt + 1, heads, dim, generator=gen)
    v = torch.randn(2, prompt + 1, heads, dim, generator=gen)
    write_kv_quant_torch(pool, layout, table, 0, k[:, :prompt], v[:, :prompt])
    write_kv_quant_torch(pool, layout, table, torch.tensor([prompt, prompt]), k[:, prompt:], v[:, prompt:])
    got_k, got_v = gather_kv_quant_torch(pool, layout, table, prompt + 1)
    for got, x in ((got_k, k), (got_v, v)):
        assert torch.equal(got, dequantize(*quantize(x, kv_dtype), kv_dtype))


# ------------------------------------------------------------------ in generate()


class FakeQuantCache(DynamicCache):
    """The reference: a DynamicCache whose stored K/V are dequant(quant(K/V)) per token and head, and
    whose update hands back the current forward's own K/V exact (as the paged path attends them)."""

    def __init__(self, kv_dtype, **kwargs):
        super().__init__(**kwargs)
        self.kv_dtype = kv_dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        def fake(x):
            return dequantize(*quantize(x, self.kv_dtype), self.kv_dtype).to(x.dtype)

        keys, values = super().update(fake(key_states), fake(value_states), layer_idx, *args, **kwargs)
        new = key_states.shape[-2]
        return torch.cat([keys[..., :-new, :], key_states], -2), torch.cat([values[..., :-new, :], value_states], -2)


def left_padded(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, max(lengths) - n :] = torch.randint(3, 128, (n,), generator=gen)
        mask[row, max(lengths) - n :] = 1
    return ids, mask


@pytest.mark.parametrize("kv_dtype", ["fp8", "int4"])
@pytest.mark.parametrize("zoo_name", ["llama_zoo", "qwen2_zoo"])  # MHA; GQA
def test_generate_with_quantized_kv_equals_the_fake_quant_reference(zoo_name, kv_dtype, request):
    zoo = request.getfixturevalue(zoo_name)
    model = MultiLoraModel.from_pretrained(zoo.fresh_base(), adapters=zoo.paths)
    rows = ["attn_r8", None, "qv_r4", "mlp_r16"]
    ids, mask = left_padded([9, 4, 20, 13], seed=3)  # ragged, crossing pages of odd token counts
    kwargs = dict(adapter_ids=rows, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    scored = dict(output_scores=True, return_dict_in_generate=True)
    quantized = model.generate(ids, kv_cache_dtype=kv_dtype, **kwargs, **scored)
    reference = model.generate(ids, past_key_values=FakeQuantCache(kv_dtype), **kwargs, **scored)
    plain = model.generate(ids, **kwargs, **scored)
    assert quantized.sequences.tolist() == reference.sequences.tolist()
    for step, (got, expected, exact) in enumerate(zip(quantized.scores, reference.scores, plain.scores, strict=False)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        if step:  # the prefill attends exactly; from the first decode step on, quantized keys count
            assert not torch.allclose(got, exact, rtol=1e-6, atol=1e-6), f"step {step}: no quantization effect"
    assert model.memory_stats()["pages_kv"] == 0
    # beams reorder rows (pages shared, partial blocks copied on write); rows ending on EOS give back pages
    beams = dict(adapter_ids=rows, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    assert model.generate(ids, kv_cache_dtype=kv_dtype, **beams).tolist() == model.generate(
        ids, past_key_values=FakeQuantCache(kv_dtype), **beams
    ).tolist()
    ending = dict(kwargs, eos_token_id=int(plain.sequences[0, ids.shape[1] + 3]))
    assert model.generate(ids, kv_cache_dtype=kv_dtype, **ending).tolist() == model.generate(
        ids, past_key_values=FakeQuantCache(kv_dtype), **ending
    ).tolist()


def test_quantized_pages_hold_more_tokens_in_the_cache(llama_zoo):
    base = llama_zoo.fresh_base()
    pool = PagePool(64, 2048, torch.float32, "cpu")  # 8 KiB pages
    config = base.config
    used = {}
    for kv_dtype in (None, "fp8", "int4"):
        cache = PagedCache(pool, config, kv_dtype=kv_dtype)
        k = torch.randn(1, cache.kv_heads, 200, cache.head_dim)
        for layer in range(cache.num_layers):
            cache.update(k, k, layer)
            cache._pending = None
        used[kv_dtype] = (cache.block_size, pool.num_kv)
        cache.release()
    assert used[None] == (16, 2 * 13)  # 200 tokens in blocks of 16, two layers
    assert used["fp8"][0] >= 1.9 * 16 and used["int4"][0] >= 3.7 * 16
    assert used["int4"][1] < used["fp8"][1] < used[None][1]


def test_quantized_kv_is_refused_where_it_cannot_run(llama_zoo):
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    ids = torch.randint(3, 128, (2, 5))
    with pytest.raises(ValueError, match="kv_cache_dtype must be None or one of"):
        model.generate(ids, kv_cache_dtype="int8", max_new_tokens=2)
    with pytest.raises(ValueError, match="applies to the paged cache"):
        model.generate(ids, kv_cache_dtype="fp8", paged_cache=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="applies to the paged cache"):
        model.generate(ids, kv_cache_dtype="fp8", past_key_values=DynamicCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match="give kv_dtype or block_size"):
        PagedCache(PagePool(8, 2048, torch.float32, "cpu"), model.config, 16, kv_dtype="int4")


def test_the_demo_adapters_do_their_tasks_with_quantized_kv():
    from transformers import AutoTokenizer

    demo = read_demo()
    model = MultiLoraModel.from_pretrained(demo.base, demo.adapters)
    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    spec = json.loads((demo.root / "demo.json").read_text())["adapters"]
    jobs = [(name, ex["text"], ex["expected"]) for name, s in spec.items() for ex in s["examples"]]
    prompts = [demo.prompt_format.replace("{text}", text) for _, text, _ in jobs]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    correct = {}
    for kv_dtype in (None, "fp8", "int4"):
        out = model.generate(**batch, adapter_ids=[name for name, _, _ in jobs], max_new_tokens=24, do_sample=False,
                             kv_cache_dtype=kv_dtype, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        correct[kv_dtype] = sum(t == expected for t, (_, _, expected) in zip(texts, jobs, strict=True))
    assert correct[None] == len(jobs)
    assert correct["fp8"] == correct[None] and correct["int4"] == correct[None], correct
