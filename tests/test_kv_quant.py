"""Quantized KV pages (hf_multilora.kernels.kv_quant): layout, quantizer error bounds, and the
plain-PyTorch write / gather paths on random data."""

import json
import math

import pytest
import torch
from helpers import interpreter_only
from hf_multilora.app.demo import read_demo
from transformers import DynamicCache

from hf_multilora import MultiLoraModel, PagePool
from hf_multilora.cache import PagedCache
from hf_multilora.kernels.kv_quant import (
    FP8_MAX,
    INT4_LEVELS,
    KvLayout,
    dequantize,
    gather_kv_quant_torch,
    quantize,
    write_kv_quant_torch,
)

LLAMA_7B_PAGE = 256 * 1024  # 16 bf16 tokens of 32 KV heads x 128


@pytest.mark.parametrize(("kv_dtype", "tokens"), [("fp8", 31), ("int4", 60)])
def test_llama_pages_hold_more_tokens(kv_dtype, tokens):
    layout = KvLayout.of(kv_dtype, 32, 128, LLAMA_7B_PAGE)
    assert layout.tokens == tokens
    assert layout.tokens / 16 >= {"fp8": 1.9, "int4": 3.7}[kv_dtype]
    codes = 32 * tokens * layout.code_bytes
    assert (layout.k_codes, layout.v_codes) == (0, -(-codes // 16) * 16) and layout.k_scale >= layout.v_codes + codes
    assert layout.k_scale % 16 == 0  # codes and metadata regions start 16-byte aligned
    # a cell's metadata lies together: K scale first, then (INT4) K min, V scale, V min, 2 bytes each
    metas = [layout.k_scale, layout.k_min, layout.v_scale, layout.v_min] if kv_dtype == "int4" else [layout.k_scale, layout.v_scale]
    assert metas == [layout.k_scale + 2 * i for i in range(len(metas))] and layout.meta_bytes == 2 * len(metas)
    assert layout.k_scale + 32 * tokens * layout.meta_bytes <= LLAMA_7B_PAGE
    assert KvLayout._bytes(kv_dtype, 32, layout.code_bytes, tokens + 1) > LLAMA_7B_PAGE  # one more would not fit
    # what one token takes: its K and V codes and metadata, alignment aside
    assert layout.token_bytes == 32 * (2 * layout.code_bytes + layout.meta_bytes)
    assert layout.token_bytes * tokens <= LLAMA_7B_PAGE < layout.token_bytes * (tokens + 1) + 3 * 16
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


# ------------------------------------------------------------------ Triton kernels (interpreter on CPU: int4)


def kernel_dtypes():
    """FP8 on a GPU only: the interpreter's fp32 -> e4m3 rounding is not exact."""
    return ["int4", "fp8"] if torch.cuda.is_available() else ["int4"]


def kernel_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def random_writes(kv_dtype, rows, tokens, seed):
    """(layout of 2 KV heads x 16 dims in 1 KiB pages, a table [rows, 12 // rows] of shuffled pages
    among 40, random k, v [rows, tokens, 2, 16]) for the write tests."""
    layout = KvLayout.of(kv_dtype, 2, 16, 1024)
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(40, generator=gen)[:12].view(rows, -1).int()
    k = torch.randn(rows, tokens, 2, 16, generator=gen) * 3
    v = torch.randn(rows, tokens, 2, 16, generator=gen)
    return layout, table, k, v


@pytest.mark.parametrize("kv_dtype", kernel_dtypes())
def test_triton_write_stores_the_bytes_of_the_torch_write(kv_dtype):
    """Byte for byte, on random K/V (and a constant head) at ragged positions across shuffled pages."""
    from hf_multilora.kernels.paged_attention_quant import write_kv_quant

    device = kernel_device()
    layout, table, k, v = random_writes(kv_dtype, rows=2, tokens=9, seed=5)
    k[1, 4, 0] = 0.75  # all equal: scale 0
    start = torch.tensor([layout.tokens - 4, 2 * layout.tokens + 1])
    expected = torch.zeros(40 * 1024 // 4)
    write_kv_quant_torch(expected, layout, table, start, k, v)
    got = torch.zeros(40 * 1024 // 4, device=device)
    write_kv_quant(got, layout, table.to(device), start.to(device), k.to(device).transpose(1, 2).transpose(1, 2),
                   v.to(device))  # fmt: skip
    assert torch.equal(got.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("kv_dtype", kernel_dtypes())
def test_writes_store_no_token_at_a_negative_position(kv_dtype):
    """Empty rows left-padded in a forward (the engine's prefill): both writes store each row's own
    tokens from position 0, byte for byte as a write of that row alone, and nothing of the padding."""
    from hf_multilora.kernels.paged_attention_quant import write_kv_quant

    device = kernel_device()
    layout, table, k, v = random_writes(kv_dtype, rows=3, tokens=21, seed=6)
    pads = [0, 4, 20]
    expected = torch.zeros(40 * 1024 // 4)
    for b, pad in enumerate(pads):
        write_kv_quant_torch(expected, layout, table[b : b + 1], 0, k[b : b + 1, pad:], v[b : b + 1, pad:])
    start = -torch.tensor(pads)
    got_torch = torch.zeros_like(expected)
    write_kv_quant_torch(got_torch, layout, table, start, k, v)
    got = torch.zeros_like(expected, device=device)
    write_kv_quant(got, layout, table.to(device), start.to(device), k.to(device), v.to(device))
    assert torch.equal(got_torch.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(got.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("kv_dtype", kernel_dtypes())
def test_attention_of_left_padded_empty_rows_sees_only_their_tokens(kv_dtype):
    """kv_lens < q_len: a row's first q_len - kv_lens tokens are padding. Its real queries attend as
    the row alone does, and its padding queries see nothing (zeros)."""
    from hf_multilora.kernels.paged_attention_quant import paged_attention_quant

    kv_heads, heads, dim, device, q_len = 2, 4, 16, kernel_device(), 11
    layout = KvLayout.of(kv_dtype, kv_heads, dim, 1024)
    gen = torch.Generator().manual_seed(8)
    table = torch.randperm(40, generator=gen)[:8].view(2, 4).int().to(device)
    q, k, v = (torch.randn(2, q_len, n, dim, generator=gen).to(device) for n in (heads, kv_heads, kv_heads))
    pool = torch.zeros(40 * 1024 // 4, device=device)
    lens = [q_len, 6]
    got = paged_attention_quant(q, k, v, pool, layout, table, torch.tensor(lens, dtype=torch.int32, device=device), 0.25)
    for b, n in enumerate(lens):
        alone = paged_attention_quant(q[b : b + 1, -n:], k[b : b + 1, -n:], v[b : b + 1, -n:], pool, layout,
                                      table[b : b + 1], torch.tensor([n], dtype=torch.int32, device=device), 0.25)  # fmt: skip
        torch.testing.assert_close(got[b, -n:], alone[0], rtol=1e-5, atol=1e-5)
        assert (got[b, : q_len - n] == 0).all()


def test_torch_attention_of_left_padded_empty_rows_reads_the_key_mask_by_position():
    """PagedCache's torch path for a left-padded forward of empty rows (the engine's prefill on a CPU)
    reads a key mask at each key's position, as the Triton kernel does: both give the same output."""
    from types import SimpleNamespace

    from hf_multilora.kernels.paged_attention_quant import paged_attention_quant

    kv_heads, heads, dim, q_len = 2, 4, 16, 9
    layout = KvLayout.of("int4", kv_heads, dim, 1024)
    gen = torch.Generator().manual_seed(9)
    table = torch.randperm(40, generator=gen)[:8].view(2, 4).int()
    q, k, v = (torch.randn(2, q_len, n, dim, generator=gen) for n in (heads, kv_heads, kv_heads))
    pool = torch.zeros(40 * 1024 // 4)
    kv_lens = torch.tensor([q_len, 5], dtype=torch.int32)
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[0, 2], key_mask[1, 1] = False, False  # a position each row's later queries would see
    cache = SimpleNamespace(_kv_lens=kv_lens, pool=SimpleNamespace(storage=pool), kv_layout=layout)
    got = PagedCache._attend_quantized(cache, 0, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), table,
                                       key_mask, 0.25, None)  # fmt: skip
    device = kernel_device()  # the Triton kernel: on the GPU where there is one, else the interpreter
    expected = paged_attention_quant(*(t.to(device) for t in (q, k, v, pool)), layout, table.to(device),
                                     kv_lens.to(device), 0.25, key_mask=key_mask.to(device)).cpu()  # fmt: skip
    for b, n in enumerate(kv_lens.tolist()):  # the real queries (padding queries' outputs are unused)
        torch.testing.assert_close(got[b, -n:], expected[b, -n:], rtol=1e-5, atol=1e-5)


def reference_quant_attention(q, k_new, v_new, pool, layout, table, kv_lens, scale, key_mask, window):
    """Dequantize the pages (gather_kv_quant_torch), append this forward's K/V exact, attend densely."""
    from hf_multilora.cache import _dense_attention

    past = int(kv_lens[0]) - q.shape[1]
    past_k, past_v = gather_kv_quant_torch(pool.cpu(), layout, table.cpu(), past)
    keys = torch.cat([past_k.to(q.dtype), k_new.cpu()], 1).transpose(1, 2)
    values = torch.cat([past_v.to(q.dtype), v_new.cpu()], 1).transpose(1, 2)
    mask = None if key_mask is None else key_mask.cpu()[:, : past + q.shape[1]]
    return _dense_attention(q.cpu().transpose(1, 2), keys, values, mask, scale, window)  # [b, q, h, d]


@pytest.mark.parametrize("kv_dtype", kernel_dtypes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len, heads, window, masked, splits", [(1, 4, None, False, 1), (1, 8, 11, True, 4),
                                                                  (5, 4, None, True, 2), (3, 2, 7, False, 1),
                                                                  (1, 4, None, True, 8), (1, 2, None, False, 1),
                                                                  (1, 2, 11, True, 4)])  # fmt: skip
def test_triton_attention_over_quantized_pages_matches_the_reference(
    kv_dtype, dtype, q_len, heads, window, masked, splits
):
    """MHA (2 KV heads x 1 query head; INT4 decode without a key mask takes the one-row path there)
    and GQA (x2, x4), decode and prefill chunks, key mask and window, the pages shared by 1-8 split
    programs, pages written by the Triton write: the kernel equals dequantize-then-attend within fp32 rounding, and
    within bf16 rounding for bf16 queries (on a GPU those unpack the codes by bits, with the offsets
    and scales taken back out of the sums)."""
    from hf_multilora.kernels.paged_attention_quant import paged_attention_quant, write_kv_quant

    kv_heads, dim, device = 2, 16, kernel_device()
    layout = KvLayout.of(kv_dtype, kv_heads, dim, 1024)
    gen = torch.Generator().manual_seed(7 + q_len + heads)
    past = 2 * layout.tokens + 5
    table = torch.randperm(40, generator=gen)[:12].view(2, 6).int().to(device)
    pool = torch.zeros(40 * 1024 // 4, device=device)
    k_all = torch.randn(2, past + q_len, kv_heads, dim, generator=gen).to(device, dtype)
    v_all = torch.randn(2, past + q_len, kv_heads, dim, generator=gen).to(device, dtype)
    write_kv_quant(pool, layout, table, 0, k_all, v_all)  # this forward's too, as PagedCache stores them
    q = torch.randn(2, q_len, heads, dim, generator=gen).to(device, dtype)
    kv_lens = torch.full((2,), past + q_len, dtype=torch.int32, device=device)
    key_mask = None
    if masked:
        key_mask = torch.rand(2, past + q_len + 3, generator=gen).to(device) > 0.3
        key_mask[:, -q_len - 3 :] = True
    k_new, v_new = k_all[:, past:], v_all[:, past:]
    got = paged_attention_quant(q, k_new, v_new, pool, layout, table, kv_lens, 0.25, key_mask, window, splits)
    assert got.dtype == dtype
    expected = reference_quant_attention(q.float(), k_new.float(), v_new.float(), pool, layout, table, kv_lens, 0.25,
                                         key_mask, window)  # fmt: skip
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().float(), expected, rtol=tolerance, atol=tolerance)
    assert got.abs().amax() > 0.1


@pytest.mark.parametrize("q_magnitude, v_magnitude", [(3e5, 1e-6), (1e-6, 1e4), (1.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [4, 2])
def test_fp8_attention_reads_queries_and_values_outside_fp16s_range(q_magnitude, v_magnitude, dtype, heads):
    """FP8 pages meet fp16 dot operands: bf16 queries beyond fp16's largest value or below its
    normals, and values whose scales underflow fp16 once multiplied by p, still attend within 16-bit
    rounding of the dequantizing reference (pages written by the exact torch write, so this runs in
    the interpreter too)."""
    from hf_multilora.kernels.paged_attention_quant import paged_attention_quant

    if dtype == torch.float16 and q_magnitude > 6e4:
        pytest.skip("an fp16 query cannot hold it")
    kv_heads, dim, device = 2, 16, kernel_device()
    layout = KvLayout.of("fp8", kv_heads, dim, 1024)
    gen = torch.Generator().manual_seed(11)
    past = 2 * layout.tokens + 5
    table = torch.randperm(40, generator=gen)[:12].view(2, 6).int()
    pool = torch.zeros(40 * 1024 // 4)
    k_all = torch.randn(2, past + 1, kv_heads, dim, generator=gen).to(dtype)
    v_all = (torch.randn(2, past + 1, kv_heads, dim, generator=gen) * v_magnitude).to(dtype)
    write_kv_quant_torch(pool, layout, table, 0, k_all, v_all)
    q = (torch.randn(2, 1, heads, dim, generator=gen) * q_magnitude).to(dtype)
    kv_lens = torch.full((2,), past + 1, dtype=torch.int32)
    scale = 0.5 / q_magnitude  # scores of order one whatever the query's magnitude
    k_new, v_new = k_all[:, past:], v_all[:, past:]
    got = paged_attention_quant(q.to(device), k_new.to(device), v_new.to(device), pool.to(device), layout,
                                table.to(device), kv_lens.to(device), scale, num_splits=2)  # fmt: skip
    expected = reference_quant_attention(q.float(), k_new.float(), v_new.float(), pool, layout, table, kv_lens, scale,
                                         None, None)  # fmt: skip
    torch.testing.assert_close(got.cpu().float() / v_magnitude, expected / v_magnitude, rtol=2e-2, atol=2e-2)
    # not all zeros (an average of ~70 random values; the MHA case's largest is 0.089)
    assert (expected / v_magnitude).abs().amax() > (0.1 if heads == 4 else 0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PTX bit moves and FP8 conversions run on a GPU")
def test_codes_unpacked_read_as_their_values():
    """Every byte: INT4 nibbles by bits as 128 + level in bf16, e4m3 codes as their value in fp16
    (subnormals and signed zeros included; NaN codes excepted), exactly."""
    import triton
    import triton.language as tl

    from hf_multilora.kernels.paged_attention_quant import _fp8_values, _int4_levels

    @triton.jit
    def unpack(codes_ptr, lo_ptr, hi_ptr, fp8_ptr):
        offs = tl.arange(0, 256)
        codes = tl.load(codes_ptr + offs)
        lo, hi = _int4_levels(codes, tl.bfloat16, True)
        tl.store(lo_ptr + offs, lo)
        tl.store(hi_ptr + offs, hi)
        tl.store(fp8_ptr + offs, _fp8_values(codes, tl.float16))

    codes = torch.arange(256, dtype=torch.uint8, device="cuda")
    lo, hi = (torch.empty(256, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    fp8 = torch.empty(256, dtype=torch.float16, device="cuda")
    unpack[(1,)](codes, lo, hi, fp8)
    ints = codes.long().cpu()
    assert torch.equal(lo.float().cpu(), (128 + (ints & 15)).float())
    assert torch.equal(hi.float().cpu(), (128 + (ints >> 4)).float())
    values = codes.cpu().view(torch.float8_e4m3fn).float()
    finite = ~values.isnan()
    got = fp8.float().cpu()
    assert torch.equal(got[finite], values[finite])
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(values[finite]))


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


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kv_dtype", ["fp8", "int4"])
@pytest.mark.parametrize("zoo_name", ["llama_zoo", "qwen2_zoo"])  # MHA; GQA
@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_generate_with_quantized_kv_equals_the_fake_quant_reference(zoo_name, kv_dtype, where, request):
    """The torch path (CPU) and the Triton kernels (GPU), against a DynamicCache storing
    dequant(quant(K/V))."""
    zoo = request.getfixturevalue(zoo_name)
    base = zoo.fresh_base().to("cuda" if where == "cuda" else "cpu")
    model = MultiLoraModel.from_pretrained(base, adapters=zoo.paths)
    rows = ["attn_r8", None, "qv_r4", "mlp_r16"]
    ids, mask = left_padded([9, 4, 20, 13], seed=3)  # ragged, crossing pages of odd token counts
    ids, mask = ids.to(base.device), mask.to(base.device)
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


@interpreter_only("on CUDA the generate tests above use the kernels")
def test_generate_with_int4_kv_on_the_triton_kernels_equals_the_torch_path(qwen2_zoo, monkeypatch):
    """The Triton write and attention inside generate() (interpreter; GQA, ragged left padding,
    adapters) give the torch path's tokens and scores."""
    model = MultiLoraModel.from_pretrained(qwen2_zoo.fresh_base(), adapters=qwen2_zoo.paths)
    ids, mask = left_padded([9, 4, 20], seed=4)
    kwargs = dict(adapter_ids=["attn_r8", None, "qv_r4"], attention_mask=mask, max_new_tokens=6, do_sample=False,
                  pad_token_id=0, kv_cache_dtype="int4", output_scores=True, return_dict_in_generate=True)  # fmt: skip
    torch_path = model.generate(ids, **kwargs)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    triton_path = model.generate(ids, **kwargs)
    assert triton_path.sequences.tolist() == torch_path.sequences.tolist()
    for got, expected in zip(triton_path.scores, torch_path.scores, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert model.memory_stats()["pages_kv"] == 0


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


@pytest.mark.parametrize("kv_dtype", kernel_dtypes())
@pytest.mark.parametrize("splits, heads, masked", [(1, 4, True), (4, 4, True), (4, 2, True), (4, 2, False)])
def test_triton_attention_over_quantized_pages_stores_each_keys_logit(kv_dtype, splits, heads, masked):
    """For heavy-hitter eviction: a decode's score of every key (dequantized past, exact own token), in
    the log2 domain, -inf where masked, nothing past the row's length; GQA and MHA (INT4: the one-row
    path), with and without a key mask."""
    from hf_multilora.kernels.paged_attention_quant import paged_attention_quant, write_kv_quant

    kv_heads, dim, device = 2, 16, kernel_device()
    layout = KvLayout.of(kv_dtype, kv_heads, dim, 1024)
    gen = torch.Generator().manual_seed(11)
    past = 2 * layout.tokens + 3
    table = torch.randperm(40, generator=gen)[:12].view(2, 6).int().to(device)
    pool = torch.zeros(40 * 1024 // 4, device=device)
    k_all = torch.randn(2, past + 1, kv_heads, dim, generator=gen).to(device)
    v_all = torch.randn(2, past + 1, kv_heads, dim, generator=gen).to(device)
    write_kv_quant(pool, layout, table, 0, k_all, v_all)
    q = torch.randn(2, 1, heads, dim, generator=gen).to(device)
    kv_lens = torch.full((2,), past + 1, dtype=torch.int32, device=device)
    key_mask = None
    if masked:
        key_mask = torch.rand(2, past + 1, generator=gen).to(device) > 0.3
        key_mask[:, -1] = True
    logits = torch.full((2, heads, past + 4), 7.0, device=device)
    paged_attention_quant(q, k_all[:, past:], v_all[:, past:], pool, layout, table, kv_lens, 0.25, key_mask,
                          num_splits=splits, logits=logits)  # fmt: skip
    past_k, _ = gather_kv_quant_torch(pool.cpu(), layout, table.cpu(), past)
    keys = torch.cat([past_k, k_all[:, past:].cpu()], 1).repeat_interleave(heads // kv_heads, 2)  # [b, n, h, d]
    expected = torch.einsum("bhd,bnhd->bhn", q[:, 0].cpu(), keys) * 0.25 * math.log2(math.e)
    if masked:
        expected = expected.masked_fill(~key_mask.cpu()[:, None, :], float("-inf"))
    got = logits.cpu()
    assert (got[..., past + 1 :] == 7.0).all()
    got = got[..., : past + 1]
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-4)
