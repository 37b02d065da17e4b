"""Triton kernels for quantized KV pages (layout: kernels/kv_quant.py): the write that quantizes,
and the attention that reads the pages.

Why: `write_kv_quant_torch` / `gather_kv_quant_torch` build byte indices on the host and dequantize
the whole history into a dense tensor every forward (what transformers' QuantizedCache does too),
so they cost more than the bf16 cache they save memory for. Here the write is one launch that
quantizes each (token, head) in registers, and the attention dequantizes a key tile at a time
inside the online softmax; nothing of the history is materialised. A decode token goes through the
write launch too: storing it from the attention launch saves a launch but takes registers that the
attention needs (`_quant_tiles`).

Semantics (those of PagedCache's quantized path): a forward brings row b to `kv_lens[b]` tokens,
`q_len` of them its own; the `kv_lens[b] - q_len` before it are read from the pages, dequantized
and cast to the query's dtype; the forward's own K/V are attended exactly, from the tensors the
layer just computed (it also stores them quantized, for later forwards). Where kv_lens[b] < q_len
(a row that was empty, left-padded in the forward), the first q_len - kv_lens[b] tokens are padding
at negative positions: not stored, not attended. Causal, with an optional bool key mask [batch,
>= kv_len] and sliding window, GQA by head groups.

Quantization matches `kv_quant.quantize` bit for bit: scale and min rounded to fp16 first, codes from
the rounded values, IEEE divisions (`div_rn`), round-half-to-even levels. FP8 needs a GPU with FP8
conversion (sm_89+); the interpreter's FP8 rounding is not exact, so FP8 is tested on the GPU only.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .kv_quant import KvLayout
from .paged_attention import (
    _TARGET_PROGRAMS,
    LOG2_E,
    MAX_SPLITS,
    _combine_splits_kernel,
    _dot,
    _next_power_of_2,
    _positions,
    _tiles,
    check_logits,
    decode_tile,
    num_splits_for,
)
from .sgmv import _dot_in_fp32


def _layout_args(layout: KvLayout) -> dict:
    """The page layout as the kernels' compile-time arguments (FP8 has no min regions: 0, unused)."""
    return dict(
        TOKENS=layout.tokens, CODE_BYTES=layout.code_bytes, K_CODES=layout.k_codes, V_CODES=layout.v_codes,
        K_SCALE=layout.k_scale, V_SCALE=layout.v_scale, K_MIN=max(layout.k_min, 0), V_MIN=max(layout.v_min, 0),
        META_BYTES=layout.meta_bytes, INT4=layout.kv_dtype == "int4",
    )  # fmt: skip


@triton.jit
def _store_quantized(
    base,  # uint8 pointers [BLOCK_T]: each token's page
    src,  # pointers [BLOCK_T]: each token's [head_dim] of this head (stride s_d)
    s_d,
    cell,  # [BLOCK_T] head * TOKENS + slot
    t_ok,  # [BLOCK_T] the tokens to store
    CODES_AT: tl.constexpr,
    SCALE_AT: tl.constexpr,
    MIN_AT: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    META_BYTES: tl.constexpr,
    INT4: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= CODE_BYTES
):
    """Quantize a tile of tokens of one head into their pages' cells (a row per token)."""
    offs = tl.arange(0, BLOCK_C)
    ok = t_ok[:, None] & (offs < CODE_BYTES)[None, :]
    codes = base[:, None] + CODES_AT + (cell * CODE_BYTES)[:, None] + offs[None, :]
    scale_ptr = (base + SCALE_AT + cell * META_BYTES).to(tl.pointer_type(tl.float16))
    if INT4:  # byte d: dims d (low nibble) and d + CODE_BYTES
        lo = tl.load(src[:, None] + offs[None, :] * s_d, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(src[:, None] + (offs[None, :] + CODE_BYTES) * s_d, mask=ok, other=0.0).to(tl.float32)
        low = tl.minimum(tl.min(tl.where(ok, lo, float("inf")), axis=1), tl.min(tl.where(ok, hi, float("inf")), axis=1))
        low16 = low.to(tl.float16)
        high = tl.maximum(tl.max(tl.where(ok, lo, float("-inf")), axis=1), tl.max(tl.where(ok, hi, float("-inf")), axis=1))
        low = low16.to(tl.float32)
        scale16 = tl.math.div_rn(high - low, 15.0).to(tl.float16)
        scale = scale16.to(tl.float32)
        divisor = tl.where(scale > 0, scale, 1.0)[:, None]
        level_lo = tl.math.div_rn(lo - low[:, None], divisor)
        level_hi = tl.math.div_rn(hi - low[:, None], divisor)
        # (y + 1.5 * 2**23) - 1.5 * 2**23 rounds y half-to-even (|y| < 2**22), as torch.round does
        level_lo = tl.minimum(tl.maximum((level_lo + 12582912.0) - 12582912.0, 0.0), 15.0).to(tl.uint8)
        level_hi = tl.minimum(tl.maximum((level_hi + 12582912.0) - 12582912.0, 0.0), 15.0).to(tl.uint8)
        tl.store(codes, level_lo | (level_hi << 4), mask=ok)
        tl.store((base + MIN_AT + cell * META_BYTES).to(tl.pointer_type(tl.float16)), low16, mask=t_ok)
    else:
        x = tl.load(src[:, None] + offs[None, :] * s_d, mask=ok, other=0.0).to(tl.float32)
        scale16 = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 448.0).to(tl.float16)
        scale = scale16.to(tl.float32)
        divisor = tl.where(scale > 0, scale, 1.0)[:, None]
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, divisor), -448.0), 448.0)
        tl.store(codes, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=ok)
    tl.store(scale_ptr, scale16, mask=t_ok)


@triton.jit(  # shape-dependent scalars and table pointers: see kernels/launch.py
    do_not_specialize=["tokens", "new_len", "table_stride"],
    do_not_specialize_on_alignment=["table_ptr", "pos_ptr"],
)
def _write_kv_quant_kernel(
    data_ptr,  # uint8 [pool bytes]
    k_ptr,  # [batch, new, kv_heads, head_dim], any strides
    v_ptr,
    table_ptr,  # int32 [batch, max_blocks]
    pos_ptr,  # int64 [batch, new]: each token's position
    tokens,  # batch * new
    new_len,
    page_bytes,
    table_stride,
    k_sb, k_st, k_sh, k_sd,
    v_sb, v_st, v_sh, v_sd,
    TOKENS: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    K_CODES: tl.constexpr,
    V_CODES: tl.constexpr,
    K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr,
    K_MIN: tl.constexpr,
    V_MIN: tl.constexpr,
    META_BYTES: tl.constexpr,
    INT4: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
):  # fmt: skip
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # b * new_len + t
    head = tl.program_id(1)
    b = (token // new_len).to(tl.int64)
    t = (token % new_len).to(tl.int64)
    pos = tl.load(pos_ptr + token, mask=token < tokens, other=-1)
    t_ok = pos >= 0  # a negative position: left padding, not stored
    page = tl.load(table_ptr + b * table_stride + pos // TOKENS, mask=t_ok, other=0).to(tl.int64)
    base = data_ptr + page * page_bytes
    cell = head * TOKENS + pos % TOKENS
    _store_quantized(base, k_ptr + b * k_sb + t * k_st + head * k_sh, k_sd, cell, t_ok, K_CODES, K_SCALE, K_MIN,
                     CODE_BYTES, META_BYTES, INT4, BLOCK_C)  # fmt: skip
    _store_quantized(base, v_ptr + b * v_sb + t * v_st + head * v_sh, v_sd, cell, t_ok, V_CODES, V_SCALE, V_MIN,
                     CODE_BYTES, META_BYTES, INT4, BLOCK_C)  # fmt: skip


# Tokens per program of the write: one token of one head (64 or 128 bytes of codes) per program
# left each program's fixed cost dominant (2.7 ms for 16 x 2048 tokens of a 7B layer on an H200).
_WRITE_TOKENS = 16


def write_kv_quant(
    storage: torch.Tensor,
    layout: KvLayout,
    block_table: torch.Tensor,
    start: torch.Tensor | int,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """`write_kv_quant_torch` in one launch: quantize k, v [batch, new, kv_heads, head_dim] and store
    token i of row b at position start (or start[b]) + i."""
    batch, new, heads, head_dim = k.shape
    if v.shape != k.shape or (heads, head_dim) != (layout.kv_heads, layout.head_dim):
        raise ValueError(f"k/v {tuple(k.shape)} / {tuple(v.shape)} do not match the layout's heads x dims")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be int32 [batch, blocks], got {block_table.dtype} {tuple(block_table.shape)}")
    pos = _positions(start, batch, new, k.device).to(torch.int64).contiguous()
    _write_kv_quant_kernel[(triton.cdiv(batch * new, _WRITE_TOKENS), heads)](
        data_ptr=storage.view(torch.uint8), k_ptr=k, v_ptr=v, table_ptr=block_table, pos_ptr=pos,
        tokens=batch * new, new_len=new, page_bytes=layout.page_bytes, table_stride=block_table.stride(0),
        k_sb=k.stride(0), k_st=k.stride(1), k_sh=k.stride(2), k_sd=k.stride(3),
        v_sb=v.stride(0), v_st=v.stride(1), v_sh=v.stride(2), v_sd=v.stride(3),
        **_layout_args(layout), BLOCK_C=_next_power_of_2(layout.code_bytes), BLOCK_T=_WRITE_TOKENS,
    )  # fmt: skip


@triton.jit
def _code_tile(
    base,  # uint8 pointers [BLOCK_N]: each key's page
    cell,  # [BLOCK_N] head * TOKENS + slot
    offs_h,  # [BLOCK_H]: code bytes of one (token, head), contiguous
    k_ok,  # [BLOCK_N]: keys to read
    h_ok,  # [BLOCK_H]: bytes of the token
    CODES_AT: tl.constexpr,
    CODE_BYTES: tl.constexpr,
):
    """The code bytes [BLOCK_N, BLOCK_H] of each key, every byte loaded once (an INT4 byte holds dims
    d and d + head_dim / 2: the caller splits its nibbles)."""
    return tl.load(base[:, None] + CODES_AT + (cell * CODE_BYTES)[:, None] + offs_h[None, :],
                   mask=k_ok[:, None] & h_ok[None, :], other=0)  # fmt: skip


@triton.jit
def _meta_word(base, cell, k_ok, AT: tl.constexpr, META_BYTES: tl.constexpr):
    """All fp16 metadata of each key [BLOCK_N], as one int64 (INT4) or int32 (FP8): a load of >= 4
    bytes, which Triton's pipeliner prefetches with the codes (2-byte gathers it leaves in the loop)."""
    word = tl.int64 if META_BYTES == 8 else tl.int32
    return tl.load((base + AT + cell * META_BYTES).to(tl.pointer_type(word)), mask=k_ok, other=0)


@triton.jit
def _meta(word, AT: tl.constexpr, FIRST: tl.constexpr):
    """The fp16 at byte AT of each key's metadata word (whose first fp16 is at byte FIRST), in fp32."""
    bits = (word >> (8 * (AT - FIRST))) & 0xFFFF
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


# INT4 codes become dot operands by moving bits instead of converting (bf16 on a GPU; `_by_bits`):
# two conversions per element (integer -> fp32 -> bf16) were what bound the kernel, not its bytes.
# The unpacked values are offset, and the kernel takes that back out of its sums.
INT4_OFFSET = tl.constexpr(128.0)  # bf16 bits 0x4300 | level read as 128 + level
# FP8 codes meet fp16 operands (`_fp8_values`); q and p * scale go in multiplied by powers of two
# (exact) that bring their largest value into [2**14, 2**15), inside fp16's range and well above its
# subnormals, and the sums are divided back.
_FP16_TOP = tl.constexpr(2.0**14)


@triton.jit
def _fp16_prescale(largest):
    """2**14 / 2**floor(log2(largest)) (1 where largest is 0 or subnormal): a power of two that
    takes values up to `largest` into fp16's range with their relative precision kept."""
    power = (largest.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return _FP16_TOP / tl.where(power > 0, power, _FP16_TOP)


@triton.jit
def _int4_levels(codes, dtype: tl.constexpr, BY_BITS: tl.constexpr):
    """The low and high nibbles of INT4 code bytes, each as INT4_OFFSET + level in `dtype`. By bits:
    prmt spreads two bytes into the halves of a register, lop3 masks a nibble into each and ORs in
    bf16's 128, two values per instruction."""
    if BY_BITS:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, z, m, o;
            mov.b32 z, 0;
            mov.b32 m, 0x000F000F;
            mov.b32 o, 0x43004300;
            prmt.b32 t0, $4, z, 0x4140;
            prmt.b32 t1, $4, z, 0x4342;
            lop3.b32 $0, t0, m, o, 0xea;
            lop3.b32 $1, t1, m, o, 0xea;
            shr.u32 t0, t0, 4;
            shr.u32 t1, t1, 4;
            lop3.b32 $2, t0, m, o, 0xea;
            lop3.b32 $3, t1, m, o, 0xea;
            }""",
            constraints="=r,=r,=r,=r,r", args=[codes], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
        )  # fmt: skip
    else:
        low, high = (codes & 15).to(tl.float32), (codes >> 4).to(tl.float32)
        return (low + INT4_OFFSET).to(dtype), (high + INT4_OFFSET).to(dtype)


@triton.jit
def _fp8_values(codes, dtype: tl.constexpr):
    """E4M3 code bytes as `dtype` values. fp16 on a GPU is one cvt.rn.f16x2.e4m3x2 per two codes;
    e4m3 -> bf16 would add a conversion per element (it goes through fp16), and that bound the kernel."""
    return codes.to(tl.float8e4nv, bitcast=True).to(dtype)


@triton.jit
def _softmax_step(m_i, l_i, s):
    """One tile of the online softmax over scores s (-inf where unseen): (new max, new sum, the old
    accumulators' factor, p)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), alpha, p


@triton.jit
def _scores(q, keys, DOT_IN_FP32: tl.constexpr, ONE_ROW: tl.constexpr):
    """q [BLOCK_M, dims] . keys [BLOCK_N, dims] -> [BLOCK_M, BLOCK_N]; ONE_ROW, where every row of q
    is the one query: [1, BLOCK_N], from a dot with the keys as rows (whose columns are equal)."""
    if ONE_ROW:
        return tl.max(_dot(keys, tl.trans(q), DOT_IN_FP32), axis=1)[None, :]
    else:
        return _dot(q, tl.trans(keys), DOT_IN_FP32)


@triton.jit(  # shape-dependent scalars and table pointers: see kernels/launch.py
    do_not_specialize=["batch", "q_len", "table_stride", "km_sb"],
    do_not_specialize_on_alignment=["table_ptr"],
)
def _quant_attention_kernel(
    q_ptr,  # [batch, q_len, heads, head_dim], any strides
    k_new_ptr,  # [batch, q_len, kv_heads, head_dim]: this forward's keys, attended exactly
    v_new_ptr,
    data_ptr,  # uint8 [pool bytes]
    table_ptr,  # int32 [batch, max_blocks]
    kv_lens_ptr,  # int32 [batch]: tokens after this forward
    key_mask_ptr,  # bool [batch, >= kv_len] (unused without HAS_KEY_MASK)
    out_ptr,  # [batch, q_len, heads, head_dim]
    part_acc_ptr,  # fp32 [splits, batch, q_len, heads, head_dim] (SPLIT)
    part_ml_ptr,  # fp32 [2, splits, batch, q_len, heads]: running max, then sum
    logits_ptr,  # fp32 [batch, heads, >= kv_len] (STORE_LOGITS): each key's score, for heavy-hitter eviction
    batch,
    q_len,
    page_bytes,
    window,
    qk_scale,  # softmax scale * log2(e)
    q_sb, q_st, q_sh, q_sd,
    kn_sb, kn_st, kn_sh, kn_sd,
    vn_sb, vn_st, vn_sh, vn_sd,
    o_sb, o_st, o_sh, o_sd,
    table_stride,
    km_sb, km_st,
    lg_sb, lg_sh,
    TOKENS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CODE_BYTES: tl.constexpr,  # the dims of a half: INT4 head_dim / 2 (dims d and d + CODE_BYTES share byte d); FP8 head_dim
    K_CODES: tl.constexpr,
    V_CODES: tl.constexpr,
    K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr,
    K_MIN: tl.constexpr,
    V_MIN: tl.constexpr,
    META_BYTES: tl.constexpr,
    INT4: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SPLIT: tl.constexpr,  # the pages are split over grid dim 2 (partials for the combine kernel)
    BLOCK_M: tl.constexpr,  # query rows: BLOCK_M // GROUP_PAD positions x GROUP_PAD heads
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,  # >= CODE_BYTES
    STORE_LOGITS: tl.constexpr,  # decode only (q_len 1)
    BY_BITS: tl.constexpr,  # INT4: unpack codes by moving bits (bf16 on a GPU), not by conversions
    FP16_DOTS: tl.constexpr,  # FP8 with 16-bit queries: the dots take fp16 operands (prescaled)
    NEW_N: tl.constexpr,  # keys per tile of this forward's own tokens
    ONE_QUERY: tl.constexpr,  # q_len == 1 (decode), compiled in as the constant
    ONE_ROW: tl.constexpr,  # decode without GQA (one query row): scores as one row; `_quant_tiles` picks it
):  # fmt: skip
    """The codes go into the dot products as they are (INT4 levels and e4m3 values are exact in
    fp16/bf16) and the affine terms come out: a key's score is scale * (q . levels) + min * sum(q),
    and p @ V is (p * scale) @ levels + p @ min. INT4 keeps the two halves of the head's dims apart
    (the low and high nibbles of the same bytes) in two accumulators, A (dims < CODE_BYTES) and B.
    INT4 levels arrive as INT4_OFFSET + level: the offset's share, offset * scale * sum(q) and
    offset * sum(p * scale), is taken out with the min terms. FP8 with 16-bit queries meets fp16
    operands: q and p * scale go in multiplied by powers of two (`_fp16_prescale`; per query row,
    per tile), taken back out of the sums. ONE_ROW (decode, one query head per KV head): a 16-row
    tile would hold one query and 15 rows of padding, and every score op (scale, mask, exp2, row
    sums) ran on all 16. There the query fills every row, the scores come out of a dot with the keys
    as its rows ([BLOCK_N, 16], equal columns) and are read as one row (`tl.max` over equal values:
    exact); the softmax runs on that row, and p is broadcast back to 16 rows for p @ V. It is exact for
    both dtypes (the GPU tests passed with FP8 on it too); launches take it where it was faster."""
    if ONE_QUERY:  # q_len is not specialized (kernels/launch.py); decode still gets its constant (-6%)
        q_len = 1
    b = tl.program_id(0) // KV_HEADS
    kv_head = tl.program_id(0) % KV_HEADS
    b64 = b.to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    past = kv_len - q_len  # tokens in the pages before this forward
    offs_m = tl.arange(0, BLOCK_M)
    q_first = tl.program_id(1) * (BLOCK_M // GROUP_PAD)
    q_idx = q_first + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    row_ok = (q_idx < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    q_pos = past + q_idx
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < CODE_BYTES
    # the score rows: the tile's rows, or under ONE_ROW the one query's (query 0, head kv_head)
    r_idx, r_head, r_ok, r_pos = q_idx, head, row_ok, q_pos
    if ONE_ROW:
        r_idx = tl.arange(0, 1)
        r_head, r_ok, r_pos = kv_head + r_idx, r_idx < q_len, past + r_idx
    q_rows = q_ptr + b64 * q_sb + q_idx.to(tl.int64)[:, None] * q_st + head[:, None] * q_sh
    q_ok = row_ok[:, None] & h_ok[None, :]
    if ONE_ROW:  # the query in every row
        q_rows = q_ptr + b64 * q_sb + kv_head * q_sh + 0 * offs_m[:, None]
        q_ok = (offs_m >= 0)[:, None] & h_ok[None, :]
    q_a = tl.load(q_rows + offs_h[None, :] * q_sd, mask=q_ok, other=0.0)
    q_b = tl.zeros_like(q_a)  # INT4 only: dims CODE_BYTES.. of the head
    if INT4:
        q_b = tl.load(q_rows + (CODE_BYTES + offs_h[None, :]) * q_sd, mask=q_ok, other=0.0)
    q_sum = tl.sum(q_a.to(tl.float32), axis=1) + tl.sum(q_b.to(tl.float32), axis=1)  # INT4's min term
    q_keys = q_a  # FP8: what meets the key codes
    q_down = tl.full((BLOCK_M,), 1.0, tl.float32)  # FP8: what each row's scores are multiplied by
    if FP16_DOTS:
        q_up = _fp16_prescale(tl.max(tl.abs(q_a.to(tl.float32)), axis=1))
        q_keys = (q_a.to(tl.float32) * q_up[:, None]).to(tl.float16)
        q_down = 1.0 / q_up
    if ONE_ROW:  # the rows are equal: any is the score row's
        q_sum, q_down = tl.max(q_sum, axis=0, keep_dims=True), tl.max(q_down, axis=0, keep_dims=True)
    m_i = tl.full(r_idx.shape, -1.0e30, dtype=tl.float32)  # finite: fully masked rows end as zeros
    l_i = tl.zeros(r_idx.shape, dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)  # INT4 only

    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(past + q_first - window + 1, 0)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)  # not a constexpr: a new split count compiles nothing
    tiles_per_split = tl.cdiv(tl.cdiv(tl.maximum(past - lo, 0), BLOCK_N), num_splits)
    first = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(past, first + tiles_per_split * BLOCK_N)
    for n0 in range(first, end, BLOCK_N):  # this split's share of the pages
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < end
        page = tl.load(table_ptr + b64 * table_stride + k_pos // TOKENS, mask=k_ok, other=0).to(tl.int64)
        base = data_ptr + page * page_bytes
        cell = kv_head * TOKENS + k_pos % TOKENS
        k_codes = _code_tile(base, cell, offs_h, k_ok, h_ok, K_CODES, CODE_BYTES)
        meta = _meta_word(base, cell, k_ok, K_SCALE, META_BYTES)
        k_scale = _meta(meta, K_SCALE, K_SCALE)
        if INT4:
            k_lo, k_hi = _int4_levels(k_codes, q_a.dtype, BY_BITS)
            s = _scores(q_a, k_lo, DOT_IN_FP32, ONE_ROW) + _scores(q_b, k_hi, DOT_IN_FP32, ONE_ROW)
            k_min = _meta(meta, K_MIN, K_SCALE) - INT4_OFFSET * k_scale
            s = s * k_scale[None, :] + q_sum[:, None] * k_min[None, :]
        else:
            s = _scores(q_keys, _fp8_values(k_codes, q_keys.dtype), DOT_IN_FP32, ONE_ROW)
            s = s * k_scale[None, :] * q_down[:, None]
        seen = k_ok[None, :] & r_ok[:, None]
        if HAS_WINDOW:
            seen = seen & (k_pos[None, :] > r_pos[:, None] - window)
        if HAS_KEY_MASK:
            real = tl.load(key_mask_ptr + b64 * km_sb + k_pos * km_st, mask=k_ok, other=0)
            seen = seen & (real != 0)[None, :]
        s = tl.where(seen, s * qk_scale, float("-inf"))
        if STORE_LOGITS:
            tl.store(logits_ptr + b64 * lg_sb + r_head[:, None] * lg_sh + k_pos[None, :], s,
                     mask=r_ok[:, None] & k_ok[None, :])  # fmt: skip
        m_i, l_i, alpha, p = _softmax_step(m_i, l_i, s)
        v_codes = _code_tile(base, cell, offs_h, k_ok, h_ok, V_CODES, CODE_BYTES)
        v_scale = _meta(meta, V_SCALE, K_SCALE)
        if INT4:
            p_scaled = (p * v_scale[None, :]).to(q_a.dtype)
            v_lo, v_hi = _int4_levels(v_codes, q_a.dtype, BY_BITS)
            p_min = tl.sum(p * _meta(meta, V_MIN, K_SCALE)[None, :], axis=1)
            p_min = (p_min - INT4_OFFSET * tl.sum(p_scaled.to(tl.float32), axis=1))[:, None]  # the rounded p * scale
            p_scaled = tl.broadcast_to(p_scaled, (BLOCK_M, BLOCK_N))  # ONE_ROW: the one row to all
            acc_a = acc_a * alpha[:, None] + _dot(p_scaled, v_lo, DOT_IN_FP32) + p_min
            acc_b = acc_b * alpha[:, None] + _dot(p_scaled, v_hi, DOT_IN_FP32) + p_min
        else:
            p_up = 1.0
            if FP16_DOTS:  # p <= 1: the tile's largest V scale bounds p * scale
                p_up = _fp16_prescale(tl.max(v_scale, axis=0))
            p_scaled = tl.broadcast_to((p * (v_scale * p_up)[None, :]).to(q_keys.dtype), (BLOCK_M, BLOCK_N))
            pv = _dot(p_scaled, _fp8_values(v_codes, q_keys.dtype), DOT_IN_FP32)
            acc_a = acc_a * alpha[:, None] + pv * (1.0 / p_up)

    q_last = tl.minimum(q_len, q_first + BLOCK_M // GROUP_PAD)
    q_last = tl.where(split == num_splits - 1, q_last, 0)  # the last split attends this forward's own tokens
    for n0 in range(0, q_last, NEW_N):  # this forward's own tokens, exact
        j = n0 + tl.arange(0, NEW_N)
        j_ok = j < q_last
        tile_ok = j_ok[:, None] & h_ok[None, :]
        k_rows = k_new_ptr + b64 * kn_sb + j.to(tl.int64)[:, None] * kn_st + kv_head * kn_sh
        v_rows = v_new_ptr + b64 * vn_sb + j.to(tl.int64)[:, None] * vn_st + kv_head * vn_sh
        k = tl.load(k_rows + offs_h[None, :] * kn_sd, mask=tile_ok, other=0.0)
        s = _scores(q_a, k.to(q_a.dtype), DOT_IN_FP32, ONE_ROW)
        if INT4:
            k = tl.load(k_rows + (CODE_BYTES + offs_h[None, :]) * kn_sd, mask=tile_ok, other=0.0)
            s += _scores(q_b, k.to(q_a.dtype), DOT_IN_FP32, ONE_ROW)
        k_pos = past + j  # negative: left padding of a row that was empty (past < 0)
        seen = j_ok[None, :] & r_ok[:, None] & (j[None, :] <= r_idx[:, None]) & (k_pos >= 0)[None, :]
        if HAS_WINDOW:
            seen = seen & (k_pos[None, :] > r_pos[:, None] - window)
        if HAS_KEY_MASK:
            real = tl.load(key_mask_ptr + b64 * km_sb + k_pos * km_st, mask=j_ok & (k_pos >= 0), other=0)
            seen = seen & (real != 0)[None, :]
        s = tl.where(seen, s * qk_scale, float("-inf"))
        if STORE_LOGITS:
            tl.store(logits_ptr + b64 * lg_sb + r_head[:, None] * lg_sh + k_pos[None, :], s,
                     mask=r_ok[:, None] & j_ok[None, :])  # fmt: skip
        m_i, l_i, alpha, p = _softmax_step(m_i, l_i, s)
        p = tl.broadcast_to(p.to(q_a.dtype), (BLOCK_M, NEW_N))
        v = tl.load(v_rows + offs_h[None, :] * vn_sd, mask=tile_ok, other=0.0)
        acc_a = acc_a * alpha[:, None] + _dot(p, v.to(q_a.dtype), DOT_IN_FP32)
        if INT4:
            v = tl.load(v_rows + (CODE_BYTES + offs_h[None, :]) * vn_sd, mask=tile_ok, other=0.0)
            acc_b = acc_b * alpha[:, None] + _dot(p, v.to(q_a.dtype), DOT_IN_FP32)

    out_mask = row_ok[:, None] & h_ok[None, :]
    if not SPLIT:
        denom = tl.where(l_i > 0, l_i, 1.0)[:, None]
        out = out_ptr + b64 * o_sb + q_idx.to(tl.int64)[:, None] * o_st + head[:, None] * o_sh
        tl.store(out + offs_h[None, :] * o_sd, (acc_a / denom).to(out_ptr.dtype.element_ty), mask=out_mask)
        if INT4:
            tl.store(out + (CODE_BYTES + offs_h[None, :]) * o_sd, (acc_b / denom).to(out_ptr.dtype.element_ty),
                     mask=out_mask)  # fmt: skip
    else:  # partials in paged_attention's layout, merged by its combine kernel
        n_rows = batch * q_len * (KV_HEADS * GROUP)
        row = ((split * batch + b64) * q_len + q_idx) * (KV_HEADS * GROUP) + head
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_h[None, :], acc_a, mask=out_mask)
        if INT4:
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + CODE_BYTES + offs_h[None, :], acc_b, mask=out_mask)
        tl.store(part_ml_ptr + row, m_i, mask=row_ok)
        tl.store(part_ml_ptr + num_splits * n_rows + row, l_i, mask=row_ok)


class _QuantTiles(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    target_programs: int  # for the split rule
    maxnreg: int | None  # registers per thread, capped so that more programs fit an SM
    one_row: bool  # the kernel's ONE_ROW (`_scores`)


def _quant_tiles(q_len: int, group: int, head_dim: int, layout: KvLayout, masked: bool) -> _QuantTiles:
    """Prefill: the bf16 kernel's tiles. Decode: swept on the H200 (batch 16 x 4096, a Llama-2-7B
    layer): 2 stages, 4 warps (8 were slower everywhere), 2-8 context splits over one, and 128-key
    tiles since the codes are unpacked by bits (int4 230 us vs 253 with 64 keys), except INT4 with
    a key mask (its loads took the 128-key tile from 128 to 168 registers per thread, 229 to 309 us).
    Registers capped at 128 (ncu, 2026-12-01: at 168 three programs fit an SM, 2.8 warps per
    scheduler, DRAM 27% busy; capped, four fit): int4 227 -> 191 us, fp8 263 -> 243; caps of 112
    and below spill and were slower. Under the cap, storing the decode token in this launch spilled
    (int4 215 us against 191 + 7 for attention and a write launch), so the write has its own launch.
    Page-aligned tiles and a prefetch by hand were slower. Once the metadata loads were pipelined
    (2026-12-02), INT4 without a key mask gained again from one warp per program, 64-key tiles and no
    cap (173 -> 163 us at 4096 keys, 638 -> 609 at 16384; not profiled: probably the softmax row
    reductions, which cross warps through shared memory with four); 2 warps, 8 warps, 3 stages, and
    the same for FP8 were slower. FP8 with fp16 dot operands (2026-12-03) is fastest on one warp,
    32-key tiles and 3 stages, uncapped: 204 us at 4096 keys (batch 32: 398) against 224 (431) for
    the bf16-bits kernel on its four warps and 128 keys, where fp16 dots take 272; 16 or 64 keys,
    2 or 4 stages, 2 warps, or the cap were slower. Scores as one row (ONE_ROW, 2026-12-03) for INT4
    decode without GQA or key mask: 162.6 -> 150.8 us at 4096 keys, 610.1 -> 557.5 at 16384, with 3
    stages (2: 153.2 / 567.7; 32- or 128-key tiles, 2 or 4 warps slower). Not taken where it was
    slower: FP8 (207.6 -> 233.1 us; 64-key tiles 237.2) and INT4 with a key mask (247.9 -> 255.9).
    INT4 with a key mask stays on the four capped warps although one warp measured faster (249.7 ->
    191.7 us, one-row 165.5): on the H200 (triton 3.6) those launches came out wrong, not only less
    exact: 5.9e-4 off the reference in the generate test (MHA, one-row; 5e-5 without it) and the
    kernel test's 5-query GQA chunk failed, where four warps pass both. Not understood; the
    interpreter gives the right result for the same code."""
    block_m, block_n, num_warps, num_stages = _tiles(q_len, group, head_dim, _next_power_of_2(layout.tokens))
    if not decode_tile(q_len, group):
        return _QuantTiles(block_m, block_n, num_warps, num_stages, _TARGET_PROGRAMS, None, False)
    if layout.kv_dtype == "fp8":
        return _QuantTiles(block_m, 32, 1, 3, 4 * _TARGET_PROGRAMS, None, False)
    if masked:
        return _QuantTiles(block_m, 64, 4, 2, 4 * _TARGET_PROGRAMS, 128, False)
    one_row = q_len == 1 and group == 1
    return _QuantTiles(block_m, 64, 1, 3 if one_row else 2, 4 * _TARGET_PROGRAMS, None, one_row)


def _by_bits(q: torch.Tensor) -> bool:
    """Whether the kernel unpacks INT4 codes with PTX bit moves (`_int4_levels`): bf16 on a GPU; the
    interpreter runs no PTX."""
    return q.dtype == torch.bfloat16 and q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def paged_attention_quant(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    storage: torch.Tensor,
    layout: KvLayout,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [batch, q_len, heads, head_dim] over each row's quantized pages (its first
    kv_lens[b] - q_len tokens, dequantized) and this forward's k_new, v_new [batch, q_len, kv_heads,
    head_dim] (exact); see the module doc. Where kv_lens[b] < q_len (a row that was empty, left-padded
    in the forward), its first q_len - kv_lens[b] tokens are padding: no query sees them. Returns [batch, q_len, heads, head_dim] in q's dtype.
    `num_splits`: programs sharing each (row, KV head, query tile)'s pages, merged afterwards (a
    power of two; default: as `paged_attention` picks, from the table's width, without reading
    kv_lens). `logits`: as `paged_attention`'s (decode: each key's score, for heavy-hitter eviction).
    k_new and v_new are not stored: `write_kv_quant` does that."""
    check_logits(logits, q)
    batch, q_len, heads, head_dim = q.shape
    if k_new.shape != (batch, q_len, layout.kv_heads, head_dim) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new must be [{batch}, {q_len}, {layout.kv_heads}, {head_dim}], got "
                         f"{tuple(k_new.shape)} / {tuple(v_new.shape)}")  # fmt: skip
    if head_dim != layout.head_dim or heads % layout.kv_heads:
        raise ValueError(f"q heads x dims {heads} x {head_dim} do not fit the layout's {layout.kv_heads} x {layout.head_dim}")
    if kv_lens.shape != (batch,) or block_table.dtype != torch.int32 or block_table.shape[0] != batch:
        raise ValueError("kv_lens must be [batch] and block_table int32 [batch, blocks]")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.dim() != 2 or key_mask.shape[0] != batch):
        raise ValueError(f"key_mask must be bool [batch, kv_len], got {key_mask.dtype} {tuple(key_mask.shape)}")
    group = heads // layout.kv_heads
    group_pad = _next_power_of_2(group)
    tiles = _quant_tiles(q_len, group, head_dim, layout, key_mask is not None)
    block_m, block_n = tiles.block_m, tiles.block_n
    q_tiles = math.ceil(q_len / (block_m // group_pad))
    if num_splits is None:
        num_splits = num_splits_for(batch, layout.kv_heads, q_tiles, block_table.shape[1] * layout.tokens,
                                    sliding_window, q_len, tiles.target_programs, group)  # fmt: skip
    elif num_splits < 1 or num_splits > MAX_SPLITS or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two in [1, {MAX_SPLITS}], got {num_splits}")
    out = torch.empty_like(q)
    n_rows = batch * q_len * heads
    part_acc = torch.empty(num_splits * n_rows * head_dim if num_splits > 1 else 1, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(2 * num_splits * n_rows if num_splits > 1 else 1, dtype=torch.float32, device=q.device)
    mask = key_mask if key_mask is not None else kv_lens  # a placeholder pointer when there is none
    km = key_mask.stride() if key_mask is not None else (0, 0)
    block_d = max(16, _next_power_of_2(head_dim))
    _quant_attention_kernel[(batch * layout.kv_heads, q_tiles, num_splits)](
        q_ptr=q, k_new_ptr=k_new, v_new_ptr=v_new, data_ptr=storage.view(torch.uint8), table_ptr=block_table,
        kv_lens_ptr=kv_lens, key_mask_ptr=mask, out_ptr=out, part_acc_ptr=part_acc, part_ml_ptr=part_ml,
        logits_ptr=out if logits is None else logits,  # unused without logits
        batch=batch, q_len=q_len, page_bytes=layout.page_bytes, window=sliding_window or 0, qk_scale=scale * LOG2_E,
        q_sb=q.stride(0), q_st=q.stride(1), q_sh=q.stride(2), q_sd=q.stride(3),
        kn_sb=k_new.stride(0), kn_st=k_new.stride(1), kn_sh=k_new.stride(2), kn_sd=k_new.stride(3),
        vn_sb=v_new.stride(0), vn_st=v_new.stride(1), vn_sh=v_new.stride(2), vn_sd=v_new.stride(3),
        o_sb=out.stride(0), o_st=out.stride(1), o_sh=out.stride(2), o_sd=out.stride(3),
        table_stride=block_table.stride(0), km_sb=km[0], km_st=km[1],
        lg_sb=0 if logits is None else logits.stride(0), lg_sh=0 if logits is None else logits.stride(1),
        KV_HEADS=layout.kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        **_layout_args(layout), HAS_KEY_MASK=key_mask is not None, HAS_WINDOW=sliding_window is not None,
        DOT_IN_FP32=_dot_in_fp32(q.dtype), SPLIT=num_splits > 1, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_H=max(16, _next_power_of_2(layout.code_bytes)), STORE_LOGITS=logits is not None, BY_BITS=_by_bits(q),
        FP16_DOTS=layout.kv_dtype == "fp8" and q.dtype in (torch.float16, torch.bfloat16),
        NEW_N=max(16, min(block_n, _next_power_of_2(block_m // group_pad))), ONE_QUERY=q_len == 1,
        ONE_ROW=tiles.one_row,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **({"maxnreg": tiles.maxnreg} if tiles.maxnreg else {}),
    )  # fmt: skip
    if num_splits > 1:
        _combine_splits_kernel[(n_rows,)](
            part_acc_ptr=part_acc, part_ml_ptr=part_ml, out_ptr=out, q_len=q_len, n_rows=n_rows, num_splits=num_splits,
            o_stride_b=out.stride(0), o_stride_t=out.stride(1), o_stride_h=out.stride(2), o_stride_d=out.stride(3),
            HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS, num_warps=1,
        )  # fmt: skip
    return out
