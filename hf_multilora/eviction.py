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
  kernel stores the step's logits as it computes them (no second pass over the keys); the torch
  path computes them next to its attention.
- Compaction: when a row's slots reach a block boundary and more than the budget is held, every
  layer keeps the `recent` newest slots and the best-scored others, in their order, copied into
  fresh pages; the old pages go back to the pool. So a row holds at most budget + one block.
- HF still sees the logical length (positions stay right); the cache's own slot mask replaces the
  attention mask's padding columns (kept padding sorts first and stays masked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels.paged_attention import LOG2_E

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
    token's position) and whether it is a real token; and the choice of what a compaction keeps."""

    def __init__(self, budget: KvBudget, layers: int, kv_heads: int) -> None:
        self.budget, self.kv_heads = budget, kv_heads
        self.scores: list[torch.Tensor | None] = [None] * layers  # fp32 [batch, kv_heads, capacity]
        self.positions: list[torch.Tensor | None] = [None] * layers  # int64 [batch, kv_heads, capacity]
        self.real: torch.Tensor | None = None  # bool [batch, capacity]: slot holds a token, not padding

    def _room(self, layer: int, batch: int, slots: int, device: torch.device) -> None:
        """Grow the layer's buffers (and the slot mask) to `slots` slots, doubling."""
        have = self.scores[layer]
        if have is not None and have.shape[2] >= slots:
            return
        width = max(slots, 2 * (have.shape[2] if have is not None else 0), 64)
        scores = torch.zeros(batch, self.kv_heads, width, device=device)
        positions = torch.zeros(batch, self.kv_heads, width, dtype=torch.int64, device=device)
        if have is not None:
            scores[..., : have.shape[2]] = have
            positions[..., : have.shape[2]] = self.positions[layer]
        self.scores[layer], self.positions[layer] = scores, positions
        if self.real is None or self.real.shape[1] < width:
            real = torch.ones(batch, width, dtype=torch.bool, device=device)
            if self.real is not None:
                real[:, : self.real.shape[1]] = self.real
            self.real = real

    def slot_mask(self, key: torch.Tensor, key_mask: torch.Tensor | None, slots: int, logical_end: int) -> torch.Tensor:
        """The key mask over the row's `slots` slots (the forward's tokens, key [batch, kv_heads, new,
        dim], last) for the attention, from HF's mask over logical positions: the new tokens' columns
        are copied into their slots; earlier slots keep what they were given."""
        batch, _, new, _ = key.shape
        if self.real is None or self.real.shape[1] < slots:  # every layer's buffers grow together
            for layer in range(len(self.scores)):
                self._room(layer, batch, slots, key.device)
        if key_mask is not None:
            self.real[:, slots - new : slots] = key_mask[:, logical_end - new : logical_end].bool()
        return self.real[:, :slots]

    def note_positions(self, layer: int, slots: int, new: int, logical_end: int) -> None:
        """The forward's tokens occupy the last `new` of `slots` slots at the logical positions before
        `logical_end`."""
        positions = torch.arange(logical_end - new, logical_end, device=self.positions[layer].device)
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

    def add_decode(self, layer: int, logits: torch.Tensor, slots: int) -> None:
        """A decode step's logits [batch, heads, >= slots] (log2 domain, -inf where masked): its
        softmax over the slots, summed over each KV head's query heads."""
        batch, heads, _ = logits.shape
        probs = torch.softmax(logits[:, :, :slots] * (1 / LOG2_E), -1).nan_to_num(0.0)
        self.scores[layer][:, :, :slots] += probs.view(batch, self.kv_heads, heads // self.kv_heads, slots).sum(2)

    def keep(self, slots: int, logical: int) -> torch.Tensor | None:
        """Per layer, the slots [layers, batch, kv_heads, kept] (ascending: padding first, then the
        real tokens in order) a compaction of `slots` slots keeps, or None when the budget allows all."""
        kept = self.budget.kept(logical)
        if kept >= slots:
            return None
        recent = min(self.budget.recent, kept)
        device = self.real.device
        real = self.real[:, :slots]
        choices = []
        for scores in self.scores:
            older = scores[:, :, : slots - recent].masked_fill(~real[:, None, : slots - recent], float("-inf"))
            best = older.topk(kept - recent, dim=-1).indices  # padding only where the row has too few tokens
            newest = torch.arange(slots - recent, slots, device=device).expand(*best.shape[:2], recent)
            chosen = torch.cat([best, newest], -1)
            # padding (False) first, each group in slot order: every head of a row then masks the same slots
            order = chosen + slots * real.gather(1, chosen.flatten(1)).view_as(chosen)
            choices.append(chosen.gather(-1, order.argsort(-1)))
        return torch.stack(choices)

    def compact(self, keep: torch.Tensor) -> None:
        """Move every layer's scores and positions, and the slot mask, to the kept slots (in front)."""
        kept = keep.shape[-1]
        for layer, chosen in enumerate(keep):
            for buffers in (self.scores, self.positions):
                moved = buffers[layer].gather(-1, chosen)
                buffers[layer].zero_()
                buffers[layer][..., :kept] = moved
        real = self.real.gather(1, keep[0, :, 0])  # the same for every head and layer (see keep)
        self.real.fill_(True)
        self.real[:, :kept] = real


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
    old_table: torch.Tensor,  # int64 [batch, blocks]: pages of the slots `keep` names
    new_table: torch.Tensor,  # int64 [batch, new blocks]: pages the kept slots 0..kept-1 go to
    keep: torch.Tensor,  # int64 [batch, kv_heads, kept]: old slot of each new slot
) -> None:
    """data[slot j of (row, head) in new_table] = data[slot keep[row, head, j] in old_table], every region.
    All reads happen before the writes of a region; the new pages are not the old ones."""
    heads = torch.arange(keep.shape[1], device=data.device)[None, :, None]
    new_slots = torch.arange(keep.shape[2], device=data.device).expand_as(keep)

    def offsets(table: torch.Tensor, slots: torch.Tensor, region: SlotRegion) -> torch.Tensor:
        page = table.gather(1, (slots // slots_per_page).flatten(1)).view_as(slots)
        first = page * page_size + region.start + heads * region.head_stride + slots % slots_per_page * region.slot_stride
        return first[..., None] + torch.arange(region.width, device=data.device)

    for region in regions:
        data[offsets(new_table, new_slots, region)] = data[offsets(old_table, keep, region)]
