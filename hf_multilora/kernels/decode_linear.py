"""Decode-sized linear layers: y_i = x @ W_i^T (+ b_i) for one to three weights in one launch.

Why: at decode a linear layer reads its whole weight for a handful of rows, so it is bound by bytes
and by what each launch wastes. cuBLAS runs Llama-2-7B's q, k and v (three 4096 x 4096 weights, three
allocations) as three split-K GEMMs plus their reductions: 41 us a layer at 16 rows on an H200,
2.45 TB/s. One launch over the three weights, each program streaming BLOCK_N rows of one of them
over the whole K, takes 26.8 us (3.76 TB/s), faster than cuBLAS on the weights concatenated (28.4);
gate/up 45.4 against 49.7 us, o 11.7 against 13.9, down 25.0 against 28.4
(`docs/benchmarks.md`, 2026-12-03). The weights stay where transformers put them.

Reference: `torch.nn.functional.linear` per weight (what the tests compare against).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import specialized

MAX_WEIGHTS = 3
MAX_ROWS = 32  # measured faster than cuBLAS up to 32 rows; at 64 only q/k/v and down still were
MAX_ROWS_ONE_WEIGHT = 16  # o and down alone: at 32 rows cuBLAS was faster (down 27.6 vs 34.2 us)
_MIN_PROGRAMS = 128  # measured shapes launched >= 128 programs (132 SMs); fewer would idle SMs


class DecodeLinearTiles(NamedTuple):
    block_n: int  # weight rows per program
    block_k: int
    num_warps: int
    num_stages: int


def decode_linear_tiles(out_features: list[int], in_features: int, rows: int) -> DecodeLinearTiles | None:
    """The tiles for these weights and rows, or None where the launch is not the measured faster
    one (more rows than measured faster, dimensions the tiles do not divide, too few programs). Swept
    on the H200 at 1, 16, 32 and 64 rows: one weight (o, down) 32 x 256 tiles up to 16 rows; several,
    128-deep tiles, 32 rows wide up to 12288 outputs (q/k/v) and 64 above (gate/up), up to 32 rows."""
    most_rows = MAX_ROWS_ONE_WEIGHT if len(out_features) == 1 else MAX_ROWS
    if rows > most_rows or not 1 <= len(out_features) <= MAX_WEIGHTS:
        return None
    total = sum(out_features)
    block_n = 64 if len(out_features) > 1 and total > 12288 else 32
    block_k = 256 if len(out_features) == 1 else 128
    if in_features % block_k or any(n % block_n for n in out_features) or total // block_n < _MIN_PROGRAMS:
        return None
    return DecodeLinearTiles(block_n, block_k, num_warps=4, num_stages=4)


@triton.jit(do_not_specialize=["rows"])  # the batch size: one compile for every row count
def _decode_linear_kernel(
    x_ptr,  # [rows, K], row stride x_sm
    w0_ptr, w1_ptr, w2_ptr,  # [n_i, K] each, contiguous (unused ones: any)
    b0_ptr, b1_ptr, b2_ptr,  # [n_i] each (HAS_BIAS)
    y0_ptr, y1_ptr, y2_ptr,  # [rows, n_i] each, contiguous
    rows,
    n0, n1, n2,  # each weight's outputs; the grid covers n0 + n1 + n2 in BLOCK_N steps
    x_sm,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= rows
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A program computes BLOCK_N outputs of one weight for every row, over the whole K."""
    first = tl.program_id(0) * BLOCK_N  # over the weights' outputs, end to end
    w_ptr, b_ptr, y_ptr, n, col = w0_ptr, b0_ptr, y0_ptr, n0, first
    if first >= n0 + n1:
        w_ptr, b_ptr, y_ptr, n, col = w2_ptr, b2_ptr, y2_ptr, n2, first - n0 - n1
    elif first >= n0:
        w_ptr, b_ptr, y_ptr, n, col = w1_ptr, b1_ptr, y1_ptr, n1, first - n0
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = col + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < rows
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * x_sm + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.load(w_rows + (k0 + offs_k)[None, :])
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * n + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])


def _three(items: list) -> list:
    """The kernel's three slots: the items, the last repeated (unused by the grid)."""
    return list(items) + [items[-1]] * (MAX_WEIGHTS - len(items))


def decode_linear(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], tiles: DecodeLinearTiles
) -> list[torch.Tensor]:
    """[F.linear(x, w, b) for each weight] in one launch: x [..., K] (rows = x.numel() / K),
    weights [n_i, K] contiguous in x's dtype, biases all None or all [n_i] contiguous; `tiles` from
    `decode_linear_tiles`. Launched through `launch.specialized` (a few microseconds of host time
    where `kernel[grid](...)` takes ~30). The outputs are views of one buffer, one after another,
    each contiguous: a LoRA expand reaches them all in one launch (`sgmv.ExpandCall` of a tensor per
    slice)."""
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()  # the kernel reads K contiguous
    buffer = torch.empty(x2.shape[0] * sum(w.shape[0] for w in weights), dtype=x.dtype, device=x.device)
    outs = [part.view(*x.shape[:-1], -1) for part in buffer.split([x2.shape[0] * w.shape[0] for w in weights])]
    has_bias = biases[0] is not None
    sizes = [w.shape[0] for w in weights] + [0] * (MAX_WEIGHTS - len(weights))
    specialized(_decode_linear_kernel)(
        grid=(sum(sizes) // tiles.block_n,),
        args=(x2, *_three(weights), *_three(biases if has_bias else weights), *_three(outs),
              x2.shape[0], *sizes, x2.stride(0)),  # rows, n0, n1, n2, x_sm
        constexprs=dict(K=in_features, HAS_BIAS=has_bias, BLOCK_M=max(16, triton.next_power_of_2(x2.shape[0])),
                        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return outs
