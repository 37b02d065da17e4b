"""A decode step's attention probabilities added into the heavy-hitter scores, in one launch.

Why: heavy-hitter eviction (H2O) adds each decode step's softmax over a row's keys into per-slot
scores. In torch that is a fill, a scale, a softmax, a nan_to_num, a head sum and an add over the
whole logits buffer, which in a replayed CUDA graph is as wide as the reserved table (8192 slots
for a 4096-token call, ten times what a row keeps at budget 0.2): 2.4 ms of a 16 x 4096 Llama-2-7B
int4 step's 11 ms on the H200. Here one program per (row, KV head) reads only its row's `kv_lens` logits, twice
(max and sum, then the probabilities), and adds its query heads' probabilities into the scores,
so nothing past a row's length is read or needs filling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import LOG2_E  # the logits are in the log2 domain (paged_attention's `logits=`)


@triton.jit
def _add_probs_kernel(
    logits_ptr,  # fp32 [rows, heads, >= kv_len]: log2-domain scores, -inf where masked
    scores_ptr,  # fp32 [>= rows, kv_heads, >= kv_len]
    kv_lens_ptr,  # int32 [rows]: the slots each row's logits cover
    lg_sr, lg_sh,
    sc_sr, sc_sh,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) // KV_HEADS
    kv_head = tl.program_id(0) % KV_HEADS
    n = tl.load(kv_lens_ptr + row)
    offs = tl.arange(0, BLOCK)
    scores = scores_ptr + row.to(tl.int64) * sc_sr + kv_head * sc_sh
    for g in range(GROUP):  # one program per KV head: its query heads add in turn, no atomics
        logits = logits_ptr + row.to(tl.int64) * lg_sr + (kv_head * GROUP + g) * lg_sh
        m = tl.full((), -1.0e30, tl.float32)  # finite: a fully masked row adds zeros
        total = tl.zeros((), tl.float32)
        for n0 in range(0, n, BLOCK):
            s = tl.load(logits + n0 + offs, mask=n0 + offs < n, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(s))
            total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new))
            m = m_new
        inverse = 1.0 / tl.where(total > 0, total, 1.0)  # all masked: every exp2 below is 0
        for n0 in range(0, n, BLOCK):
            ok = n0 + offs < n
            s = tl.load(logits + n0 + offs, mask=ok, other=float("-inf"))
            old = tl.load(scores + n0 + offs, mask=ok, other=0.0)
            tl.store(scores + n0 + offs, old + tl.exp2(s - m) * inverse, mask=ok)


def add_attention_probs(scores: torch.Tensor, logits: torch.Tensor, kv_lens: torch.Tensor) -> None:
    """scores[r, k, j] += sum over KV head k's query heads h of softmax(logits[r, h, :kv_lens[r]])[j]
    (scores fp32 [>= rows, kv_heads, >= width], logits fp32 [rows, heads, width] in the log2 domain,
    kv_lens int32 [rows]); a row whose logits are all -inf adds nothing. No sync."""
    rows, heads, width = logits.shape
    kv_heads = scores.shape[1]
    if logits.dtype != torch.float32 or scores.dtype != torch.float32 or logits.stride(2) != 1 or scores.stride(2) != 1:
        raise ValueError("scores and logits must be fp32 with a contiguous last dimension")
    if scores.shape[0] < rows or scores.shape[2] < width or heads % kv_heads or kv_lens.shape != (rows,):
        raise ValueError(f"scores {tuple(scores.shape)}, logits {tuple(logits.shape)} and kv_lens "
                         f"{tuple(kv_lens.shape)} do not fit")  # fmt: skip
    _add_probs_kernel[(rows * kv_heads,)](
        logits_ptr=logits, scores_ptr=scores, kv_lens_ptr=kv_lens,
        lg_sr=logits.stride(0), lg_sh=logits.stride(1), sc_sr=scores.stride(0), sc_sh=scores.stride(1),
        KV_HEADS=kv_heads, GROUP=heads // kv_heads, BLOCK=1024, num_warps=4,
    )  # fmt: skip


def add_attention_probs_torch(scores: torch.Tensor, logits: torch.Tensor, kv_lens: torch.Tensor) -> None:
    """The reference of `add_attention_probs` (and the CPU path)."""
    rows, heads, width = logits.shape
    kv_heads = scores.shape[1]
    inside = torch.arange(width, device=logits.device) < kv_lens[:, None].to(logits.device)
    logits = logits.masked_fill(~inside[:, None, :], float("-inf"))
    probs = torch.softmax(logits * (1 / LOG2_E), -1).nan_to_num(0.0)
    scores[:rows, :, :width] += probs.view(rows, kv_heads, heads // kv_heads, width).sum(2)
