"""Paged attention: attention over KV blocks that live in one flat page pool, read through a block table.

Layout (shared with the paged KV cache; do not change it here alone). `storage` is a 1-D tensor; page
p is `storage[p * page_elems : (p + 1) * page_elems]` and holds one block of `block_size` tokens of
ONE layer: the K block first, [block_size, kv_heads, head_dim] contiguous, then the V block right
after it (element offset block_size * kv_heads * head_dim in the page). `page_elems` may exceed the
two blocks (the pool's page size is shared with LoRA weights); the rest of a page is never touched.
`block_table[b, j]` (int32) is the page of row b's logical block j; entries past a row's length are
never read, so they may hold anything (-1, stale ids).

Semantics (those of a HF decoder's eager attention with a causal mask): `kv_lens[b]` tokens are cached
for row b, INCLUDING the q_len new ones, so query i sits at position kv_lens[b] - q_len + i. It
attends to keys at positions <= its own; with `sliding_window` w only to keys with position > its
own - w (transformers' `sliding_window_overlay`: w keys, itself included); with `key_mask` only to
keys whose key_mask[b, pos] is True (left padding). A query that sees no key gets zeros. Softmax and
accumulation are fp32; the output has q's dtype. kv_lens[b] may be less than q_len: a row that was
empty and takes fewer tokens than the forward's others (the serving engine's left-padded prefill)
has its first q_len - kv_lens[b] queries at negative positions, seeing nothing; `write_kv` stores no
token at a negative position, so the padding takes no slot.

One kernel serves decode and prefill. A program takes one (row, kv head, query tile, context split)
and packs the tile's queries x the kv head's GQA group of query heads into the rows of one tile
(row r = query r // group_pad, head r % group_pad): each K/V block is loaded once for the whole group
and the products are tensor-core dots even in decode, where the tile is the group alone (padded
to the 16 rows a dot needs). Keys are walked FlashAttention-style (online softmax, in the log2
domain) in tiles of BLOCK_N positions; a key's address comes from its page id, so the cache is
never gathered. The walk covers only the tile's causal range -- from the sliding-window start of its
first query to its last query -- so prefill tiles early in a sequence and windowed layers read less.

Decode has one program per (row, kv head): at batch 8 with 8 kv heads that is 64 programs for ~132
SMs, each streaming its whole context. Then the key range is split ("flash-decoding"): each split
writes fp32 partials (running max, sum, unnormalised accumulator) and a small combine kernel merges
them. The split count is picked on the host without reading kv_lens (no device->host sync): from
the number of programs and the context capacity of the block table (max_blocks * block_size), so
splits past a short row's end just write empty partials. `num_splits=` overrides it (tests).

`PagedDecode` runs the same kernel with NEW_KV: the decode token's K/V come in as arguments; the
last split of each (row, kv head) stores them in the page and adds that key from registers, and no
program reads that slot from the page, so a decode layer is one launch with no write-then-read
ordering inside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import RepeatedLaunch, SpecializedLaunch
from .sgmv import _dot_in_fp32

LOG2_E = 1.4426950408889634  # scores are kept in the log2 domain: exp(x) = exp2(x * LOG2_E)
MAX_SPLITS = 16  # most context splits a launch uses; the combine kernel loads them all at once
_TARGET_PROGRAMS = 512  # enough attention programs in flight to cover ~132 SMs a few times
_MIN_KEYS_PER_SPLIT = 256  # a split shorter than this costs more in partials than it gains


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _dot(a, b, DOT_IN_FP32: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 inputs get IEEE products, not tf32 (see `_dot_in_fp32`)."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit(  # shape-dependent scalars and table pointers: see kernels/launch.py
    do_not_specialize=["batch", "q_len", "bt_stride_b", "km_stride_b"],
    do_not_specialize_on_alignment=["block_table_ptr"],
)
def _paged_attention_kernel(
    q_ptr,
    storage_ptr,
    k_new_ptr,
    v_new_ptr,
    block_table_ptr,
    kv_lens_ptr,
    key_mask_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    logits_ptr,  # fp32 [batch, heads, >= kv_len] (STORE_LOGITS): each key's score, for heavy-hitter eviction
    batch,
    q_len,
    page_elems,
    window,
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain
    q_stride_b,
    q_stride_t,
    q_stride_h,
    q_stride_d,
    o_stride_b,
    o_stride_t,
    o_stride_h,
    o_stride_d,
    kn_stride_b,
    kn_stride_h,
    kn_stride_d,
    vn_stride_b,
    vn_stride_h,
    vn_stride_d,
    bt_stride_b,
    km_stride_b,
    km_stride_t,
    lg_stride_b,
    lg_stride_h,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # the context is split over grid dim 2 (partials for the combine kernel)
    HAS_WINDOW: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    NEW_KV: tl.constexpr,
    STORE_LOGITS: tl.constexpr,  # decode only (q_len 1, keys read from the pages: not NEW_KV)
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    TOKEN_ELEMS: tl.constexpr = KV_HEADS * HEAD_DIM
    V_OFFSET: tl.constexpr = BLOCK_SIZE * KV_HEADS * HEAD_DIM
    b = tl.program_id(0) // KV_HEADS
    kv_head = tl.program_id(0) % KV_HEADS
    q_tile = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)  # not a constexpr: a new split count compiles nothing

    kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    q_first = q_tile * BLOCK_Q
    q_last = tl.minimum(q_len, q_first + BLOCK_Q) - 1
    # Keys the tile can see: [lo, hi). lo is rounded down to a key tile so that tiles start on
    # page boundaries (BLOCK_N is a multiple of block_size or divides it).
    hi = tl.minimum(kv_len - q_len + q_last + 1, kv_len)
    if NEW_KV:
        hi = kv_len - 1  # the decode token's key is not read from its page: see _attend_new_key
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(kv_len - q_len + q_first - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    n_tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(hi, start + tiles_per_split * BLOCK_N)

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_first + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    row_ok = (q_idx < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    q_pos = kv_len - q_len + q_idx
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    b64 = b.to(tl.int64)
    q_rows = q_ptr + b64 * q_stride_b + q_idx.to(tl.int64) * q_stride_t + head * q_stride_h
    q = tl.load(
        q_rows[:, None] + offs_d[None, :] * q_stride_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )

    # The running max of a row that has seen no key is finite, so exp2(m_i - m_new) is never NaN:
    # fully masked rows keep (m=-1e30, l=0, acc=0) and end as zeros.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table = block_table_ptr + b64 * bt_stride_b
    for n0 in range(start, end, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < end  # never read a block-table entry or a page past the row's length
        page = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        key = storage_ptr + page * page_elems + (k_pos % BLOCK_SIZE) * TOKEN_ELEMS + kv_head * HEAD_DIM
        k_t = tl.load(key[None, :] + offs_d[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        s = _dot(q, k_t, DOT_IN_FP32) * qk_scale

        seen = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
        if HAS_KEY_MASK:
            real = tl.load(key_mask_ptr + b64 * km_stride_b + k_pos * km_stride_t, mask=k_ok, other=0)
            seen = seen & (real != 0)[None, :]
        s = tl.where(seen, s, float("-inf"))
        if STORE_LOGITS:
            logits = logits_ptr + b64 * lg_stride_b + head[:, None] * lg_stride_h + k_pos[None, :]
            tl.store(logits, s, mask=row_ok[:, None] & k_ok[None, :])

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(key[:, None] + V_OFFSET + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_IN_FP32)
        m_i = m_new

    if NEW_KV:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if split == num_splits - 1:
            m_i, l_i, acc = _attend_new_key(
                q, m_i, l_i, acc, k_new_ptr, v_new_ptr, storage_ptr, table, key_mask_ptr, b64, kv_head,
                kv_len - 1, row_ok, page_elems, qk_scale, kn_stride_b, kn_stride_h, kn_stride_d,
                vn_stride_b, vn_stride_h, vn_stride_d, km_stride_b, km_stride_t, KV_HEADS, HEAD_DIM,
                BLOCK_D, BLOCK_SIZE, HAS_KEY_MASK,
            )  # fmt: skip

    out_mask = row_ok[:, None] & d_ok[None, :]
    if not SPLIT:
        denom = tl.where(l_i > 0, l_i, 1.0)
        o_rows = out_ptr + b64 * o_stride_b + q_idx.to(tl.int64) * o_stride_t + head * o_stride_h
        o_tile = o_rows[:, None] + offs_d[None, :] * o_stride_d
        tl.store(o_tile, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials, contiguous: acc [splits, batch, q_len, heads, head_dim], max/sum [2, splits, batch, q_len, heads].
        n_rows = batch * q_len * (KV_HEADS * GROUP)
        row = ((split * batch + b64) * q_len + q_idx) * (KV_HEADS * GROUP) + head
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(part_ml_ptr + row, m_i, mask=row_ok)
        tl.store(part_ml_ptr + num_splits * n_rows + row, l_i, mask=row_ok)


@triton.jit
def _attend_new_key(
    q,
    m_i,
    l_i,
    acc,
    k_new_ptr,
    v_new_ptr,
    storage_ptr,
    table,
    key_mask_ptr,
    b64,
    kv_head,
    pos,
    row_ok,
    page_elems,
    qk_scale,
    kn_stride_b,
    kn_stride_h,
    kn_stride_d,
    vn_stride_b,
    vn_stride_h,
    vn_stride_d,
    km_stride_b,
    km_stride_t,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
):
    """Decode: store the row's new K/V (this kv head's part) at position `pos` of its pages, and add the
    key to the online softmax from registers. No program of the launch reads that position from the
    pages, so the store needs no ordering against the attention's loads."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = tl.load(
        k_new_ptr + b64 * kn_stride_b + kv_head * kn_stride_h + offs_d * kn_stride_d, mask=d_ok, other=0.0
    )
    v = tl.load(
        v_new_ptr + b64 * vn_stride_b + kv_head * vn_stride_h + offs_d * vn_stride_d, mask=d_ok, other=0.0
    )
    page = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
    dst = storage_ptr + page * page_elems + (pos % BLOCK_SIZE) * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
    tl.store(dst + offs_d, k, mask=d_ok)
    tl.store(dst + BLOCK_SIZE * KV_HEADS * HEAD_DIM + offs_d, v, mask=d_ok)

    s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * qk_scale
    seen = row_ok
    if HAS_KEY_MASK:
        seen = seen & (tl.load(key_mask_ptr + b64 * km_stride_b + pos * km_stride_t) != 0)
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, s)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
    return m_new, l_i * alpha + p, acc


@triton.jit(  # shape-dependent scalars and table pointers: see kernels/launch.py
    do_not_specialize=["q_len", "n_rows", "num_splits"],
)
def _combine_splits_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    q_len,
    n_rows,
    num_splits,
    o_stride_b,
    o_stride_t,
    o_stride_h,
    o_stride_d,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # MAX_SPLITS: every split count runs one compiled kernel
):
    """One (row, query, head): out = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp2(m_s - max m).
    Empty splits carry (m=-1e30, l=0, acc=0) and weigh nothing; all empty gives zeros. Splits past
    `num_splits` are masked: loads that fetch nothing, weighing nothing. The partials are summed
    CHUNK splits a load, as many loads as the split count needs, not in one masked load of all
    MAX_SPLITS rows (which ran the instructions of 16 splits for 4; on an H200 the two measured the
    same for the quantized decode at 16 x 4096, 4 splits)."""
    CHUNK: tl.constexpr = 4
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.load(part_ml_ptr + splits * n_rows + row, mask=s_ok, other=-1.0e30)
    l_s = tl.load(part_ml_ptr + (num_splits + splits) * n_rows + row, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    denom = tl.sum(tl.where(s_ok, tl.exp2(m - m_max), 0.0) * l_s, axis=0)
    o = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, num_splits, CHUNK):
        chunk = first + tl.arange(0, CHUNK)
        c_ok = chunk < num_splits
        m_c = tl.load(part_ml_ptr + chunk * n_rows + row, mask=c_ok, other=-1.0e30)
        w = tl.where(c_ok, tl.exp2(m_c - m_max), 0.0)
        acc = tl.load(
            part_acc_ptr + (chunk[:, None] * n_rows + row) * HEAD_DIM + offs_d[None, :],
            mask=c_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        o += tl.sum(acc * w[:, None], axis=0)
    o = o / tl.where(denom > 0, denom, 1.0)
    head = row % HEADS
    t = (row // HEADS) % q_len
    b = row // (HEADS * q_len)
    o_ptr = out_ptr + b * o_stride_b + t * o_stride_t + head * o_stride_h + offs_d * o_stride_d
    tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(  # shape-dependent scalars and table pointers: see kernels/launch.py
    do_not_specialize=["start_value", "new_len", "bt_stride_b"],
    do_not_specialize_on_alignment=["block_table_ptr", "start_ptr"],
)
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    storage_ptr,
    block_table_ptr,
    start_ptr,
    start_value,
    new_len,
    page_elems,
    k_stride_b,
    k_stride_t,
    k_stride_h,
    k_stride_d,
    v_stride_b,
    v_stride_t,
    v_stride_h,
    v_stride_d,
    bt_stride_b,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    START_IS_TENSOR: tl.constexpr,
):
    """BLOCK_T new tokens of one row: each token's K (all kv heads, one contiguous run of
    kv_heads * head_dim elements in its page) and its V, at the same offset in the V block."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    start = tl.load(start_ptr + b).to(tl.int64) if START_IS_TENSOR else start_value
    pos = start + t
    t_ok = (t < new_len) & (pos >= 0)  # a negative position: left padding, not stored
    page = tl.load(block_table_ptr + b * bt_stride_b + pos // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
    dst = storage_ptr + page * page_elems + (pos % BLOCK_SIZE) * (KV_HEADS * HEAD_DIM)
    e = tl.arange(0, BLOCK_E)  # (kv head, dim) flattened, as in the page
    h = e // HEAD_DIM
    d = e % HEAD_DIM
    mask = t_ok[:, None] & (e < KV_HEADS * HEAD_DIM)[None, :]
    k_src = (
        k_ptr + b * k_stride_b + t[:, None] * k_stride_t + h[None, :] * k_stride_h + d[None, :] * k_stride_d
    )
    v_src = (
        v_ptr + b * v_stride_b + t[:, None] * v_stride_t + h[None, :] * v_stride_h + d[None, :] * v_stride_d
    )
    tl.store(dst[:, None] + e[None, :], tl.load(k_src, mask=mask), mask=mask)
    tl.store(
        dst[:, None] + BLOCK_SIZE * KV_HEADS * HEAD_DIM + e[None, :], tl.load(v_src, mask=mask), mask=mask
    )


# ----------------------------------------------------------------------------- launchers


# Launched through SpecializedLaunch: decode runs these once per layer per token, and Triton's
# own launch path costs ~80 us of host time each there (measured on an H100 host, triton 3.6).
_ATTENTION = SpecializedLaunch(_paged_attention_kernel)
_COMBINE = SpecializedLaunch(_combine_splits_kernel)
_WRITE_KV = SpecializedLaunch(_write_kv_kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """Plain ints: triton's own helpers are constexpr functions costing ~2-3 us a call on the host,
    and a decode step called seven of them per layer."""
    return 1 << max(n - 1, 0).bit_length()


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _check_pool(
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    block_size: int,
    kv_heads: int,
    head_dim: int,
) -> None:
    if storage.dim() != 1:
        raise ValueError(f"storage must be a 1-D page pool, got shape {tuple(storage.shape)}")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if page_elems < 2 * block_size * kv_heads * head_dim:
        raise ValueError(
            f"page_elems {page_elems} cannot hold a K and a V block of {block_size}x{kv_heads}x{head_dim}"
        )
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(
            f"block_table must be int32 [batch, max_blocks], got {block_table.dtype} {tuple(block_table.shape)}"
        )


def check_logits(logits: torch.Tensor | None, q: torch.Tensor) -> None:
    """A logits buffer takes one decode token per row: fp32 [batch, heads, slots], last dim contiguous."""
    if logits is None:
        return
    batch, q_len, heads, _ = q.shape
    if q_len != 1:
        raise ValueError(f"key logits are stored for decode (one query token per row), got {q_len}")
    if logits.dtype != torch.float32 or logits.dim() != 3 or logits.shape[:2] != (batch, heads) or logits.stride(2) != 1:
        raise ValueError(f"logits must be fp32 [{batch}, {heads}, slots] with contiguous slots, got "
                         f"{logits.dtype} {tuple(logits.shape)}")  # fmt: skip


def _check_attention(
    q: torch.Tensor,
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    block_size: int,
    kv_heads: int,
    key_mask: torch.Tensor | None,
    sliding_window: int | None,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, q_len, heads, head_dim], got shape {tuple(q.shape)}")
    batch, _, heads, head_dim = q.shape
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if storage.dtype != q.dtype:
        raise ValueError(f"storage dtype {storage.dtype} differs from q's {q.dtype}")
    _check_pool(storage, page_elems, block_table, block_size, kv_heads, head_dim)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for a batch of {batch}")
    if kv_lens.shape != (batch,) or kv_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_lens must be int32 [batch], got {kv_lens.dtype} {tuple(kv_lens.shape)}")
    if key_mask is not None and (
        key_mask.dim() != 2 or key_mask.dtype != torch.bool or key_mask.shape[0] != batch
    ):
        raise ValueError(
            f"key_mask must be bool [batch, kv_len], got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")


def _tiles(q_len: int, group: int, head_dim: int, block_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Decode packs just the GQA group (>= 16 rows for a
    dot); prefill packs 64 rows of queries x group heads. A key tile spans whole pages when pages
    are small, part of one when they are large. Measured on an H100 (bf16, head_dim 128, triton
    3.6): decode tiles of 32-128 keys and 4-8 warps are within noise of each other; prefill gains
    ~7% from 32-key tiles. Decode pipelines 2 tiles, not 3: on an H200 (2026-12-01, a Llama-2-7B
    layer, batch 16) 246 us against 331 at 4096 keys, 69 against 90 at 1024 (ncu: 3 stages left
    ~2.4 warps per scheduler and the DRAM 67% busy; 2 stages read at ~4.4 TB/s)."""
    group_pad = _next_power_of_2(group)
    decode = decode_tile(q_len, group)
    block_m = max(16, group_pad) if decode else max(64, group_pad)
    block_n = 32 if head_dim > 128 or (head_dim == 128 and not decode) else 64
    return block_m, max(block_n, min(block_size, 128)), 4, 2 if decode else 3


def decode_tile(q_len: int, group: int) -> bool:
    """Whether a launch of `q_len` queries per row takes the decode tile (all its queries x the GQA
    group in one 16-row tile) rather than the prefill tiles."""
    return q_len <= max(1, 16 // _next_power_of_2(group))


def num_splits_for(
    batch: int,
    kv_heads: int,
    q_tiles: int,
    max_context: int,
    sliding_window: int | None = None,
    q_len: int = 1,
    target_programs: int = _TARGET_PROGRAMS,
    group: int = 1,
) -> int:
    """Context splits for a launch of batch * kv_heads * q_tiles programs: doubled while the GPU
    is under-filled (fewer than `target_programs`) and each split keeps >= _MIN_KEYS_PER_SPLIT keys
    of the longest possible context. Prefill tiles (`decode_tile` false for `q_len` x `group`) never
    split: their few-program launches take microseconds, and a split prefill compiled a kernel of its
    own inside the first small prompt's time in serving."""
    if not decode_tile(q_len, group):
        return 1
    if sliding_window is not None:
        max_context = min(max_context, sliding_window + q_len)
    programs, splits = batch * kv_heads * q_tiles, 1
    while (
        programs * splits * 2 <= target_programs
        and max_context >= 2 * splits * _MIN_KEYS_PER_SPLIT
        and splits * 2 <= MAX_SPLITS
    ):
        splits *= 2
    return splits


@dataclass(frozen=True)
class _Launch:
    """How one attention call is launched: the attention grid and constexprs, the split count, and the
    combine kernel's (grid, constexprs) when the context is split."""

    grid: tuple[int, int, int]
    constexprs: dict
    num_warps: int
    num_stages: int
    num_splits: int
    combine: tuple[tuple[int], dict] | None


def _plan_launch(
    q_shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    kv_heads: int,
    block_size: int,
    max_blocks: int,
    sliding_window: int | None,
    has_key_mask: bool,
    num_splits: int | None,
    new_kv: bool,
    store_logits: bool = False,
) -> _Launch:
    batch, q_len, heads, head_dim = q_shape
    group = heads // kv_heads
    group_pad = _next_power_of_2(group)
    block_m, block_n, num_warps, num_stages = _tiles(q_len, group, head_dim, block_size)
    q_tiles = _cdiv(q_len, block_m // group_pad)
    if num_splits is None:
        num_splits = num_splits_for(batch, kv_heads, q_tiles, max_blocks * block_size, sliding_window, q_len,
                                    group=group)  # fmt: skip
    elif num_splits < 1 or num_splits > MAX_SPLITS or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two in [1, {MAX_SPLITS}], got {num_splits}")
    block_d = max(16, _next_power_of_2(head_dim))
    constexprs = dict(
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=num_splits > 1,
        HAS_WINDOW=sliding_window is not None, HAS_KEY_MASK=has_key_mask, DOT_IN_FP32=_dot_in_fp32(dtype),
        NEW_KV=new_kv, STORE_LOGITS=store_logits,
    )  # fmt: skip
    combine = None
    if num_splits > 1:
        combine = (
            (batch * q_len * heads,),
            dict(HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS),
        )
    return _Launch(
        (batch * kv_heads, q_tiles, num_splits), constexprs, num_warps, num_stages, num_splits, combine
    )


def _partials(
    launch: _Launch, q_shape: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 buffers for the splits' partial results (accumulators; running max and sum)."""
    n_rows = q_shape[0] * q_shape[1] * q_shape[2]
    part_acc = torch.empty(launch.num_splits * n_rows * q_shape[3], dtype=torch.float32, device=device)
    return part_acc, torch.empty(2 * launch.num_splits * n_rows, dtype=torch.float32, device=device)


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    return out


def _key_mask_arg(
    key_mask: torch.Tensor | None, kv_lens: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]]:
    if key_mask is None:
        return kv_lens, (0, 0)  # unused
    return key_mask.view(torch.uint8), key_mask.stride()


def paged_attention(
    q: torch.Tensor,
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    block_size: int,
    kv_heads: int,
    scale: float,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [batch, q_len, heads, head_dim] over each row's paged K/V (see the module doc).

    Returns `out` (allocated like q when not given) [batch, q_len, heads, head_dim] in q's dtype.
    `num_splits` (a power of two <= MAX_SPLITS) forces the context split; default: `num_splits_for`.
    `logits` (decode, q_len 1): fp32 [batch, heads, >= kv_len] receives each key's score in the log2
    domain (q . k * scale * log2(e); -inf where masked), what heavy-hitter eviction accumulates
    without another pass over the keys. No device->host synchronisation. On a CPU without the Triton
    interpreter it runs `paged_attention_torch`.
    """
    _check_attention(
        q, storage, page_elems, block_table, kv_lens, block_size, kv_heads, key_mask, sliding_window
    )
    check_logits(logits, q)
    out = _output(q, out)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return out
    if not _use_triton(q):
        if logits is not None:
            raise ValueError("logits come from the Triton kernel; the torch path scores keys itself")
        return paged_attention_torch(
            q, storage, page_elems, block_table, kv_lens, block_size, kv_heads, scale, key_mask, sliding_window, out
        )
    launch = _plan_launch(
        tuple(q.shape), q.dtype, kv_heads, block_size, block_table.shape[1], sliding_window,
        key_mask is not None, num_splits, new_kv=False, store_logits=logits is not None,
    )  # fmt: skip
    part_acc, part_ml = _partials(launch, q.shape, q.device) if launch.combine else (out, out)  # unused: out
    mask_arg, km_strides = _key_mask_arg(key_mask, kv_lens)
    _ATTENTION(
        launch.grid,
        (
            q, storage, q, q, block_table, kv_lens, mask_arg, out, part_acc, part_ml,  # no new K/V: q unused
            out if logits is None else logits,  # unused without logits
            q.shape[0], q.shape[1], page_elems, sliding_window or 0, scale * LOG2_E,
            *q.stride(), *out.stride(), 0, 0, 0, 0, 0, 0, block_table.stride(0), *km_strides,
            *(logits.stride()[:2] if logits is not None else (0, 0)),
        ),
        launch.constexprs,
        launch.num_warps,
        launch.num_stages,
    )  # fmt: skip
    if launch.combine:
        grid, constexprs = launch.combine
        _COMBINE(grid, (part_acc, part_ml, out, q.shape[1], grid[0], launch.num_splits, *out.stride()), constexprs,
                 num_warps=1)  # fmt: skip
    return out


class PagedDecode:
    """Decode attention for every layer of a step, planned once (FlashInfer's plan/run split): each row
    has ONE new token, whose K/V each call also stores in the row's pages, at position kv_lens[b] - 1.

    Why: HF decode is host-bound, and a paged layer used to cost the host two Triton launches
    (write_kv, paged_attention) with their checks, tile and split choice. Here the shapes, split count,
    launch configuration and split buffers are fixed at construction for a (batch, heads, table width,
    mask, window) combination, and a call is one launch (two with a split context) straight into the
    compiled launcher. The kernel adds the new key from registers, so no load of the launch waits on
    its store. Inputs come in the layout attention layers hold them in, [batch, heads, 1, head_dim]
    (no transposes: each view costs the host microseconds). Semantics otherwise those of
    `paged_attention` with q_len 1, after `write_kv` of the token at kv_lens[b] - 1. Calls on one
    instance must be ordered on one stream (they share the split buffers). `backend`: "triton" or
    "torch" (the plain references), for a caller with its own rule; None: Triton on CUDA or under
    TRITON_INTERPRET=1.
    """

    def __init__(
        self,
        storage: torch.Tensor,
        page_elems: int,
        block_size: int,
        batch: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        max_blocks: int,
        scale: float,
        with_key_mask: bool = False,
        sliding_window: int | None = None,
        num_splits: int | None = None,
        backend: str | None = None,
    ) -> None:
        if batch < 1 or max_blocks < 1:
            raise ValueError(f"PagedDecode needs batch >= 1 and max_blocks >= 1, got {batch}, {max_blocks}")
        if backend not in (None, "triton", "torch"):
            raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
        if kv_heads <= 0 or heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        _check_pool(storage, page_elems, torch.empty(0, 0, dtype=torch.int32), block_size, kv_heads, head_dim)
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        self.storage, self.page_elems, self.block_size = storage, page_elems, block_size
        self.q_shape, self.kv_shape = (batch, heads, 1, head_dim), (batch, kv_heads, 1, head_dim)
        self.out_shape, self.table_shape = (batch, 1, heads, head_dim), (batch, max_blocks)
        self.with_key_mask, self.sliding_window, self.scale = with_key_mask, sliding_window, scale
        self._use_triton = _use_triton(storage) if backend is None else backend == "triton"
        launch = _plan_launch(
            self.out_shape, storage.dtype, kv_heads, block_size, max_blocks, sliding_window, with_key_mask,
            num_splits, new_kv=True,
        )  # fmt: skip
        self._partials = _partials(launch, self.out_shape, storage.device) if launch.combine else None
        self._attention = RepeatedLaunch(
            _ATTENTION, launch.grid, launch.constexprs, launch.num_warps, launch.num_stages
        )
        self._combine = RepeatedLaunch(_COMBINE, *launch.combine, num_warps=1) if launch.combine else None
        self._combine_rows = (batch * heads, launch.num_splits)  # the combine's (n_rows, num_splits)
        self._scalars = (batch, 1, page_elems, sliding_window or 0, scale * LOG2_E)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        block_table: torch.Tensor,
        kv_lens: torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [batch, heads, 1, head_dim]; k, v [batch, kv_heads, 1, head_dim], the new token's (any
        strides); block_table int32 [batch, max_blocks]; kv_lens [batch], the new token included;
        key_mask bool [batch, >= kv_lens] if planned with one. Returns [batch, 1, heads, head_dim]."""
        dtype = self.storage.dtype
        if q.shape != self.q_shape or k.shape != self.kv_shape or v.shape != self.kv_shape:
            raise ValueError(
                f"planned q {self.q_shape} and k/v {self.kv_shape}, got {tuple(q.shape)}, {tuple(k.shape)}, "
                f"{tuple(v.shape)}"
            )
        if q.dtype != dtype or k.dtype != dtype or v.dtype != dtype:
            raise ValueError(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} differ from the pool's {dtype}")
        if block_table.shape != self.table_shape or block_table.dtype != torch.int32:
            raise ValueError(
                f"block_table must be int32 {self.table_shape}, got {block_table.dtype} {tuple(block_table.shape)}"
            )
        if kv_lens.shape != self.q_shape[:1] or kv_lens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kv_lens must be int32 [batch], got {kv_lens.dtype} {tuple(kv_lens.shape)}")
        if (key_mask is not None) != self.with_key_mask or (
            key_mask is not None
            and (key_mask.dim() != 2 or key_mask.dtype != torch.bool or key_mask.shape[0] != self.q_shape[0])
        ):
            wanted = "a bool [batch, kv_len] key_mask" if self.with_key_mask else "no key_mask"
            got = "none" if key_mask is None else f"{key_mask.dtype} {tuple(key_mask.shape)}"
            raise ValueError(f"planned with {wanted}, got {got}")
        out = torch.empty(self.out_shape, dtype=dtype, device=q.device)
        if not self._use_triton:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            write_kv_torch(self.storage, self.page_elems, block_table, kv_lens.long() - 1, k, v, self.block_size)
            return paged_attention_torch(
                q.transpose(1, 2), self.storage, self.page_elems, block_table, kv_lens, self.block_size,
                self.kv_shape[1], self.scale, key_mask, self.sliding_window, out,
            )  # fmt: skip
        mask_arg, km_strides = _key_mask_arg(key_mask, kv_lens)
        part_acc, part_ml = self._partials or (out, out)  # unused without splits
        qs, ks, vs = q.stride(), k.stride(), v.stride()
        self._attention(
            (q, self.storage, k, v, block_table, kv_lens, mask_arg, out, part_acc, part_ml, out),  # no logits
            (
                *self._scalars, qs[0], qs[2], qs[1], qs[3], *out.stride(), ks[0], ks[1], ks[3],
                vs[0], vs[1], vs[3], block_table.stride(0), *km_strides, 0, 0,
            ),
        )  # fmt: skip
        if self._combine is not None:
            self._combine((part_acc, part_ml, out), (1, *self._combine_rows, *out.stride()))
        return out


def _positions(start: torch.Tensor | int, batch: int, new_len: int, device: torch.device) -> torch.Tensor:
    """[batch, new_len] int64 logical positions of the new tokens; ValueError for a start tensor that
    is not one position per row (a kernel would read past it)."""
    offsets = torch.arange(new_len, device=device)
    if isinstance(start, torch.Tensor):
        if start.shape != (batch,):
            raise ValueError(f"start must be an int or one position per row, [{batch}], got {tuple(start.shape)}")
        return start.to(device=device, dtype=torch.int64)[:, None] + offsets
    return (start + offsets).expand(batch, new_len)


def stored_tokens(
    block_table: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block_table, pos, k, v) of the tokens a write stores: those at positions >= 0 (a negative one
    is left padding). Where some are dropped, each kept token becomes a row of its own: tables
    [kept, blocks], pos [kept, 1], k/v [kept, 1, ...]."""
    keep = pos >= 0
    if bool(keep.all()):
        return block_table, pos, k, v
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)[keep]
    kept = keep.to(k.device)
    return block_table[rows.to(block_table.device)], pos[keep][:, None], k[kept][:, None], v[kept][:, None]


def write_kv(
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    start: torch.Tensor | int,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
) -> None:
    """Write k, v [batch, new_len, kv_heads, head_dim] (any strides) into the pages: token i of row b
    goes to logical position start (or start[b]) + i, unless that is negative (left padding of a row
    that was empty: not stored). One launch, no sync; on a CPU without the Triton interpreter,
    `write_kv_torch` does it with torch index ops."""
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"k and v must both be [batch, new_len, kv_heads, head_dim], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, new_len, kv_heads, head_dim = k.shape
    _check_pool(storage, page_elems, block_table, block_size, kv_heads, head_dim)
    if k.dtype != storage.dtype or v.dtype != storage.dtype:
        raise ValueError(f"k/v dtypes {k.dtype}/{v.dtype} differ from the pool's {storage.dtype}")
    if isinstance(start, torch.Tensor) and (
        start.shape != (batch,) or start.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"start must be an int or an int32/int64 [batch] tensor, got {start.dtype} {tuple(start.shape)}"
        )
    if batch == 0 or new_len == 0:
        return
    if not _use_triton(storage):
        write_kv_torch(storage, page_elems, block_table, start, k, v, block_size)
        return
    block_e = _next_power_of_2(kv_heads * head_dim)
    block_t = min(_next_power_of_2(new_len), max(1, 8192 // block_e))
    start_is_tensor = isinstance(start, torch.Tensor)
    _WRITE_KV(
        (batch, _cdiv(new_len, block_t)),
        (
            k, v, storage, block_table, start if start_is_tensor else block_table,
            0 if start_is_tensor else int(start), new_len, page_elems, *k.stride(), *v.stride(),
            block_table.stride(0),
        ),
        dict(
            KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_E=block_e, BLOCK_T=block_t, BLOCK_SIZE=block_size,
            START_IS_TENSOR=start_is_tensor,
        ),
        num_warps=4,
    )  # fmt: skip


# ----------------------------------------------------------------------------- without Triton


def paged_attention_torch(
    q: torch.Tensor,
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    block_size: int,
    kv_heads: int,
    scale: float,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention` where Triton does not run (a CPU): same contract, computed by torch's
    scaled_dot_product_attention, so a long prefill costs what transformers' sdpa attention does.

    Why not the reference: it materialises fp32 scores for every (query, key) pair and gathers the
    cache element by element: 10-30x slower than sdpa at prompts of thousands of tokens. Here the
    pages are gathered whole, up to the longest row, and a mask is built only where causality alone
    does not decide (ragged rows, padding, a window that bites); a causal prefill runs sdpa's
    causal kernel. Reads kv_lens and the key mask on the host: free on a CPU, a sync elsewhere.
    """
    _check_attention(
        q, storage, page_elems, block_table, kv_lens, block_size, kv_heads, key_mask, sliding_window
    )
    batch, q_len, heads, head_dim = q.shape
    result = _output(q, out)
    if batch == 0 or q_len == 0:
        return result
    lens = kv_lens.tolist()
    n_keys = max(lens)
    if n_keys == 0:
        return result.zero_()
    k, v = _gather_pages(storage, page_elems, block_table, kv_lens, lens, block_size, kv_heads, head_dim)
    mask, causal = _sdpa_mask(kv_lens, lens, q_len, key_mask, sliding_window)
    if heads != kv_heads:  # head h reads kv head h // group (sdpa's enable_gqa needs torch 2.5)
        k, v = k.repeat_interleave(heads // kv_heads, dim=2), v.repeat_interleave(heads // kv_heads, dim=2)
    dtype = torch.float32  # softmax and accumulation in fp32, as the kernel
    attended = F.scaled_dot_product_attention(
        q.transpose(1, 2).to(dtype),
        k.transpose(1, 2).to(dtype),
        v.transpose(1, 2).to(dtype),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
    )
    if mask is not None:  # a query that sees no key gets zeros: torch >= 2.5 gives them, 2.4 NaN
        attended = attended.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    result.copy_(attended.transpose(1, 2))
    return result


def _sdpa_mask(
    kv_lens: torch.Tensor, lens: list[int], q_len: int, key_mask: torch.Tensor | None, window: int | None
) -> tuple[torch.Tensor | None, bool]:
    """(bool mask [batch, 1, q_len, max(lens)] or None, is_causal) for sdpa. No mask where causality
    alone decides, as transformers' sdpa path does: rows of one length, no padding (a key mask of all
    True counts as none) and no window narrower than the context; then a prefill is sdpa's causal
    case (q_len == keys: its top-left alignment is right) and a decode sees every key."""
    n_keys = max(lens)
    if key_mask is not None and key_mask.shape[1] >= n_keys and bool(key_mask[:, :n_keys].all()):
        key_mask = None
    if window is not None and window >= n_keys:
        window = None
    if window is None and min(lens) == n_keys:
        if key_mask is None and q_len in (1, n_keys):
            return None, q_len > 1
        if q_len == 1 and key_mask is not None and key_mask.shape[1] >= n_keys:
            return key_mask[:, None, None, :n_keys], False  # a decode step of a padded batch
    return attention_mask(kv_lens, q_len, n_keys, key_mask, window)[:, None], False


def _gather_pages(
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    lens: list[int],
    block_size: int,
    kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [batch, max(lens), kv_heads, head_dim] read a page at a time (`lens`: kv_lens on the
    host); keys at or past a row's length are zeros (their page ids may be garbage and their
    contents anything, NaN included)."""
    n_keys, device = max(lens), storage.device
    n_blocks = _cdiv(n_keys, block_size)
    pages = _pages(storage, page_elems, block_size, kv_heads, head_dim)
    table = block_table[:, :n_blocks].long()
    ragged = min(lens) < n_keys
    if ragged:
        lens_col = kv_lens.to(device).long()[:, None]
        table = torch.where(torch.arange(n_blocks, device=device) * block_size < lens_col, table, 0)
    shape = (block_table.shape[0], n_blocks * block_size, kv_heads, head_dim)
    k, v = (pages[:, i].index_select(0, table.reshape(-1)).view(shape)[:, :n_keys] for i in (0, 1))
    if ragged:
        real = (torch.arange(n_keys, device=device) < lens_col)[..., None, None]
        k, v = torch.where(real, k, 0.0), torch.where(real, v, 0.0)
    return k, v


def _pages(storage: torch.Tensor, page_elems: int, block_size: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """The pool as [pages, 2 (K, V), block_size, kv_heads, head_dim] (a view)."""
    n_pages = storage.numel() // page_elems
    pages = storage[: n_pages * page_elems].view(n_pages, page_elems)[:, : 2 * block_size * kv_heads * head_dim]
    return pages.view(n_pages, 2, block_size, kv_heads, head_dim)


def write_kv_torch(
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    start: torch.Tensor | int,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
) -> None:
    """`write_kv` where Triton does not run (a CPU): the same writes as `write_kv_reference`, but a
    token at a time rather than an element at a time (a decode step is a handful of ops)."""
    batch, new_len, kv_heads, head_dim = k.shape
    block_table, pos, k, v = stored_tokens(block_table, _positions(start, batch, new_len, storage.device), k, v)
    page = block_table.long().gather(1, pos // block_size)
    pages = _pages(storage, page_elems, block_size, kv_heads, head_dim)
    pages[page, 0, pos % block_size] = k.to(storage.dtype)
    pages[page, 1, pos % block_size] = v.to(storage.dtype)


# ----------------------------------------------------------------------------- references


def write_kv_reference(
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    start: torch.Tensor | int,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
) -> None:
    """`write_kv` with torch index ops (computed on k's device)."""
    batch, new_len, kv_heads, head_dim = k.shape
    block_table, pos, k, v = stored_tokens(block_table, _positions(start, batch, new_len, storage.device), k, v)
    page = block_table.long().gather(1, pos // block_size)
    token_elems = kv_heads * head_dim
    index = (page * page_elems + pos % block_size * token_elems)[..., None] + torch.arange(
        token_elems, device=storage.device
    )
    storage[index.reshape(-1)] = k.reshape(-1).to(storage.dtype)
    storage[(index + block_size * token_elems).reshape(-1)] = v.reshape(-1).to(storage.dtype)


def gather_kv(
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    block_size: int,
    kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's K and V as [batch, max_blocks * block_size, kv_heads, head_dim], read from its pages;
    positions at or past kv_lens[b] are zeros (their block-table entries are not used)."""
    batch, max_blocks = block_table.shape
    device = storage.device
    pos = torch.arange(max_blocks * block_size, device=device)
    valid = pos[None, :] < kv_lens.to(device)[:, None].long()
    page = torch.where(valid, block_table.long().repeat_interleave(block_size, dim=1), 0)
    token_elems = kv_heads * head_dim
    index = (page * page_elems + pos % block_size * token_elems)[..., None] + torch.arange(
        token_elems, device=device
    )
    shape = (batch, max_blocks * block_size, kv_heads, head_dim)
    keep = valid[..., None]
    k = torch.where(keep, storage[index], 0).view(shape)
    v = torch.where(keep, storage[index + block_size * token_elems], 0).view(shape)
    return k, v


def attention_mask(
    kv_lens: torch.Tensor, q_len: int, n_keys: int, key_mask: torch.Tensor | None, sliding_window: int | None
) -> torch.Tensor:
    """bool [batch, q_len, n_keys]: which key positions each query sees (causal, window, key_mask)."""
    device = kv_lens.device
    k_pos = torch.arange(n_keys, device=device)
    q_pos = kv_lens.long()[:, None] - q_len + torch.arange(q_len, device=device)  # [batch, q_len]
    seen = (k_pos <= q_pos[..., None]) & (k_pos < kv_lens.long()[:, None, None])
    if sliding_window is not None:
        seen &= k_pos > q_pos[..., None] - sliding_window
    if key_mask is not None:
        real = torch.zeros(kv_lens.shape[0], n_keys, dtype=torch.bool, device=device)
        width = min(n_keys, key_mask.shape[1])
        real[:, :width] = key_mask[:, :width].to(device)
        seen &= real[:, None, :]
    return seen


def paged_attention_reference(
    q: torch.Tensor,
    storage: torch.Tensor,
    page_elems: int,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    block_size: int,
    kv_heads: int,
    scale: float,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch, same contract as `paged_attention` (num_splits is ignored): gathers every
    row's pages to contiguous K/V, masked softmax in fp32. Vectorised over the batch, no sync."""
    _check_attention(
        q, storage, page_elems, block_table, kv_lens, block_size, kv_heads, key_mask, sliding_window
    )
    _, q_len, heads, head_dim = q.shape
    k, v = gather_kv(storage, page_elems, block_table, kv_lens, block_size, kv_heads, head_dim)
    group = heads // kv_heads
    k = k.float().repeat_interleave(group, dim=2)  # head h reads kv head h // group (HF repeat_kv)
    v = v.float().repeat_interleave(group, dim=2)
    seen = attention_mask(kv_lens, q_len, k.shape[1], key_mask, sliding_window)[:, None]  # [b, 1, q, keys]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    scores = scores.masked_fill(~seen, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, 0.0))  # masked keys: exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)
    result = torch.einsum("bhqk,bkhd->bqhd", p / torch.where(denom > 0, denom, 1.0), v).to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
