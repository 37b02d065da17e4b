"""SGMV: many LoRA adapters applied to one batch in two launches (shrink, then expand).

Semantics (Punica's SGMV), for every token t whose adapter slot a_t is not -1:
    shrink:  v[t]  = x[t] @ A[a_t].T                    (A: [rank, in])
    expand:  y[t] += (v[t] @ B[a_t].T) * scale[a_t]     (B: [out, rank])
Tokens with slot -1 are never read or written.

Adapter weights are NOT passed as stacked per-adapter tensors. Both matrices are stored
rank-row-major -- A as [rank, in], B transposed as [rank, out] -- and each rank row is one
contiguous vector somewhere in one flat storage tensor `weights` (in practice: the pages of the
unified page pool). `rows[i]` is the element offset of row i; `locations[s, slot] = (a_row, b_row,
rank)` says that row r of the adapter's A is `rows[a_row + r]` (B likewise); `scales[s, slot]` is
the LoRA scale. So pages can be handed out without a copy, an adapter takes memory in proportion to
its real rank, and rows need not be adjacent. Row offsets are multiples of WEIGHT_ALIGN elements:
the kernels then read weights with 16-byte vector loads (an offset loaded from memory otherwise
counts as unaligned, and every weight would be read one element per instruction). `s` indexes slices: several projections
that share their input (q/k/v, gate/up) run in one launch. rank 0 means "this adapter does not
target this slice": its tokens get nothing added.

Tokens are grouped by adapter once per forward (`plan_sgmv`); every layer reuses the plan, and a
prepared call (ShrinkCall / ExpandCall) resolves the location table per tile once, so a kernel
program finds its adapter's rows without first looking up its slot. The
kernels work on tiles of up to `block_m` tokens of one adapter, so a long prefill segment uses
tensor-core tiles and decode (one token per row, all adapters distinct) costs one small tile per
row. A decode shrink gives each program one rank row of A to read whole (long contiguous reads,
no partials); a prefill shrink splits its reduction over the input dimension when there are too
few tiles to fill the GPU, writing one partial per split that expand sums (no atomics, no zero
fill).

Decode kernels take a few microseconds, so on Hopper and later they are launched with programmatic
dependent launch (see launch.py): every program lets the next kernel start at once
(`_let_next_kernel_start`), so a kernel starts while the one before it still runs, puts its
weight loads in flight, and only then waits for that kernel (`_wait_prior_kernel`) before it reads
x or v or writes anything; expand so streams B while shrink still computes v. Before the wait a
kernel reads only what its prepared call was made with -- weights, row, location and scale tables,
the plan -- which is complete before the call's first launch (an ordinary one). Every program
waits before it ends, also one with nothing to do, so a kernel that has finished implies that the
kernels before it have too. Prefill kernels run for tens of microseconds and keep ordinary
launches: PDL would save a microsecond or two there, and a wait inside their `tl.dot` loops could
stop Triton from pipelining them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .launch import BoundLaunch, pdl_supported, shallow_copy

LOCATION_FIELDS = 3  # a_offset, b_offset, rank
RANK_TILE = 16  # tensor-core granularity of the rank dimension; compute rounds ranks up to this
_TARGET_PROGRAMS = 512  # enough programs in flight to cover ~132 SMs a few times
_GEMV_SEGMENT = 4  # adapters with at most this many tokens in a batch go through 1-token (GEMV) tiles
MAX_SPLIT = 16  # most split-K partials a shrink writes; expand sums them in one load
WEIGHT_ALIGN = 8  # elements; every a_offset / b_offset in a location table is a multiple of this
_GEMV_BLOCK_K = 4096  # decode shrink: one program reads a whole rank row of A in one sweep


def align_up(n: int) -> int:
    """The first offset >= n at which a matrix may start in the flat weight storage."""
    return -(-n // WEIGHT_ALIGN) * WEIGHT_ALIGN


@dataclass(frozen=True)
class SgmvPlan:
    """Per-forward token grouping, shared by every LoRA layer of the model.

    `tiles` rows are (slot, start, end): the tile covers sorted_tokens[start : min(start+block_m, end)].
    """

    num_tokens: int
    token_slots: torch.Tensor  # [T] int32, adapter slot of each token, -1 for none
    sorted_tokens: torch.Tensor  # [T_active] int32, token indices grouped by slot
    tiles: torch.Tensor  # [3, num_tiles] int32
    num_tiles: int
    block_m: int
    max_rank: int
    slots: tuple[int, ...]  # distinct slots present in the batch


def plan_sgmv(
    row_slots: Sequence[int], tokens_per_row: int, max_rank: int, device: torch.device | str
) -> SgmvPlan:
    """Group the tokens of a [rows, tokens_per_row] batch by adapter slot.

    Built on the host from host-known row slots, then moved with ONE pinned, non-blocking copy:
    no device->host synchronisation.
    """
    if tokens_per_row < 0:
        raise ValueError(f"tokens_per_row must be >= 0, got {tokens_per_row}")
    slots = torch.tensor(list(row_slots), dtype=torch.int64)
    n_rows = slots.numel()
    per_token = torch.arange(tokens_per_row, dtype=torch.int64)
    token_slots = slots.repeat_interleave(tokens_per_row)

    order = torch.argsort(slots, stable=True)
    order = order[slots[order] >= 0]
    sorted_tokens = (order[:, None] * tokens_per_row + per_token).reshape(-1)
    present, rows_per_slot = torch.unique_consecutive(slots[order], return_counts=True)
    seg_len = rows_per_slot * tokens_per_row
    longest = int(seg_len.max()) if seg_len.numel() else 0
    block_m = 1 if longest <= _GEMV_SEGMENT else 16 if longest <= 16 else 32 if longest <= 32 else 64

    seg_end = torch.cumsum(seg_len, 0)
    seg_start = seg_end - seg_len
    tiles_per_seg = (seg_len + block_m - 1) // block_m
    tile_seg = torch.repeat_interleave(torch.arange(present.numel()), tiles_per_seg)
    first_tile = torch.cumsum(tiles_per_seg, 0) - tiles_per_seg
    tile_in_seg = torch.arange(tile_seg.numel()) - first_tile[tile_seg]
    tiles = torch.stack([present[tile_seg], seg_start[tile_seg] + tile_in_seg * block_m, seg_end[tile_seg]])

    packed = torch.cat([token_slots, sorted_tokens, tiles.reshape(-1)]).to(torch.int32)
    if torch.device(device).type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    n_tokens, n_active, n_tiles = n_rows * tokens_per_row, sorted_tokens.numel(), tile_seg.numel()
    return SgmvPlan(
        num_tokens=n_tokens,
        token_slots=packed[:n_tokens],
        sorted_tokens=packed[n_tokens : n_tokens + n_active],
        tiles=packed[n_tokens + n_active :].view(3, n_tiles),
        num_tiles=n_tiles,
        block_m=block_m,
        max_rank=max_rank,
        slots=tuple(present.tolist()),
    )


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _matmul(a, b, DOT_IN_FP32: tl.constexpr):
    """a @ b in fp32. Tiles of fewer than 16 rows (decode: one token per adapter) are a GEMV:
    a broadcast product and a reduction, since a tensor-core tile would be mostly masked rows."""
    if a.shape[0] < 16:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    elif DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _let_next_kernel_start(USE_PDL: tl.constexpr):
    """Under PDL, at a program's start: the next kernel may be scheduled now and load its weights
    while this one runs (it waits for this one before it touches anything this one writes)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _wait_prior_kernel(USE_PDL: tl.constexpr):
    """Under PDL: wait until the kernel before this one has finished and its writes are visible.
    Repeated calls cost next to nothing; without PDL this is no code at all."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _tile_tokens(tiles_ptr, sorted_ptr, tile, num_tiles, BLOCK_M: tl.constexpr):
    """Token indices of a tile and their mask. One-token tiles follow sorted order one token each,
    so tile i's token is sorted[i]: decode skips a dependent load of the tile's start."""
    if BLOCK_M == 1:
        start = tile
        end = tile + 1
    else:
        start = tl.load(tiles_ptr + num_tiles + tile)
        end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    return tl.load(sorted_ptr + offs_m, mask=m_mask, other=0).to(tl.int64), m_mask


@triton.jit(  # shape-dependent scalars and table pointers: see kernels/launch.py
    do_not_specialize=["num_tiles", "v_stride_split", "v_stride_s", "loc_stride_s", "loc_stride_tile"],
    do_not_specialize_on_alignment=["loc_ptr", "tiles_ptr", "sorted_ptr"],
)
def _sgmv_shrink_kernel(
    x_ptr,
    w_ptr,
    rows_ptr,
    loc_ptr,
    tiles_ptr,
    sorted_ptr,
    v_ptr,
    num_tiles,
    K,
    k_per_split,
    x_stride,
    loc_stride_s,
    loc_stride_tile,
    v_stride_split,
    v_stride_s,
    v_stride_t,
    v_width,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    ALIGN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    _let_next_kernel_start(USE_PDL)
    s = tl.program_id(1) % NUM_SLICES
    split = tl.program_id(1) // NUM_SLICES
    r_block = tl.program_id(2)

    loc = loc_ptr + s * loc_stride_s + tile * loc_stride_tile
    rank = tl.minimum(tl.load(loc + 2).to(tl.int32), v_width)  # memory safety if max_rank was too small
    if r_block * BLOCK_R >= rank:
        _wait_prior_kernel(USE_PDL)
        return
    tok, m_mask = _tile_tokens(tiles_ptr, sorted_ptr, tile, num_tiles, BLOCK_M)
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_rows = tl.multiple_of(tl.load(rows_ptr + tl.load(loc) + offs_r, mask=r_mask, other=0), ALIGN)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_begin = split * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a_tile = tl.load(
            w_ptr + a_rows[None, :] + offs_k[:, None],
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        _wait_prior_kernel(USE_PDL)  # x may be the previous kernel's output
        x_tile = tl.load(
            x_ptr + tok[:, None] * x_stride + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc += _matmul(x_tile, a_tile, DOT_IN_FP32)

    v_out = v_ptr + split * v_stride_split + s * v_stride_s + tok[:, None] * v_stride_t + offs_r[None, :]
    tl.store(v_out, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(  # shape-dependent scalars and table pointers: see kernels/launch.py
    do_not_specialize=[
        "num_tiles", "v_stride_split", "v_stride_s", "loc_stride_s", "loc_stride_tile", "scale_stride_s",
        "scale_stride_tile", "num_splits",
    ],
    do_not_specialize_on_alignment=["loc_ptr", "scale_ptr", "tiles_ptr", "sorted_ptr"],
)
def _sgmv_expand_kernel(
    y_ptr,
    v_ptr,
    w_ptr,
    rows_ptr,
    loc_ptr,
    scale_ptr,
    tiles_ptr,
    sorted_ptr,
    slices_ptr,
    num_tiles,
    v_stride_split,
    v_stride_s,
    v_stride_t,
    v_width,
    loc_stride_s,
    loc_stride_tile,
    scale_stride_s,
    scale_stride_tile,
    num_splits,
    SPLIT_TILE: tl.constexpr,  # split-K partials summed per load (see ExpandCall)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    ALIGN: tl.constexpr,
    SLICE_ALIGN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    _let_next_kernel_start(USE_PDL)
    s = tl.program_id(1)
    n_block = tl.program_id(2)

    y_first = tl.multiple_of(tl.load(slices_ptr + 3 * s), SLICE_ALIGN)  # the slice's [0, 0] from y_ptr
    width = tl.multiple_of(tl.load(slices_ptr + 3 * s + 1).to(tl.int32), SLICE_ALIGN)
    y_stride = tl.multiple_of(tl.load(slices_ptr + 3 * s + 2), SLICE_ALIGN)
    if n_block * BLOCK_N >= width:
        _wait_prior_kernel(USE_PDL)
        return
    loc = loc_ptr + s * loc_stride_s + tile * loc_stride_tile
    rank = tl.minimum(tl.load(loc + 2).to(tl.int32), v_width)
    if rank == 0:
        _wait_prior_kernel(USE_PDL)
        return
    b_first = tl.load(loc + 1)
    scale = tl.load(scale_ptr + s * scale_stride_s + tile * scale_stride_tile)
    tok, m_mask = _tile_tokens(tiles_ptr, sorted_ptr, tile, num_tiles, BLOCK_M)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        b_rows = tl.multiple_of(tl.load(rows_ptr + b_first + offs_r, mask=r_mask, other=0), ALIGN)
        b_tile = tl.load(
            w_ptr + b_rows[:, None] + offs_n[None, :],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        _wait_prior_kernel(USE_PDL)  # v is the shrink's output, y the base layer's
        # The split-K partials SPLIT_TILE at a time, then a register reduction: a decode tile loads
        # them all at once (a loop of dependent loads here made decode expands latency-bound). The
        # count is an argument: as a constexpr, each new count compiled a kernel in serving.
        v_rows = v_ptr + s * v_stride_s + tok[:, None] * v_stride_t + offs_r[None, :]
        v_mask = (m_mask[:, None] & r_mask[None, :])[None, :, :]
        v_tile = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s0 in range(0, num_splits, SPLIT_TILE):
            splits = s0 + tl.arange(0, SPLIT_TILE)
            v_tile += tl.sum(
                tl.load(v_rows[None, :, :] + splits[:, None, None] * v_stride_split,
                        mask=v_mask & (splits < num_splits)[:, None, None], other=0.0),
                axis=0,
            )  # fmt: skip
        acc += _matmul(v_tile.to(b_tile.dtype), b_tile, DOT_IN_FP32)

    y_tile_ptr = y_ptr + y_first + tok[:, None] * y_stride + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    y_tile = tl.load(y_tile_ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_tile_ptr, (y_tile + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _check_inputs(x: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, locations: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            f"expected a 2-D row-major activation, got shape {tuple(x.shape)} stride {x.stride()}"
        )
    if weights.dim() != 1 or weights.dtype != x.dtype:
        raise ValueError(f"weights must be 1-D of the activation dtype {x.dtype}, got {weights.dtype}")
    if locations.dim() != 3 or locations.shape[2] != LOCATION_FIELDS or locations.dtype != torch.int64:
        raise ValueError(f"locations must be int64 [slices, slots, {LOCATION_FIELDS}], got {locations.shape}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be a 1-D int64 tensor of row offsets, got {rows.dtype} {tuple(rows.shape)}")


def tile_view(table: torch.Tensor, plan: SgmvPlan) -> torch.Tensor:
    """`table[s, slot, ...]` resolved per tile of the plan: `[s, tile, ...]` (a device gather, no
    sync). Prepared calls keep this snapshot, so the slots they use must not change under them."""
    return table.index_select(1, plan.tiles[0])


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs get exact (IEEE) products rather than tf32. The Triton interpreter computes bf16
    dots wrongly (seen with triton 3.9), so there bf16 tiles are widened first; the rounding points
    stay those of the compiled kernel."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _use_pdl(plan: SgmvPlan, device: torch.device) -> bool:
    """Decode kernels (one-token tiles) get programmatic dependent launch where the GPU has it; see
    the module doc."""
    return plan.block_m == 1 and pdl_supported(device)


def _shrink_split(num_programs: int, k_blocks: int) -> int:
    split = 1
    while num_programs * split * 2 <= _TARGET_PROGRAMS and split * 2 <= min(k_blocks, MAX_SPLIT):
        split *= 2
    return split


@dataclass(frozen=True)
class _ShrinkGeometry:
    block_k: int
    block_r: int  # rank rows per program
    splits: int  # split-K partials written
    width: int  # v's last dimension (the plan's max rank)
    num_warps: int


def _shrink_geometry(plan: SgmvPlan, n_slices: int, k: int) -> _ShrinkGeometry:
    """Decode tiles (one token) give each program one rank row of A to read whole: long contiguous
    reads, no partials. Longer tiles use tensor-core tiles of RANK_TILE rows, split over K when
    there are too few tiles to fill the GPU."""
    width = max(plan.max_rank, 1)
    if plan.block_m == 1:
        block_k = min(_GEMV_BLOCK_K, max(16, triton.next_power_of_2(k)))
        return _ShrinkGeometry(block_k, 1, 1, width, num_warps=8)
    block_k = 128 if k >= 128 else max(16, triton.next_power_of_2(k))
    r_blocks = triton.cdiv(width, RANK_TILE)
    split = _shrink_split(plan.num_tiles * n_slices * r_blocks, triton.cdiv(k, block_k))
    return _ShrinkGeometry(block_k, RANK_TILE, split, width, num_warps=4)


def shrink_workspace_numel(plan: SgmvPlan, n_slices: int, in_features: int | None = None) -> int:
    """fp32 elements a shrink of this plan needs for its output (see ShrinkCall's `out`); without
    `in_features`, the most any input width needs."""
    geometry = _shrink_geometry(plan, n_slices, in_features or 16 * 128)
    return geometry.splits * n_slices * plan.num_tokens * geometry.width


class ShrinkCall:
    """A shrink planned once for (plan, weights, locations, input width); calling it with an input
    launches: v = x @ A[slot].T for every slice, as fp32 partials [splits, slices, T, max_rank].

    Entries of tokens without adapter, or beyond an adapter's rank, are left unwritten. `out`, a
    flat fp32 workspace of at least `shrink_workspace_numel` elements, holds v when given.
    """

    def __init__(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        rows: torch.Tensor,
        locations: torch.Tensor,
        plan: SgmvPlan,
        out: torch.Tensor | None = None,
        tile_locations: torch.Tensor | None = None,  # [slices, num_tiles, LOCATION_FIELDS]: given per tile
    ) -> None:
        _check_inputs(x, weights, rows, locations)
        n_tokens, k = x.shape
        n_slices = locations.shape[0]
        g = _shrink_geometry(plan, n_slices, k)
        shape = (g.splits, n_slices, n_tokens, g.width)
        if out is None:
            self.v = torch.empty(shape, dtype=torch.float32, device=x.device)
        else:
            self.v = out[: g.splits * n_slices * n_tokens * g.width].view(shape)
        self._launch = None
        if plan.num_tiles:
            k_per_split = triton.cdiv(triton.cdiv(k, g.splits), g.block_k) * g.block_k
            if tile_locations is None:
                tile_locations = tile_view(locations, plan)
            args = dict(
                x_ptr=x,  # [T, K] the activation (row-major)
                w_ptr=weights,  # [pool elements] the pool storage holding the rank rows
                rows_ptr=rows,  # [rows] int64 element offset of each rank row
                loc_ptr=tile_locations,  # [slices, tiles, LOCATION_FIELDS] each tile's adapter rows
                tiles_ptr=plan.tiles,  # [3, tiles] int32 (slot, start, end)
                sorted_ptr=plan.sorted_tokens,  # [T_active] int32 tokens grouped by slot
                v_ptr=self.v,  # [splits, slices, T, width] fp32 out
                num_tiles=plan.num_tiles, K=k, k_per_split=k_per_split, x_stride=x.stride(0),
                loc_stride_s=tile_locations.stride(0), loc_stride_tile=tile_locations.stride(1),
                v_stride_split=self.v.stride(0), v_stride_s=self.v.stride(1), v_stride_t=self.v.stride(2),
                v_width=g.width,
            )  # fmt: skip
            pdl = _use_pdl(plan, x.device)
            constexprs = dict(
                NUM_SLICES=n_slices, BLOCK_M=plan.block_m, BLOCK_K=g.block_k, BLOCK_R=g.block_r,
                DOT_IN_FP32=_dot_in_fp32(x.dtype), ALIGN=WEIGHT_ALIGN, USE_PDL=pdl,
            )  # fmt: skip
            grid = (plan.num_tiles, g.splits * n_slices, triton.cdiv(g.width, g.block_r))
            self._launch = BoundLaunch(_sgmv_shrink_kernel, grid, args, constexprs, g.num_warps, pdl)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._launch is not None:
            self._launch(x)
        return self.v

    def variant(self, tile_locations: torch.Tensor) -> ShrinkCall:
        """This shrink for other slices of the same shape (another group of modules under the same
        plan, its locations per tile): prepared from this one, its compiled launch shared."""
        clone = shallow_copy(self)
        if self._launch is not None:
            clone._launch = self._launch.variant(loc_ptr=tile_locations)
        return clone


def sgmv_shrink(
    x: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, locations: torch.Tensor, plan: SgmvPlan
) -> torch.Tensor:
    """One-shot shrink; see ShrinkCall."""
    return ShrinkCall(x, weights, rows, locations, plan)(x)


@lru_cache(maxsize=256)
def _device_slices(slices: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(slices, dtype=torch.int64, device=device)


def _output_slices(
    y: torch.Tensor | Sequence[torch.Tensor],
    slice_offsets: Sequence[int] | None,
    weights: torch.Tensor,
    rows: torch.Tensor,
    locations: torch.Tensor,
) -> tuple[tuple[int, int, int], ...]:
    """Per slice: (its [0, 0] element's distance from the first output's, in elements; its width;
    its row stride), the inputs checked. y is one tensor whose columns the slices are, or a tensor
    per slice."""
    n_slices = locations.shape[0]
    for output in [y] if isinstance(y, torch.Tensor) else y:
        _check_inputs(output, weights, rows, locations)
    if isinstance(y, torch.Tensor):
        offsets = _slice_offsets(y, slice_offsets, n_slices)
        return tuple((a, b - a, y.stride(0)) for a, b in itertools.pairwise(offsets))
    if slice_offsets is not None or len(y) != n_slices:
        raise ValueError(f"a tensor per slice: {n_slices} outputs and no slice_offsets, got {len(y)} and {slice_offsets}")
    first = y[0]
    for t in y:
        if (t.dtype, t.device, t.shape[:1]) != (first.dtype, first.device, first.shape[:1]) or (
            t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        ):
            raise ValueError("the outputs of one expand must be views of one buffer, of one dtype and row count")
    return _placement(y)


def _placement(y: Sequence[torch.Tensor]) -> tuple[tuple[int, int, int], ...]:
    first = y[0].data_ptr()
    return tuple(((t.data_ptr() - first) // t.element_size(), t.shape[1], t.stride(0)) for t in y)


def _slice_offsets(y: torch.Tensor, slice_offsets: Sequence[int] | None, n_slices: int) -> tuple[int, ...]:
    offsets = (0, y.shape[1]) if slice_offsets is None else tuple(slice_offsets)
    if len(offsets) != n_slices + 1 or offsets[-1] > y.shape[1] or list(offsets) != sorted(offsets):
        raise ValueError(
            f"slice_offsets {offsets} do not describe {n_slices} slices of y's {y.shape[1]} columns"
        )
    return offsets


class ExpandCall:
    """An expand planned once; calling it with y adds, in place,
    y[t, cols of slice s] += (sum of v partials)[s, t] @ B[slot].T * scale.

    `slice_offsets` (host ints, slices+1 of them) gives each slice's columns in y; default: one
    slice spanning all of y. Or y is a sequence of a tensor per slice, views of one buffer (sibling
    projections' outputs from one `decode_linear` launch): one launch then expands them all,
    addressing each from the first by its distance in memory, which every call must bring again.
    """

    def __init__(
        self,
        y: torch.Tensor | Sequence[torch.Tensor],
        v: torch.Tensor,
        weights: torch.Tensor,
        rows: torch.Tensor,
        locations: torch.Tensor,
        scales: torch.Tensor,
        plan: SgmvPlan,
        slice_offsets: Sequence[int] | None = None,
        tile_tables: tuple[torch.Tensor, torch.Tensor] | None = None,  # (locations, scales) per tile
    ) -> None:
        slices = _output_slices(y, slice_offsets, weights, rows, locations)
        self._slices = None if isinstance(y, torch.Tensor) else slices  # what each call's outputs must repeat
        first = y if isinstance(y, torch.Tensor) else y[0]
        self._launch = None
        if plan.num_tiles:
            widest = max(width for _, width, _ in slices)
            block_n = 128 if widest >= 128 else max(16, triton.next_power_of_2(widest))
            tile_locations, tile_scales = tile_tables or (tile_view(locations, plan), tile_view(scales, plan))
            args = dict(
                y_ptr=first,  # [T, width] updated in place (the first output: the slices' addresses start here)
                v_ptr=v,  # [splits, slices, T, width] fp32, the shrink's partials
                w_ptr=weights,  # [pool elements] the pool storage holding the rank rows
                rows_ptr=rows,  # [rows] int64 element offset of each rank row
                loc_ptr=tile_locations,  # [slices, tiles, LOCATION_FIELDS] each tile's adapter rows
                scale_ptr=tile_scales,  # [slices, tiles] fp32
                tiles_ptr=plan.tiles,  # [3, tiles] int32 (slot, start, end)
                sorted_ptr=plan.sorted_tokens,  # [T_active] int32 tokens grouped by slot
                slices_ptr=_device_slices(slices, first.device),  # [slices, 3] int64 (first element, width, row stride)
                num_tiles=plan.num_tiles,
                v_stride_split=v.stride(0), v_stride_s=v.stride(1), v_stride_t=v.stride(2), v_width=v.shape[3],
                loc_stride_s=tile_locations.stride(0), loc_stride_tile=tile_locations.stride(1),
                scale_stride_s=tile_scales.stride(0), scale_stride_tile=tile_scales.stride(1),
                num_splits=v.shape[0],
            )  # fmt: skip
            pdl = _use_pdl(plan, first.device)
            constexprs = dict(
                # all MAX_SPLIT partials of a decode tile in one load; 4,096 values of larger tiles per load
                SPLIT_TILE=min(MAX_SPLIT, 256 // plan.block_m), BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=RANK_TILE,
                DOT_IN_FP32=_dot_in_fp32(first.dtype), ALIGN=WEIGHT_ALIGN,
                SLICE_ALIGN=WEIGHT_ALIGN if all(n % WEIGHT_ALIGN == 0 for entry in slices for n in entry) else 1,
                USE_PDL=pdl,
            )  # fmt: skip
            grid = (plan.num_tiles, len(slices), triton.cdiv(widest, block_n))
            # A decode tile is one row: a single warp per 128 columns keeps the most loads in flight.
            num_warps = 1 if plan.block_m == 1 else 4
            self._launch = BoundLaunch(_sgmv_expand_kernel, grid, args, constexprs, num_warps, pdl)

    def __call__(self, y: torch.Tensor | Sequence[torch.Tensor]) -> None:
        if self._slices is not None:
            # placement alone (a few host operations, every call): the addresses are all the kernel uses
            if isinstance(y, torch.Tensor) or _placement(y) != self._slices:
                raise ValueError("outputs placed otherwise than the ones this expand was planned for")
            y = y[0]
        elif not isinstance(y, torch.Tensor):
            raise ValueError("this expand was planned for one output tensor")
        if self._launch is not None:
            self._launch(y)

    def variant(self, v: torch.Tensor, tile_tables: tuple[torch.Tensor, torch.Tensor]) -> ExpandCall:
        """This expand from other shrink partials `v` and for another slice (its (locations, scales)
        per tile), each of the shape of the ones it replaces: prepared from this one, its compiled
        launch shared."""
        clone = shallow_copy(self)
        if self._launch is not None:
            clone._launch = self._launch.variant(v_ptr=v, loc_ptr=tile_tables[0], scale_ptr=tile_tables[1])
        return clone


def sgmv_expand(
    y: torch.Tensor | Sequence[torch.Tensor],
    v: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    locations: torch.Tensor,
    scales: torch.Tensor,
    plan: SgmvPlan,
    slice_offsets: Sequence[int] | None = None,
) -> None:
    """One-shot expand; see ExpandCall."""
    ExpandCall(y, v, weights, rows, locations, scales, plan, slice_offsets)(y)


# ----------------------------------------------------------------------------- without Triton


_MERGE_MACS = 1 << 18  # below this many multiply-adds, one product over all adapters beats one per adapter

# One product of a group: (columns of y, A.T [in, r], B.T * scale [r, width], and when the product
# spans several adapters, bool [tokens, r]: the columns of v each token keeps, its adapter's).
_Product = tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]
_Tokens = slice | torch.Tensor  # a run of tokens, or their indices


class TorchLora:
    """shrink then expand (`sgmv_shrink_reference` + `sgmv_expand_reference`) for one module on a
    device without Triton (a CPU): y[t, slice s] += x[t] @ A.T @ B.T * scale, in fp32, y rounded once.

    Why not the references: there every torch op costs microseconds of host time, and they gather
    each adapter's matrices from the weight rows and group the tokens at every call. Here a slot's
    matrices are gathered at its first use and kept (fp32, the scale folded into B), and the tokens
    are grouped once per plan. Per (adapter, slice) a call is then two dense ops when the adapter's
    tokens are one run (consecutive rows of a [rows, tokens] batch): views of x and y, updated in
    place; otherwise a gather and a scatter. Where the products are tiny (decode: a few tokens per
    adapter), one product spans all the adapters, each token masked to its adapter's columns of v:
    three ops per slice, however many adapters. Tokens of no adapter are never touched, so their
    rows stay exactly the base output.

    The kept matrices are those the tables named at first use: make a new TorchLora when a slot is
    given another adapter (the runtime keys them on the adapter cache's version).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        rows: torch.Tensor,
        locations: torch.Tensor,
        scales: torch.Tensor,
        in_features: int,
        slice_offsets: Sequence[int],
    ) -> None:
        self._weights, self._rows, self._in_features = weights, rows, in_features
        self._locations, self._scales, self._offsets = locations, scales, tuple(slice_offsets)
        self._matrices: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self._plan: SgmvPlan | None = None
        self._shapes: tuple[torch.Size, torch.Size] | None = None
        self._groups: list[tuple[_Tokens, list[_Product]]] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plan: SgmvPlan) -> None:
        """Add the delta of `plan`'s adapters to y [tokens, out] (row-major) for x [tokens, in], in place.
        The inputs are checked when the plan changes; later calls must bring the same shapes."""
        if plan is not self._plan:
            _check_inputs(x, self._weights, self._rows, self._locations)
            _check_inputs(y, self._weights, self._rows, self._locations)
            _slice_offsets(y, self._offsets, self._locations.shape[0])
            if x.shape[1] != self._in_features or not x.shape[0] == y.shape[0] == plan.num_tokens:
                raise ValueError(
                    f"x {tuple(x.shape)} and y {tuple(y.shape)} do not fit the plan's {plan.num_tokens} "
                    f"tokens of {self._in_features} features"
                )
            self._groups, self._plan, self._shapes = self._group(plan, x.device), plan, (x.shape, y.shape)
        elif (x.shape, y.shape) != self._shapes:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} for a plan prepared with {self._shapes}")
        for tokens, products in self._groups:
            x_tokens = x[tokens].float()
            for columns, a_t, b_scaled, keep in products:
                v = x_tokens @ a_t
                if keep is not None:
                    v = torch.where(keep, v, 0.0)
                target = y[:, columns]
                if isinstance(tokens, slice) and y.dtype == torch.float32:
                    target[tokens].addmm_(v, b_scaled)
                else:
                    target[tokens] = torch.addmm(target[tokens].float(), v, b_scaled).to(y.dtype)

    def _group(self, plan: SgmvPlan, device: torch.device) -> list[tuple[_Tokens, list[_Product]]]:
        """(tokens, products) per adapter of the plan that targets this module, or one group for all
        of them where its products are small."""
        runs = [(slot, tokens) for slot, tokens in _token_runs(plan, device) if self._slot_matrices(slot)]
        n_tokens = sum(_count(tokens) for _, tokens in runs)
        merged_macs = n_tokens * sum(
            a_t.shape[1] * (a_t.shape[0] + b.shape[1]) for slot, _ in runs for _, a_t, b in self._matrices[slot]
        )
        if len(runs) > 1 and merged_macs <= _MERGE_MACS:
            return [self._merged(plan, [slot for slot, _ in runs], device)]
        return [
            (tokens, [(self._columns(s), a_t, b, None) for s, a_t, b in self._matrices[slot]]) for slot, tokens in runs
        ]

    def _merged(self, plan: SgmvPlan, slots: list[int], device: torch.device) -> tuple[_Tokens, list[_Product]]:
        """One group for the tokens of `slots`: per slice, their A and B concatenated along the rank."""
        token_slots = plan.token_slots.cpu().long()
        active = torch.isin(token_slots, torch.tensor(slots)).nonzero().squeeze(1)
        first, end = int(active[0]), int(active[-1]) + 1
        tokens = slice(first, end) if end - first == active.numel() else active.to(device)
        products = []
        for s in range(len(self._offsets) - 1):
            parts = [(slot, a_t, b) for slot in slots for t, a_t, b in self._matrices[slot] if t == s]
            if parts:
                owner = torch.cat([torch.full((a_t.shape[1],), slot) for slot, a_t, _ in parts])
                keep = (token_slots[active, None] == owner).to(device)
                a_t, b = torch.cat([a_t for _, a_t, _ in parts], 1), torch.cat([b for *_, b in parts])
                products.append((self._columns(s), a_t, b, keep))
        return tokens, products

    def _slot_matrices(self, slot: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(slice, A.T [in, rank], B.T * scale [rank, width]) per slice the slot's adapter targets."""
        if slot not in self._matrices:
            matrices = []
            locations, scales = self._locations[:, slot].tolist(), self._scales[:, slot].tolist()
            for s, ((a_row, b_row, rank), scale) in enumerate(zip(locations, scales, strict=True)):
                if rank:
                    width = self._offsets[s + 1] - self._offsets[s]
                    a = _matrix(self._weights, self._rows, a_row, rank, self._in_features).float()
                    b_t = _matrix(self._weights, self._rows, b_row, rank, width).float()
                    matrices.append((s, a.T, b_t * scale))
            self._matrices[slot] = matrices
        return self._matrices[slot]

    def _columns(self, s: int) -> slice:
        return slice(self._offsets[s], self._offsets[s + 1])


def _count(tokens: _Tokens) -> int:
    return tokens.stop - tokens.start if isinstance(tokens, slice) else tokens.numel()


def _token_runs(plan: SgmvPlan, device: torch.device) -> list[tuple[int, _Tokens]]:
    """Each adapter slot's tokens: a slice when they are one run, else their indices (on `device`)."""
    slots, counts = torch.unique_consecutive(plan.token_slots.cpu(), return_counts=True)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
        if slot >= 0:
            runs.setdefault(slot, []).append((start, start + count))
        start += count
    return [
        (slot, slice(*spans[0]) if len(spans) == 1 else torch.cat([torch.arange(*r) for r in spans]).to(device))
        for slot, spans in runs.items()
    ]


# ----------------------------------------------------------------------------- references


def _matrix(weights: torch.Tensor, rows: torch.Tensor, first: int, rank: int, width: int) -> torch.Tensor:
    """[rank, width] gathered from its rows, checked against the alignment the kernels assume."""
    starts = rows[first : first + rank].to(weights.device)
    if bool((starts % WEIGHT_ALIGN != 0).any()):
        raise ValueError(f"row offsets {starts.tolist()} are not all multiples of {WEIGHT_ALIGN} elements")
    return weights[starts[:, None] + torch.arange(width, device=weights.device)]


def _token_groups(plan: SgmvPlan) -> list[tuple[int, torch.Tensor]]:
    token_slots = plan.token_slots.long()
    return [(slot, (token_slots == slot).nonzero().squeeze(1)) for slot in plan.slots]


def sgmv_shrink_reference(
    x: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, locations: torch.Tensor, plan: SgmvPlan
) -> torch.Tensor:
    """Plain-PyTorch shrink: a loop over the adapters present, fp32 products. Same contract as
    `sgmv_shrink` (one split; unwritten entries are zero)."""
    _check_inputs(x, weights, rows, locations)
    n_tokens, k = x.shape
    v = torch.zeros(
        (1, locations.shape[0], n_tokens, max(plan.max_rank, 1)), dtype=torch.float32, device=x.device
    )
    table = locations.tolist()
    for slot, tokens in _token_groups(plan):
        for s, (a_row, _, rank) in enumerate(row[slot] for row in table):
            if rank:
                a = _matrix(weights, rows, a_row, rank, k)
                v[0, s, tokens, :rank] = x[tokens].float() @ a.float().T
    return v


def sgmv_expand_reference(
    y: torch.Tensor | Sequence[torch.Tensor],
    v: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    locations: torch.Tensor,
    scales: torch.Tensor,
    plan: SgmvPlan,
    slice_offsets: Sequence[int] | None = None,
) -> None:
    """Plain-PyTorch expand with the same contract and rounding points as `sgmv_expand`:
    v is rounded to the weight dtype before the second product, y is updated once."""
    slices = _output_slices(y, slice_offsets, weights, rows, locations)
    targets = [y[:, a : a + width] for a, width, _ in slices] if isinstance(y, torch.Tensor) else list(y)
    table, scale_table = locations.tolist(), scales.tolist()
    v_sum = v.sum(0)
    for slot, tokens in _token_groups(plan):
        for s, (_, b_row, rank) in enumerate(row[slot] for row in table):
            if rank:
                target = targets[s]
                b_t = _matrix(weights, rows, b_row, rank, target.shape[1])
                delta = v_sum[s, tokens, :rank].to(weights.dtype).float() @ b_t.float() * scale_table[s][slot]
                target[tokens] = (target[tokens].float() + delta).to(target.dtype)
