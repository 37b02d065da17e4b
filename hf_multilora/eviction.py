"""Heavy-hitter eviction for PagedCache (H2O, Q-Hitter; the prompt scored as SnapKV does).

Why: at long context most of a row's KV gets little attention. Keeping, per row and KV head, the
`recent` newest tokens plus those with the largest accumulated attention (the "heavy hitters") and
freeing the rest shrinks the KV a decode step reads and the pages it holds, at a small quality cost.

How it sits in the paged cache:
- Each KV head has its own slot j inside a page (the layouts address (slot, head) separately), so
  each head keeps its own tokens while every head of a row keeps the same number: the kernels still
  see one length per row. Keys are stored after RoPE, so a kept token needs no position.
- Scores: a prefill scores the prompt from its last `SNAP_WINDOW` queries (SnapKV's observation
  window; computed from the in-flight tensors, not the pages), max-pooled over `SNAP_POOL`
  neighbouring tokens as SnapKV does: an answer spans several tokens and the window's attention
  finds its first, so a token kept keeps its neighbours (without pooling, a passkey's later digits
  were evicted at budget 0.2); each decode step adds its softmax
  over the row's slots, summed over the KV head's query heads. On the Triton path the attention
  kernel stores the step's logits as it computes them (no second pass over the keys) and one launch
  adds their softmax (kernels/attention_scores.py); the torch path computes them next to its attention.
- Compaction: when a row's slots reach a block boundary and more than the budget is held, every
  layer keeps the `recent` newest slots and the best-scored others, in place: the kept slots past
  the new length move into the evicted slots below it (`in_place_moves`; at a block compaction
  about a block per row and head, not every kept slot), and the pages past the new length go back
  to the pool. So a row holds at most budget + one block, and a compaction allocates nothing.
- HF still sees the logical length (positions stay right); the cache's own slot mask replaces the
  attention mask's padding columns (kept padding keeps its lowest slots, alike in every head and
  layer, and stays masked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import use_triton
from .kernels.attention_scores import add_attention_probs, add_attention_probs_torch

SNAP_WINDOW = 32  # prompt queries whose attention scores the prompt (SnapKV's observation window)
SNAP_POOL = 7  # a prompt token's score is the largest of its SNAP_POOL neighbours' (SnapKV's kernel)


@dataclass(frozen=True)
class KvBudget:
    """`fraction` of a row's tokens kept (at least `recent`); see the module doc."""

    fraction: float
    recent: int

    @classmethod
    def of(cls, kv_budget: float | None, kv_recent: int) -> KvBudget | None:
        """None when nothing would ever be evicted (no budget, or 1.0); ValueError for a budget outside
        (0, 1] or a negative `kv_recent`."""
        if kv_budget is None:
            return None
        if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)) or not 0 < kv_budget <= 1:
            raise ValueError(f"kv_budget must be a fraction of the tokens in (0, 1], got {kv_budget!r}")
        if isinstance(kv_recent, bool) or not isinstance(kv_recent, int) or kv_recent < 0:
            raise ValueError(f"kv_recent must be a count of tokens >= 0, got {kv_recent!r}")
        return None if kv_budget == 1 else cls(float(kv_budget), kv_recent)

    def kept(self, length: int) -> int:
        """Slots a row keeps once it holds `length` tokens."""
        return min(length, max(self.recent, math.ceil(self.fraction * length)))


class HeavyHitters:
    """The accumulated attention of every slot, per layer, row and KV head, what each slot holds (its
    token's position) and whether it is a real token; and the choice of what a compaction keeps.

    `scores` may be a buffer lent for decode steps replayed from a CUDA graph (`lend`): then it has
    the step's rows (a batch bucket, padding rows last) and a fixed address, and a step's
    `add_decode` adds into all its rows."""

    def __init__(self, budget: KvBudget, layers: int, kv_heads: int) -> None:
        self.budget, self.layers, self.kv_heads = budget, layers, kv_heads
        self._scores: torch.Tensor | None = None  # fp32 [layers, rows >= batch, kv_heads, capacity]
        self.positions: torch.Tensor | None = None  # int64 [layers, batch, kv_heads, capacity]
        self.real: torch.Tensor | None = None  # bool [batch, capacity]: slot holds a token, not padding
        self.lent = False  # _scores is a step buffer (lend): it keeps its address

    @property
    def scores(self) -> torch.Tensor:
        """fp32 [layers, batch, kv_heads, capacity]."""
        return self._scores[:, : self.real.shape[0]]

    def _room(self, batch: int, slots: int, device: torch.device) -> None:
        """Grow the buffers of every layer (and the slot mask) to `slots` slots, doubling."""
        if self.real is not None and self.real.shape[1] >= slots and self._scores.shape[-1] >= slots:
            return
        have = 0 if self.real is None else self.real.shape[1]
        width = max(slots, 2 * have, 64)
        real = torch.ones(batch, width, dtype=torch.bool, device=device)
        positions = torch.zeros(self.layers, batch, self.kv_heads, width, dtype=torch.int64, device=device)
        if have:
            real[:, :have] = self.real
            positions[..., :have] = self.positions
        self.real, self.positions = real, positions
        if self._scores is None or self._scores.shape[-1] < slots:  # a lent buffer has the step's width
            scores = torch.zeros(self.layers, batch, self.kv_heads, width, device=device)
            if self._scores is not None:
                scores[..., : self._scores.shape[-1]] = self._scores[:, :batch]
            self._scores, self.lent = scores, False

    def lend(self, buffer: torch.Tensor) -> None:
        """Keep the scores in `buffer` (fp32 [layers, step rows, kv_heads, step width]) from now on: the
        decode steps of a graph add into it."""
        batch = self.real.shape[0]
        if buffer.shape[0] != self.layers or buffer.shape[1] < batch or buffer.shape[2] != self.kv_heads:
            raise ValueError(f"a score buffer of shape {tuple(buffer.shape)} for {self.layers} layers, {batch} rows "
                             f"and {self.kv_heads} KV heads")  # fmt: skip
        width = min(self._scores.shape[-1], buffer.shape[-1])  # the cache's slots fit the buffer
        buffer.zero_()
        buffer[:, :batch, :, :width] = self.scores[..., :width]
        self._scores, self.lent = buffer, True

    def slot_mask(self, key: torch.Tensor, key_mask: torch.Tensor | None, slots: int, logical_end: int) -> torch.Tensor:
        """The key mask over the row's `slots` slots (the forward's tokens, key [batch, kv_heads, new,
        dim], last) for the attention, from HF's mask over logical positions: the new tokens' columns
        are copied into their slots; earlier slots keep what they were given."""
        batch, _, new, _ = key.shape
        self._room(batch, slots, key.device)
        if key_mask is not None:
            self.real[:, slots - new : slots] = key_mask[:, logical_end - new : logical_end].bool()
        return self.real[:, :slots]

    def note_step(self, real: torch.Tensor, slots: int, logical_end: int) -> torch.Tensor:
        """A decode step begun ahead of its forward (PagedCache.begin_step): its token, real where
        `real` [batch] says, takes slot `slots - 1` of every layer at position `logical_end - 1`.
        Returns the slot mask [batch, slots]."""
        self._room(real.shape[0], slots, real.device)
        self.real[:, slots - 1] = real.bool()
        self.positions[..., slots - 1] = logical_end - 1
        return self.real[:, :slots]

    def note_positions(self, layer: int, slots: int, new: int, logical_end: int) -> None:
        """The forward's tokens occupy the last `new` of `slots` slots at the logical positions before
        `logical_end`."""
        positions = torch.arange(logical_end - new, logical_end, device=self.positions.device)
        self.positions[layer][:, :, slots - new : slots] = positions

    def add_prefill(self, layer: int, query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor | None,
                    scale: float) -> None:  # fmt: skip
        """Score a prompt (the cache's first forward) from the attention of its last SNAP_WINDOW
        queries, max-pooled over SNAP_POOL neighbours: query [batch, heads, n, dim], key [batch,
        kv_heads, n, dim] (this forward's)."""
        batch, heads, n, _ = query.shape
        window = min(SNAP_WINDOW, n)
        group = heads // self.kv_heads
        q = query[:, :, n - window :].float()
        k = key.float().repeat_interleave(group, 1)
        logits = q @ k.transpose(-1, -2) * scale  # [batch, heads, window, n]
        q_pos = torch.arange(n - window, n, device=query.device)[:, None]
        allowed = torch.arange(n, device=query.device)[None, :] <= q_pos
        if key_mask is not None:
            allowed = allowed[None, None] & key_mask[:, None, None, :n].bool()
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        mass = probs.sum(2).view(batch, self.kv_heads, group, n).sum(2)  # [batch, kv_heads, n]
        self.scores[layer][:, :, :n] += F.max_pool1d(mass, SNAP_POOL, stride=1, padding=SNAP_POOL // 2)

    def add_decode(self, layer: int, logits: torch.Tensor, kv_lens: torch.Tensor) -> None:
        """A decode step's logits [rows, heads, width] (log2 domain, -inf where masked; row r's first
        kv_lens[r] are its slots; rows: the batch, or a lent buffer's step rows): their softmax,
        summed over each KV head's query heads (`kernels/attention_scores.py`)."""
        add = add_attention_probs if use_triton(logits) else add_attention_probs_torch
        add(self._scores[layer], logits, kv_lens)

    def keep(self, slots: int, logical: int) -> torch.Tensor | None:
        """Per layer, the slots [layers, batch, kv_heads, kept] (in no order) a compaction of `slots`
        slots keeps, or None when the budget allows all. Padding is kept only where a row has too
        few tokens, and then its lowest slots, the same in every head and layer: a row's slots
        then stay padding or not alike in all of them (one slot mask per row)."""
        kept = self.budget.kept(logical)
        if kept >= slots:
            return None
        recent = min(self.budget.recent, kept)
        real = self.real[None, :, None, : slots - recent]  # [1, batch, 1, older slots]
        # below every score (>= 0), the lowest slot first
        padding_rank = -1.0 - torch.arange(slots - recent, device=real.device, dtype=torch.float32) / slots
        older = torch.where(real, self.scores[..., : slots - recent], padding_rank)
        best = older.topk(kept - recent, dim=-1).indices
        newest = torch.arange(slots - recent, slots, device=best.device).expand(*best.shape[:3], recent)
        return torch.cat([best, newest], -1)

    def compact(self, source: torch.Tensor) -> None:
        """New slot j of every layer, row and head takes what slot source[..., j] held (source [layers,
        batch, kv_heads, kept]): scores, positions and the slot mask, in place (a lent score buffer
        keeps its address)."""
        kept = source.shape[-1]
        for buffer in (self.scores, self.positions):
            moved = buffer.gather(-1, source)
            buffer.zero_()
            buffer[..., :kept] = moved
        real = self.real.gather(1, source[0, :, 0])  # the same for every head and layer (see keep)
        self.real.fill_(True)
        self.real[:, :kept] = real


def in_place_moves(keep: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How `keep` [..., kept] (the slots of `slots` a compaction keeps, each once) comes to fill slots
    0..kept-1 in place: every evicted slot below `kept` takes a kept slot at or past it, both in
    ascending order. Returns (source [..., kept]: the old slot new slot j holds, from [..., moves]:
    the slots that move, to [..., moves]: where). There are as many evicted slots below `kept` as
    kept slots past it, at most moves = min(kept, slots - kept) (at a block compaction about a block,
    not every kept slot); unused pairs move slot kept + i onto itself (nothing reads it again)."""
    kept = keep.shape[-1]
    moves = min(kept, slots - kept)
    device = keep.device
    held = torch.zeros(*keep.shape[:-1], slots, dtype=torch.bool, device=device).scatter_(-1, keep, True)
    below, past = torch.arange(kept, device=device), torch.arange(kept, slots, device=device)
    holes = torch.where(held[..., :kept], slots + below, below).sort(-1).values[..., :moves]  # ascending
    movers = torch.where(held[..., kept:], past, slots + past).sort(-1).values[..., :moves]
    spare = past[:moves]  # the unused pairs' slot
    used = movers < slots  # as many as there are holes
    to = torch.where(used, holes, spare)
    move_from = torch.where(used, movers, spare)
    source = torch.cat([below.expand_as(keep), spare.expand(*keep.shape[:-1], moves)], -1)
    source = source.scatter_(-1, to, move_from)[..., :kept]
    return source, move_from, to


@dataclass(frozen=True)
class SlotRegion:
    """Where one kind of a token's data (K, V, or a quantized page's codes / scales / minimums) lies in
    a page, in units of the storage view it is read through: a slot's run of `width` units starts at
    `start + head * head_stride + slot * slot_stride`."""

    start: int
    slot_stride: int
    head_stride: int
    width: int


def move_slots(
    data: torch.Tensor,  # the pool's storage in the regions' units: [units]
    regions: list[SlotRegion],
    page_size: int,  # units per page
    slots_per_page: int,
    old_table: torch.Tensor,  # int64 [rows, blocks]: pages of the slots `source` names
    new_table: torch.Tensor,  # int64 [rows, new blocks]: pages of the slots `to` names (may be old_table)
    source: torch.Tensor,  # int64 [rows, kv_heads, n]: the slots that move
    to: torch.Tensor,  # int64 [rows, kv_heads, n]: where each goes
) -> None:
    """data[slot to[row, head, j] in new_table] = data[slot source[row, head, j] in old_table], every
    region (a row: a layer's row, so all layers move in one call). All reads of a region happen
    before its writes; no slot is written twice. A slot's run is moved as whole cells of the largest
    unit that divides the layout (a head's K: one index, not one per element)."""
    heads = torch.arange(source.shape[1], device=data.device)[None, :, None]

    def cells_of(table: torch.Tensor, slots: torch.Tensor, region: SlotRegion, unit: int) -> torch.Tensor:
        """The cells (of `unit` units) of each slot's run in `region`: [rows, kv_heads, n, width / unit]."""
        page = table.gather(1, (slots // slots_per_page).flatten(1)).view_as(slots)
        first = page * page_size + region.start + heads * region.head_stride + slots % slots_per_page * region.slot_stride
        return (first // unit)[..., None] + torch.arange(region.width // unit, device=data.device)

    for region in regions:
        unit = math.gcd(region.width, region.start, region.slot_stride, region.head_stride, page_size)
        cells = data[: data.numel() // unit * unit].view(-1, unit)
        cells[cells_of(new_table, to, region, unit)] = cells[cells_of(old_table, source, region, unit)]
