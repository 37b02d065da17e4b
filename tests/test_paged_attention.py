"""Paged attention and write_kv against their plain-PyTorch references, and both against an
independent float64 oracle on contiguous K/V. On CPU the kernels run under TRITON_INTERPRET=1.

Pools are adversarial: pages in shuffled order among spare pages, pages larger than a K+V block,
and every element that no live token owns (spare pages, page tails, slots past a row's length) is
NaN, so reading anything but a row's own tokens poisons the result. Block-table entries past a
row's length are garbage (-1 or other rows' pages)."""

import math

import pytest
import torch
from conftest import DEVICE

from hf_multilora.kernels import paged_attention as pa
from hf_multilora.kernels.paged_attention import (
    PagedDecode,
    gather_kv,
    num_splits_for,
    paged_attention,
    paged_attention_reference,
    paged_attention_torch,
    write_kv,
    write_kv_reference,
    write_kv_torch,
)

TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


class Pool:
    """A page pool holding random K/V for rows of `kv_lens` tokens; `ks[b]`/`vs[b]` ([len, kv_heads,
    head_dim]) are the same values, contiguous, for the oracle."""

    def __init__(self, kv_lens, kv_heads, head_dim, block_size, dtype, seed, spare_pages=5, page_pad=24):
        gen = torch.Generator().manual_seed(seed)
        self.block_size, self.kv_heads, self.head_dim, self.dtype = block_size, kv_heads, head_dim, dtype
        self.token_elems = kv_heads * head_dim
        self.page_elems = 2 * block_size * self.token_elems + page_pad
        blocks = [math.ceil(n / block_size) for n in kv_lens]
        n_pages = sum(blocks) + spare_pages
        self.storage = torch.full((n_pages * self.page_elems,), float("nan"), dtype=dtype)
        free = torch.randperm(n_pages, generator=gen).tolist()
        # garbage past each row's length: -1 or any page id, including pages of other rows
        self.block_table = torch.randint(-1, n_pages, (len(kv_lens), max(blocks) + 1), generator=gen).int()
        self.ks, self.vs = [], []
        for b, n in enumerate(kv_lens):
            k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
            v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
            for j in range(blocks[b]):
                page = free.pop()
                self.block_table[b, j] = page
                lo, hi = j * block_size, min(n, (j + 1) * block_size)
                k_at = page * self.page_elems
                v_at = k_at + block_size * self.token_elems
                self.storage[k_at : k_at + (hi - lo) * self.token_elems] = k[lo:hi].reshape(-1)
                self.storage[v_at : v_at + (hi - lo) * self.token_elems] = v[lo:hi].reshape(-1)
            self.ks.append(k)
            self.vs.append(v)
        self.kv_lens = torch.tensor(kv_lens, dtype=torch.int32)

    def args(self):
        """(storage, page_elems, block_table, kv_lens, block_size, kv_heads) on DEVICE."""
        return (
            self.storage.to(DEVICE), self.page_elems, self.block_table.to(DEVICE), self.kv_lens.to(DEVICE),
            self.block_size, self.kv_heads,
        )  # fmt: skip


def oracle(q, ks, vs, kv_lens, scale, window=None, key_mask=None):
    """float64, one (row, query, head) at a time, on the contiguous K/V: what paged attention means."""
    batch, q_len, heads, head_dim = q.shape
    out = torch.zeros(batch, q_len, heads, head_dim, dtype=torch.float64)
    q = q.double().cpu()
    for b, n in enumerate(kv_lens):
        group = heads // ks[b].shape[1]
        for i in range(q_len):
            q_pos = n - q_len + i
            keys = [
                j
                for j in range(n)
                if j <= q_pos
                and (window is None or j > q_pos - window)  # transformers' sliding_window_overlay
                and (key_mask is None or bool(key_mask[b, j]))
            ]
            if not keys:
                continue  # sees nothing: zeros
            for h in range(heads):
                k = ks[b][keys, h // group].double()
                v = vs[b][keys, h // group].double()
                out[b, i, h] = torch.softmax(k @ q[b, i, h] * scale, dim=0) @ v
    return out


def left_pad_mask(kv_lens, pads, width):
    """bool [batch, width]: the first pads[b] positions of row b are padding."""
    mask = torch.ones(len(kv_lens), width, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return mask


CASES = {
    # name: (kv_lens, q_len, heads, kv_heads, head_dim, block_size, window, pads, num_splits, dtype)
    "decode_gqa_ragged": ([37, 5, 64, 17, 0], 1, 4, 2, 16, 16, None, None, None, torch.float32),
    "decode_mha_split4": ([100, 3, 64], 1, 2, 2, 32, 8, None, None, 4, torch.float32),
    "decode_group3_split16": ([150, 40], 1, 6, 2, 16, 16, None, None, 16, torch.float32),
    "decode_bf16_split8": ([90, 33, 128], 1, 4, 2, 32, 16, None, None, 8, torch.bfloat16),
    "decode_window_split2": ([50, 33, 9], 1, 4, 2, 16, 16, 12, None, 2, torch.float32),
    "speculative_q3_mqa": ([45, 20], 3, 8, 1, 16, 32, None, None, None, torch.float32),
    "prefill_gqa": ([40, 40], 40, 4, 2, 16, 16, None, None, None, torch.float32),
    "prefill_left_pad": ([19, 19, 19], 19, 4, 2, 16, 8, None, [0, 5, 18], None, torch.float32),
    "decode_left_pad_fp16": ([24, 24, 24], 1, 4, 2, 16, 16, None, [0, 7, 23], 2, torch.float16),
    "prefill_window_bf16": ([36, 36], 36, 2, 2, 32, 16, 8, None, None, torch.bfloat16),
    "chunked_prefill_fp16": ([40, 29], 7, 4, 2, 16, 16, None, None, 2, torch.float16),
    "chunked_window_pad": ([70, 45], 9, 4, 2, 16, 16, 20, [3, 30], 2, torch.float32),
    "prefill_head_dim_128": ([40], 20, 2, 1, 128, 16, None, None, None, torch.float32),
    "decode_block_size_128": ([300, 129], 1, 4, 2, 16, 128, None, None, 2, torch.float32),
    "head_dim_24": ([30, 18], 2, 4, 2, 24, 16, None, None, None, torch.float32),
    # empty rows prefilled with fewer tokens than the forward's (the engine's left-padded prefill):
    # the first q_len - kv_lens[b] queries sit at negative positions and see nothing
    "prefill_shorter_rows": ([23, 9, 1], 23, 4, 2, 16, 8, None, None, None, torch.float32),
    "prefill_shorter_rows_window_bf16": ([30, 12], 30, 4, 2, 32, 16, 8, None, 2, torch.bfloat16),
}


@pytest.mark.parametrize("case", CASES)
def test_paged_attention(case):
    kv_lens, q_len, heads, kv_heads, head_dim, block_size, window, pads, num_splits, dtype = CASES[case]
    pool = Pool(kv_lens, kv_heads, head_dim, block_size, dtype, seed=len(case))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(len(kv_lens), q_len, heads, head_dim, generator=gen).to(dtype)
    key_mask = None if pads is None else left_pad_mask(kv_lens, pads, max(kv_lens) + 3)
    scale = head_dim**-0.5
    kwargs = dict(key_mask=None if key_mask is None else key_mask.to(DEVICE), sliding_window=window)

    got = paged_attention(q.to(DEVICE), *pool.args(), scale, num_splits=num_splits, **kwargs)
    ref = paged_attention_reference(q.to(DEVICE), *pool.args(), scale, **kwargs)
    expected = oracle(q, pool.ks, pool.vs, kv_lens, scale, window, key_mask)

    assert got.dtype == dtype and got.shape == q.shape
    assert torch.isfinite(got).all() and torch.isfinite(ref).all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float().cpu(), ref.float().cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(ref.double().cpu(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(got.double().cpu(), expected, atol=tol, rtol=tol)
    if window is not None or pads is not None:  # the masks under test do change the result
        unmasked = oracle(q, pool.ks, pool.vs, kv_lens, scale)
        assert not torch.allclose(unmasked, expected, atol=10 * tol)


# The path without Triton also takes shortcuts the kernel CASES do not all reach: no mask for a
# causal prefill or a decode of equal rows, a padding mask that pads nothing or a window wider than
# the context dropped, no key at all.
TORCH_CASES = {
    **CASES,
    "causal_prefill_mha": ([21, 21], 21, 2, 2, 16, 8, None, None, None, torch.float32),
    "decode_equal_rows": ([33, 33, 33], 1, 4, 2, 16, 16, None, None, None, torch.float32),
    "no_padding_wide_window_gqa": ([21, 21], 21, 4, 2, 16, 8, 30, [0, 0], None, torch.float32),
    "decode_equal_rows_left_pad_bf16": ([26, 26], 1, 4, 1, 32, 8, None, [3, 0], None, torch.bfloat16),
    "no_key_at_all": ([0, 0], 1, 4, 2, 16, 8, None, None, None, torch.float32),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_path_matches_reference(case):
    """paged_attention_torch (sdpa over pages gathered whole) against the reference and the oracle,
    writing a strided `out`."""
    kv_lens, q_len, heads, kv_heads, head_dim, block_size, window, pads, _, dtype = TORCH_CASES[case]
    pool = Pool(kv_lens, kv_heads, head_dim, block_size, dtype, seed=len(case))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(len(kv_lens), q_len, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    key_mask = None if pads is None else left_pad_mask(kv_lens, pads, max(kv_lens) + 3)
    kwargs = dict(key_mask=None if key_mask is None else key_mask.to(DEVICE), sliding_window=window)
    scale = head_dim**-0.5
    out = torch.empty(len(kv_lens), heads, q_len, head_dim, dtype=dtype, device=DEVICE).transpose(1, 2)

    got = paged_attention_torch(q, *pool.args(), scale, out=out, **kwargs)
    ref = paged_attention_reference(q, *pool.args(), scale, **kwargs)
    expected = oracle(q.cpu(), pool.ks, pool.vs, kv_lens, scale, window, key_mask)

    assert got is out and torch.isfinite(got).all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float().cpu(), ref.float().cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(got.double().cpu(), expected, atol=tol, rtol=tol)


def test_query_that_sees_nothing_gives_zeros():
    """A row with no cached token and a left-padded query before its first real token."""
    pool = Pool([0, 12], 2, 16, 16, torch.float32, seed=3)
    q = torch.randn(2, 2, 4, 16)
    key_mask = left_pad_mask([0, 12], [0, 11], 12)  # row 1: query at position 10 sees only padding
    for splits in (1, 4):
        got = paged_attention(
            q.to(DEVICE), *pool.args(), 0.25, key_mask=key_mask.to(DEVICE), num_splits=splits
        )
        assert torch.isfinite(got).all()
        assert (got[0] == 0).all() and (got[1, 0] == 0).all() and (got[1, 1] != 0).any()


def test_every_split_count_launches_one_compiled_kernel(monkeypatch):
    """The split count follows the shape (a small prefill splits its context, a large one does not):
    as a constexpr, each count compiled its own attention and combine kernels, inside a serving
    request's time. Now only whether a launch splits is (2, 8, 16 splits: one key per kernel)."""
    from hf_multilora.kernels.launch import SpecializedLaunch

    keys = {}
    call = SpecializedLaunch.__call__

    def recorded(self, grid, args, constexprs, num_warps, num_stages=3):
        keys.setdefault(self._fn.__name__, set()).add(self._key(args, constexprs, num_warps, num_stages, pdl=False))
        return call(self, grid, args, constexprs, num_warps, num_stages)

    monkeypatch.setattr(SpecializedLaunch, "__call__", recorded)
    monkeypatch.setattr(pa, "_use_triton", lambda tensor: True)
    pool = Pool([300, 17, 64, 1], 2, 16, 16, torch.float32, seed=4)
    q = torch.randn(4, 1, 4, 16).to(DEVICE)
    for splits in (2, 8, 16):
        paged_attention(q, *pool.args(), 0.25, num_splits=splits)
    assert {name: len(found) for name, found in keys.items()} == {
        "_paged_attention_kernel": 1, "_combine_splits_kernel": 1,
    }


def test_split_count_does_not_change_the_result():
    pool = Pool([300, 17, 64, 1], 2, 16, 16, torch.float32, seed=4)
    q = torch.randn(4, 1, 4, 16).to(DEVICE)
    outputs = [paged_attention(q, *pool.args(), 0.25, num_splits=s) for s in (1, 2, 8, 16)]
    for got in outputs[1:]:
        torch.testing.assert_close(got, outputs[0], atol=1e-5, rtol=1e-5)


def test_split_policy():
    # serving decode: 64 programs, long contexts -> split; large batches or short contexts -> not
    assert num_splits_for(8, 8, 1, 4096) == 8
    assert num_splits_for(64, 8, 1, 4096) == 1
    assert num_splits_for(8, 8, 1, 300) == 1
    assert num_splits_for(1, 1, 1, 1 << 20) == pa.MAX_SPLITS
    assert num_splits_for(1, 8, 1, 1 << 20, sliding_window=512) == 2  # the window bounds the keys read


def test_strided_q_and_out():
    """HF hands q as [batch, heads, q_len, head_dim] transposed; out may be a strided view."""
    pool = Pool([25, 40], 2, 16, 16, torch.float32, seed=5)
    q = torch.randn(2, 4, 3, 16).to(DEVICE).transpose(1, 2)
    buffer = torch.zeros(2, 4, 3, 16, device=DEVICE)
    out = buffer.transpose(1, 2)
    result = paged_attention(q, *pool.args(), 0.25, out=out)
    assert result is out
    expected = oracle(q.cpu(), pool.ks, pool.vs, [25, 40], 0.25)
    torch.testing.assert_close(buffer.transpose(1, 2).double().cpu(), expected, atol=2e-5, rtol=2e-5)


def test_bad_arguments():
    pool = Pool([5], 2, 16, 16, torch.float32, seed=6)
    storage, page_elems, block_table, kv_lens, block_size, kv_heads = pool.args()
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_attention(q[:, :, :3], storage, page_elems, block_table, kv_lens, block_size, kv_heads, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(q.half(), storage, page_elems, block_table, kv_lens, block_size, kv_heads, 1.0)
    with pytest.raises(ValueError, match="page_elems"):
        paged_attention(q, storage, 100, block_table, kv_lens, block_size, kv_heads, 1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q, storage, page_elems, block_table.long(), kv_lens, block_size, kv_heads, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention(q, storage, page_elems, block_table, kv_lens, block_size, kv_heads, 1.0, num_splits=3)
    for attend in (paged_attention, paged_attention_torch):  # the path without Triton checks as the kernel's
        with pytest.raises(ValueError, match="multiple of kv_heads"):
            attend(q[:, :, :3], storage, page_elems, block_table, kv_lens, block_size, kv_heads, 1.0)
        with pytest.raises(ValueError, match=r"out must be torch.float32 \(1, 1, 4, 16\)"):
            attend(q, storage, page_elems, block_table, kv_lens, block_size, kv_heads, 1.0, out=q[:, :, :2])


# ----------------------------------------------------------------------------- write_kv


def empty_pool(rows, capacity, kv_heads, head_dim, block_size, dtype, seed, page_pad=8):
    """NaN-filled pool and a shuffled block table giving each row `capacity` tokens of pages."""
    gen = torch.Generator().manual_seed(seed)
    page_elems = 2 * block_size * kv_heads * head_dim + page_pad
    blocks = math.ceil(capacity / block_size)
    n_pages = rows * blocks + 3
    storage = torch.full((n_pages * page_elems,), float("nan"), dtype=dtype)
    block_table = torch.randperm(n_pages, generator=gen)[: rows * blocks].view(rows, blocks).int()
    return storage.to(DEVICE), page_elems, block_table.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_round_trip(dtype):
    """Prefill from 0, then a chunk at ragged per-row starts, then one decode token per row; the
    multi-token writes cross block boundaries. Reading back gives the inputs; nothing else in the
    pool changes."""
    rows, kv_heads, head_dim, block_size = 3, 2, 16, 8
    storage, page_elems, block_table = empty_pool(rows, 48, kv_heads, head_dim, block_size, dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    truth_k = torch.randn(rows, 48, kv_heads, head_dim, generator=gen).to(dtype)
    truth_v = torch.randn(rows, 48, kv_heads, head_dim, generator=gen).to(dtype)

    def chunk(t, lo, hi):  # [rows, hi - lo, kv_heads, head_dim], given as HF's transposed layout
        return t[:, lo:hi].transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)

    write_kv(storage, page_elems, block_table, 0, chunk(truth_k, 0, 13), chunk(truth_v, 0, 13), block_size)
    # a chunk at ragged per-row starts (int64): row b gets positions starts[b] .. starts[b] + 16
    starts = [13, 10, 5]
    rows_k = torch.stack([truth_k[b, s : s + 17] for b, s in enumerate(starts)])
    rows_v = torch.stack([truth_v[b, s : s + 17] for b, s in enumerate(starts)])
    start = torch.tensor(starts, dtype=torch.int64, device=DEVICE)
    write_kv(storage, page_elems, block_table, start, chunk(rows_k, 0, 17), chunk(rows_v, 0, 17), block_size)
    # one decode token per row (int32 starts)
    lens = [s + 17 for s in starts]
    start = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    write_kv(storage, page_elems, block_table, start, chunk(truth_k, 0, 1), chunk(truth_v, 0, 1), block_size)
    for b, n in enumerate(lens):
        truth_k[b, n], truth_v[b, n] = truth_k[b, 0], truth_v[b, 0]
    lens = [n + 1 for n in lens]

    kv_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    k, v = gather_kv(storage, page_elems, block_table, kv_lens, block_size, kv_heads, head_dim)
    for b, n in enumerate(lens):
        assert torch.equal(k[b, :n].cpu(), truth_k[b, :n])
        assert torch.equal(v[b, :n].cpu(), truth_v[b, :n])
    written = int(storage.isnan().logical_not().sum())
    assert written == 2 * sum(lens) * kv_heads * head_dim  # nothing else in the pool was touched


@pytest.mark.parametrize("write", [write_kv, write_kv_torch, write_kv_reference])
def test_write_kv_stores_no_token_at_a_negative_position(write):
    """Empty rows left-padded in a forward (start -pad[b], the engine's prefill): each row's own tokens
    land at positions 0.., and nothing else in the pool changes."""
    kv_heads, head_dim, block_size, pads = 2, 16, 8, [0, 7, 19]
    storage, page_elems, block_table = empty_pool(3, 24, kv_heads, head_dim, block_size, torch.float32, seed=11)
    gen = torch.Generator().manual_seed(12)
    k, v = (torch.randn(3, 20, kv_heads, head_dim, generator=gen) for _ in range(2))
    start = torch.tensor([-p for p in pads], device=DEVICE)
    write(storage, page_elems, block_table, start, k.to(DEVICE), v.to(DEVICE), block_size)
    lens = [20 - p for p in pads]
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    got_k, got_v = gather_kv(storage, page_elems, block_table, kv_lens, block_size, kv_heads, head_dim)
    for b, pad in enumerate(pads):
        assert torch.equal(got_k[b, : lens[b]].cpu(), k[b, pad:]) and torch.equal(got_v[b, : lens[b]].cpu(), v[b, pad:])
    assert int(storage.isnan().logical_not().sum()) == 2 * sum(lens) * kv_heads * head_dim


def test_write_kv_matches_reference_and_feeds_attention():
    """write_kv and its torch reference write the same pool; attention over what was written
    (prefill, then a chunk with a cached prefix) matches the oracle."""
    rows, kv_heads, head_dim, block_size = 2, 2, 16, 16
    pools = [empty_pool(rows, 64, kv_heads, head_dim, block_size, torch.float32, seed=9) for _ in range(2)]
    gen = torch.Generator().manual_seed(10)
    k = torch.randn(rows, 45, kv_heads, head_dim, generator=gen)
    v = torch.randn(rows, 45, kv_heads, head_dim, generator=gen)
    for (storage, page_elems, block_table), write in zip(pools, (write_kv, write_kv_reference), strict=True):
        write(storage, page_elems, block_table, 0, k[:, :33].to(DEVICE), v[:, :33].to(DEVICE), block_size)
        start = torch.tensor([33, 33], device=DEVICE)
        write(storage, page_elems, block_table, start, k[:, 33:].to(DEVICE), v[:, 33:].to(DEVICE), block_size)
    assert torch.equal(pools[0][0].nan_to_num(7.0), pools[1][0].nan_to_num(7.0))

    storage, page_elems, block_table = pools[0]
    q = torch.randn(rows, 12, 4, head_dim, generator=gen)
    kv_lens = torch.tensor([45, 45], dtype=torch.int32, device=DEVICE)
    got = paged_attention(q.to(DEVICE), storage, page_elems, block_table, kv_lens, block_size, kv_heads, 0.25)
    expected = oracle(q, list(k), list(v), [45, 45], 0.25)
    torch.testing.assert_close(got.double().cpu(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_torch_matches_reference(dtype):
    """The writes without Triton (a token at a time) leave the pool exactly as the reference's (an
    element at a time): a prefill from 0, a chunk at ragged per-row starts across block boundaries,
    a decode token per row (int32 starts), K/V given in HF's transposed layout."""
    rows, kv_heads, head_dim, block_size = 3, 2, 16, 8
    pools = [empty_pool(rows, 48, kv_heads, head_dim, block_size, dtype, seed=11) for _ in range(2)]
    gen = torch.Generator().manual_seed(12)

    def new_kv(n):  # [rows, n, kv_heads, head_dim], strided as HF's [rows, kv_heads, n, head_dim].transpose(1, 2)
        return [torch.randn(rows, kv_heads, n, head_dim, generator=gen).to(dtype).to(DEVICE).transpose(1, 2) for _ in "kv"]

    writes = [
        (0, *new_kv(13)),
        (torch.tensor([13, 10, 5], device=DEVICE), *new_kv(17)),
        (torch.tensor([30, 27, 22], dtype=torch.int32, device=DEVICE), *new_kv(1)),
    ]
    for (storage, page_elems, block_table), write in zip(pools, (write_kv_torch, write_kv_reference), strict=True):
        for start, k, v in writes:
            write(storage, page_elems, block_table, start, k, v, block_size)
    torch.testing.assert_close(pools[0][0], pools[1][0], atol=0, rtol=0, equal_nan=True)
    distinct_tokens = 31 + 28 + 23  # rows 1 and 2 rewrote some positions of their prefill
    assert int(pools[0][0].isnan().logical_not().sum()) == 2 * distinct_tokens * kv_heads * head_dim


# ----------------------------------------------------------------------------- PagedDecode

DECODE_CASES = {
    # name: (kv_lens incl. the new token, heads, kv_heads, head_dim, block_size, window, pads, num_splits, dtype)
    "gqa_ragged_one_token_row": ([37, 5, 64, 17, 1], 4, 2, 16, 16, None, None, None, torch.float32),
    "mha_split4_left_pad": ([100, 30, 64], 2, 2, 32, 8, None, [0, 2, 10], 4, torch.float32),
    "group3_window_split2": ([50, 33, 9], 6, 2, 16, 16, 12, None, 2, torch.float32),
    "bf16_split8": ([90, 33, 128], 4, 2, 32, 16, None, None, 8, torch.bfloat16),
    "fp16_left_pad": ([24, 24, 24], 4, 2, 16, 16, None, [0, 7, 23], 2, torch.float16),
}


def hf_projections(batch, heads, kv_heads, head_dim, dtype, gen):
    """q [batch, heads, 1, head_dim] and the new k, v [batch, kv_heads, 1, head_dim] as HF attention layers
    hold them: strided views of one fused projection output."""
    fused = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return tuple(t.view(batch, 1, -1, head_dim).transpose(1, 2) for t in (q, k, v))


@pytest.mark.parametrize("case", DECODE_CASES)
def test_paged_decode(case):
    """One decode step: the new token's K/V land at kv_lens - 1 (nothing else in the pool changes) and the
    output is attention over the row's pages plus that token; a second call with new tensors (the
    launcher's direct path on a GPU) is right too."""
    kv_lens, heads, kv_heads, head_dim, block_size, window, pads, num_splits, dtype = DECODE_CASES[case]
    pool = Pool(kv_lens, kv_heads, head_dim, block_size, dtype, seed=len(case))
    storage, page_elems, block_table, lens, _, _ = pool.args()
    token_elems = kv_heads * head_dim
    for b, n in enumerate(kv_lens):  # the new token's slot holds NaN until the call stores the token
        at = int(pool.block_table[b, (n - 1) // block_size]) * page_elems + (n - 1) % block_size * token_elems
        for offset in (at, at + block_size * token_elems):
            storage[offset : offset + token_elems] = float("nan")
    key_mask = None if pads is None else left_pad_mask(kv_lens, pads, max(kv_lens) + 3).to(DEVICE)
    scale, gen, batch = head_dim**-0.5, torch.Generator().manual_seed(2), len(kv_lens)
    plan = PagedDecode(
        storage, page_elems, block_size, batch, heads, kv_heads, head_dim, block_table.shape[1], scale,
        key_mask is not None, window, num_splits,
    )  # fmt: skip
    for _ in range(2):
        q, k, v = hf_projections(batch, heads, kv_heads, head_dim, dtype, gen)
        expected_pool = storage.clone()
        write_kv_reference(
            expected_pool, page_elems, block_table, lens.long() - 1, k.transpose(1, 2), v.transpose(1, 2), block_size
        )
        got = plan(q, k, v, block_table, lens, key_mask)

        torch.testing.assert_close(storage, expected_pool, atol=0, rtol=0, equal_nan=True)
        assert got.shape == (batch, 1, heads, head_dim) and got.dtype == dtype
        ks = [torch.cat([pool.ks[b][: n - 1], k[b, :, 0][None].cpu()]) for b, n in enumerate(kv_lens)]
        vs = [torch.cat([pool.vs[b][: n - 1], v[b, :, 0][None].cpu()]) for b, n in enumerate(kv_lens)]
        mask = None if key_mask is None else key_mask.cpu()
        expected = oracle(q.transpose(1, 2).cpu(), ks, vs, kv_lens, scale, window, mask)
        ref = paged_attention_reference(
            q.transpose(1, 2), storage, page_elems, block_table, lens, block_size, kv_heads, scale, key_mask, window
        )
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got.double().cpu(), expected, atol=tol, rtol=tol)
        torch.testing.assert_close(got.float().cpu(), ref.float().cpu(), atol=tol, rtol=tol)


def test_paged_decode_refuses_what_it_was_not_planned_for():
    pool = Pool([5, 9], 2, 16, 16, torch.float32, seed=11)
    storage, page_elems, block_table, lens, block_size, kv_heads = pool.args()
    plan = PagedDecode(storage, page_elems, block_size, 2, 4, kv_heads, 16, block_table.shape[1], 0.25)
    gen = torch.Generator().manual_seed(3)
    q, k, v = hf_projections(2, 4, kv_heads, 16, torch.float32, gen)
    before = storage.clone()
    with pytest.raises(ValueError, match="planned q"):
        plan(q[:1], k[:1], v[:1], block_table, lens)
    with pytest.raises(ValueError, match="dtypes"):
        plan(q.double(), k, v, block_table, lens)
    with pytest.raises(ValueError, match="block_table"):
        plan(q, k, v, block_table[:, :1], lens)
    with pytest.raises(ValueError, match="kv_lens"):
        plan(q, k, v, block_table, lens[:1])
    with pytest.raises(ValueError, match="planned with no key_mask"):
        plan(q, k, v, block_table, lens, torch.ones(2, 9, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(storage, before, atol=0, rtol=0, equal_nan=True)  # nothing was stored
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        PagedDecode(storage, page_elems, block_size, 2, 3, kv_heads, 16, 2, 0.25)
    with pytest.raises(ValueError, match="page_elems"):
        PagedDecode(storage, 100, block_size, 2, 4, kv_heads, 16, 2, 0.25)
    with pytest.raises(ValueError, match="num_splits"):
        PagedDecode(storage, page_elems, block_size, 2, 4, kv_heads, 16, 2, 0.25, num_splits=3)
    with pytest.raises(ValueError, match="batch >= 1"):
        PagedDecode(storage, page_elems, block_size, 0, 4, kv_heads, 16, 2, 0.25)
    with pytest.raises(ValueError, match="backend must be 'triton', 'torch' or None, got 'cuda'"):
        PagedDecode(storage, page_elems, block_size, 2, 4, kv_heads, 16, 2, 0.25, backend="cuda")


# ----------------------------------------------------------------------------- GPU, serving shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("q_len", [1, 64])
def test_serving_shapes_on_gpu(q_len):
    """Batch 8, 32 query heads on 8 kv heads, head_dim 128, contexts 1000-4000, bf16, compiled."""
    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim, block_size = 8, 32, 8, 128, 16
    kv_lens = torch.randint(1000, 4001, (batch,), dtype=torch.int32)
    max_blocks = math.ceil(4000 / block_size)
    page_elems = 2 * block_size * kv_heads * head_dim + 64
    n_pages = batch * max_blocks + 16
    storage = torch.randn(n_pages * page_elems, device="cuda", dtype=torch.bfloat16)
    block_table = torch.randperm(n_pages, device="cuda")[: batch * max_blocks].view(batch, max_blocks).int()
    kv_lens = kv_lens.cuda()
    q = torch.randn(batch, q_len, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    args = (q, storage, page_elems, block_table, kv_lens, block_size, kv_heads, head_dim**-0.5)
    key_mask = torch.ones(batch, 4000, dtype=torch.bool, device="cuda")
    key_mask[:, :50] = False
    ref = paged_attention_reference(*args)
    for splits in (None, 1):
        got = paged_attention(*args, num_splits=splits)
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    for extra in (dict(sliding_window=1024), dict(key_mask=key_mask)):
        torch.testing.assert_close(
            paged_attention(*args, **extra).float(), paged_attention_reference(*args, **extra).float(),
            atol=2e-2, rtol=2e-2,
        )  # fmt: skip
    # A query 2 bytes off 16-byte alignment after aligned ones: SpecializedLaunch must not reuse the
    # launcher compiled for aligned pointers.
    shifted = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)[1:].view_as(q).copy_(q)
    torch.testing.assert_close(
        paged_attention(shifted, *args[1:]).float(), ref.float(), atol=2e-2, rtol=2e-2
    )

    # write_kv: the kernel and the torch reference write identical pools
    new_k = torch.randn(batch, q_len, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    new_v = torch.randn_like(new_k)
    start = (kv_lens - q_len).long()
    copy = storage.clone()
    write_kv(storage, page_elems, block_table, start, new_k, new_v, block_size)
    write_kv_reference(copy, page_elems, block_table, start, new_k, new_v, block_size)
    assert torch.equal(storage, copy)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [8, 32])
def test_paged_decode_serving_shapes_on_gpu(batch):
    """PagedDecode as a decode step runs it: one plan, several layers' tables in a row (the launcher's
    direct path), bf16, 32 query heads on 8 kv heads, contexts 1000-4000 (split at batch 8, not at 32),
    with and without a key mask and a window, and a query off 16-byte alignment (Triton's path)."""
    torch.manual_seed(1)
    heads, kv_heads, head_dim, block_size, layers = 32, 8, 128, 16, 3
    lens = torch.randint(1000, 4001, (batch,), dtype=torch.int32, device="cuda")
    max_blocks = math.ceil(4000 / block_size)
    page_elems = 2 * block_size * kv_heads * head_dim + 64
    n_pages = layers * batch * max_blocks + 16
    storage = torch.randn(n_pages * page_elems, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(n_pages, device="cuda")[: layers * batch * max_blocks].view(layers, batch, max_blocks)
    tables = tables.int()
    key_mask = torch.ones(batch, 4000, dtype=torch.bool, device="cuda")
    key_mask[:, :50] = False
    for mask, window in ((None, None), (key_mask, None), (key_mask, 1024)):
        plan = PagedDecode(
            storage, page_elems, block_size, batch, heads, kv_heads, head_dim, max_blocks, head_dim**-0.5,
            mask is not None, window,
        )  # fmt: skip
        for layer in range(layers):
            q, k, v = hf_projections(batch, heads, kv_heads, head_dim, torch.bfloat16, None)
            if layer == layers - 1:  # 2 bytes off 16-byte alignment
                q = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)[1:].view_as(q).copy_(q)
            expected_pool = storage.clone()
            position = lens.long() - 1
            write_kv_reference(
                expected_pool, page_elems, tables[layer], position, k.transpose(1, 2), v.transpose(1, 2), block_size
            )
            ref = paged_attention_reference(
                q.transpose(1, 2), expected_pool, page_elems, tables[layer], lens, block_size, kv_heads,
                head_dim**-0.5, mask, window,
            )  # fmt: skip
            got = plan(q, k, v, tables[layer], lens, mask)
            assert torch.equal(storage, expected_pool)
            torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def reference_logits(q, ks, kv_lens, scale, key_mask, width):
    """Each decode query's score of each key, in the log2 domain (q . k * scale * log2(e)), -inf where
    the key mask hides the key, and `width` slots per row (the rest left as the sentinel 7.0)."""
    batch, _, heads, _ = q.shape
    out = torch.full((batch, heads, width), 7.0, dtype=torch.float64)
    for b, n in enumerate(kv_lens):
        group = heads // ks[b].shape[1]
        keys = ks[b].double().repeat_interleave(group, 1)  # [n, heads, dim]
        s = torch.einsum("hd,nhd->hn", q[b, 0].double(), keys) * scale * math.log2(math.e)
        if key_mask is not None:
            s = s.masked_fill(~key_mask[b, :n][None, :], float("-inf"))
        out[b, :, :n] = s
    return out


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_stores_each_keys_logit_for_eviction(num_splits):
    """Heavy-hitter eviction reads the scores the attention computed anyway: the kernel stores them for
    every key of every row (GQA, ragged rows, left padding, any split), and nothing past a row's length."""
    kv_lens = [70, 23, 41]
    pool = Pool(kv_lens, 2, 16, 8, torch.float32, seed=9)
    q = torch.randn(3, 1, 4, 16, generator=torch.Generator().manual_seed(2))
    key_mask = left_pad_mask(kv_lens, [0, 5, 2], max(kv_lens) + 3)
    logits = torch.full((3, 4, max(kv_lens) + 4), 7.0, device=DEVICE)
    out = paged_attention(q.to(DEVICE), *pool.args(), 0.25, key_mask=key_mask.to(DEVICE), num_splits=num_splits,
                          logits=logits)  # fmt: skip
    expected = reference_logits(q, pool.ks, kv_lens, 0.25, key_mask, logits.shape[2])
    got = logits.double().cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(expected)) and torch.isinf(got).any()
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cpu(), paged_attention(q.to(DEVICE), *pool.args(), 0.25,
                                                          key_mask=key_mask.to(DEVICE)).cpu())  # fmt: skip
    with pytest.raises(ValueError, match="one query token per row"):
        paged_attention(torch.randn(3, 2, 4, 16).to(DEVICE), *pool.args(), 0.25, logits=logits)
    with pytest.raises(ValueError, match="logits must be fp32"):
        paged_attention(q.to(DEVICE), *pool.args(), 0.25, logits=logits.double())
