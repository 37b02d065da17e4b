"""RowKV and StepCache: the serving engine's KV, one page table per request, rows of any lengths.

Why not PagedCache: HF batches are rectangular (every row gains the same tokens per forward, left
padding hides the difference), so PagedCache keeps one length for all rows. The engine's running
batch is ragged: requests join with prompts of their own lengths and leave when they end, so every
row has its own length and nothing is padded. The paged attention kernels already take a length
and a page table per row; what changes is the bookkeeping.

- `RowKV` is one request's pages: a host table [layers, blocks] and its length. It owns its pages
  (`grow` takes them from the pool, all or nothing; `free` gives them back).
- `StepCache` is a PagedCache over rows the engine owns, loaded before each forward (`load`): the
  rows' tables side by side, their lengths on the device. It owns no page. A forward adds one token
  to every row (decode: the attention launch stores the token's K/V, as in PagedCache) or the
  prompts of newly admitted rows, left-padded to the longest in the forward's inputs only: a
  row's length counts its own tokens, so the padding sits at negative positions, where the kernels
  neither store nor attend it. No row ever holds padding, so no step reads a key mask and no page
  holds padding's slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backend import use_triton
from ..cache import _ACTIVE, PagedCache, StepBuffers
from ..kernels.paged_attention import write_kv, write_kv_torch
from ..memory.page_pool import PagePool
from ..transfer import staged_for, to_device


class RowKV:
    """One request's KV pages: `table[layer, block]` page ids and `length`, the tokens stored (its
    positions 0..length-1)."""

    def __init__(self, layers: int, block_size: int) -> None:
        self.table = torch.empty(layers, 0, dtype=torch.int32)
        self.length = 0
        self.block_size = block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks this row lacks to hold `tokens` tokens in all (0 when it has them)."""
        return max(0, -(-tokens // self.block_size) - self.table.shape[1])

    def grow(self, pool: PagePool, tokens: int) -> None:
        """Pages for `tokens` tokens in all; raises PoolExhaustedError before any change."""
        missing = self.blocks_for(tokens)
        if missing:
            layers = self.table.shape[0]
            pages = torch.tensor(pool.allocate(layers * missing, "kv"), dtype=torch.int32)
            self.table = torch.cat([self.table, pages.view(layers, missing)], dim=1)

    def free(self, pool: PagePool) -> None:
        """All pages back to the pool; the row is empty (and can be filled again)."""
        if self.table.numel():
            pool.free(self.table.flatten().tolist())
        self.table = self.table[:, :0]
        self.length = 0


class StepCache(PagedCache):
    """A PagedCache view of the engine's rows for one forward at a time (see the module doc).

    `load(rows, new, added)` before the forward of `new` tokens per row: row i adds `added[i]` of them
    (default all; decode: 1), whose pages `RowKV.grow` has already taken; the `new - added[i]` before
    them are left padding (only an empty row takes any). It returns a 2-D attention mask of ones
    where `mask_always` (a graph step needs one), else None. The rows' lengths advance only when the
    engine says so (`RowKV.length`), after the forward worked.

    A decode step replayed from a CUDA graph (`graphs.DecodeGraphs`) goes through PagedCache's step
    protocol instead of the per-step tensors: `adopt` picks the fixed buffers of the step's batch
    bucket and table width (power-of-two blocks), `begin_step` copies the loaded rows into them, the
    padding rows with one token on the discard page (`hold_discard` takes it first).
    """

    def __init__(self, pool: PagePool, config: Any, kv_dtype: str | None = None) -> None:
        super().__init__(pool, config, kv_dtype=kv_dtype)
        self._row_lens: list[int] = []
        self._added: list[int] = []  # tokens each loaded row adds (the rest of `_new`: left padding)
        self._new = 0
        self._step_host: torch.Tensor | None = None  # int32 [layers, rows, blocks]: the loaded rows' tables
        self._uploaded = False  # the loaded step's tables and lengths are on the device
        self._eager: tuple[torch.Tensor, dict] | None = None  # the device table and decode plans of eager forwards

    def load(
        self, rows: Sequence[RowKV], new: int, added: Sequence[int] | None = None, *, mask_always: bool = False
    ) -> torch.Tensor | None:
        if not rows or new < 1:
            raise ValueError(f"a step adds tokens to one or more rows; got {len(rows)} rows, {new} tokens")
        added = [new] * len(rows) if added is None else list(added)
        if len(added) != len(rows):
            raise ValueError(f"added: one count per row ({len(rows)}), got {len(added)}")
        width = max(max(r.table.shape[1] for r in rows), 1)
        host = torch.zeros(self.num_layers, len(rows), width, dtype=torch.int32)  # unused blocks: page 0
        for i, (row, count) in enumerate(zip(rows, added, strict=True)):
            if not 1 <= count <= new or (count < new and row.length):
                raise ValueError(f"row {i} of length {row.length} cannot add {count} of {new} tokens "
                                 f"(1 to all; left padding only for an empty row)")  # fmt: skip
            if row.blocks_for(row.length + count):
                raise ValueError(f"row {i} has no pages for {row.length + count} tokens: grow it first")
            host[:, i, : row.table.shape[1]] = row.table
        self._step_host, self._uploaded, self.adopted = host, False, False
        self._row_lens, self._added = [r.length for r in rows], added
        self._new = new
        self._lens = [max(self._row_lens)] * self.num_layers
        self._pending = None
        if not mask_always:
            return None
        return torch.ones(len(rows), max(self._row_lens) + new, dtype=torch.bool, device=self._device)

    def _upload(self) -> None:
        """The loaded step's tables and lengths on the device, for an eager forward."""
        host, device = self._step_host, self._device
        if self._eager is None or self._eager[0].shape != host.shape:
            self._eager = (torch.empty(host.shape, dtype=torch.int32, device=device), {})  # plans: per shape
        table, self._plans = self._eager
        table.copy_(staged_for(host, device), non_blocking=True)
        self._table, self._layer_tables = table, table.unbind(0)
        lens = torch.tensor([n + count for n, count in zip(self._row_lens, self._added, strict=True)], dtype=torch.int32)
        self._kv_lens = to_device(lens, device)
        self._uploaded = True

    def hold_discard(self) -> int:
        """Take the page padding rows write into (PoolExhaustedError if none is free), and return it;
        `release` frees it."""
        if self._discard is None:
            self._set_discard(self.pool.allocate(1, "kv")[0])
        return self._discard

    # -- the step protocol of DecodeGraphs (see PagedCache.begin_step) ----------------------------------------
    def step_shape(self, rows: int) -> tuple[int, int]:
        width = self._step_host.shape[2]
        return rows, 1 << (width - 1).bit_length()

    def adopt(self, state: StepBuffers | None, rows: int | None = None) -> None:
        """Use `state` (the step buffers of an earlier step of this `step_shape`), or new ones."""
        batch = len(self._row_lens)
        rows = batch if rows is None else rows
        if rows < batch or (rows > batch and self._discard is None):
            raise ValueError(f"adopt: {rows} step rows for {batch} rows (padding needs hold_discard() first)")
        if state is None:
            _, width = self.step_shape(rows)
            state = StepBuffers(
                torch.zeros(self.num_layers, rows, width, dtype=torch.int32, device=self._device),
                torch.empty(rows, dtype=torch.int32, device=self._device),
                torch.ones(rows, width * self.block_size, dtype=torch.bool, device=self._device),
                {},
            )
        self._table, self._kv_lens, self._step_mask, self._plans = state.table, state.kv_lens, state.key_mask, state.plans
        self._layer_tables = self._table.unbind(0)
        self.adopted = True

    def step_state(self) -> StepBuffers:
        return StepBuffers(self._table, self._kv_lens, self._step_mask, self._plans)

    def step_masked(self) -> bool:
        """Never: no row holds padding (see the module doc)."""
        return False

    def begin_step(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Copy the loaded decode step (`attention_mask` [rows, longest + 1]) into the adopted buffers;
        returns the key mask buffer."""
        batch, end = len(self._row_lens), max(self._row_lens) + 1
        if not self.adopted or self._new != 1 or attention_mask.shape != (batch, end):
            raise ValueError(
                f"begin_step: a decode step of {batch} rows loaded and adopted, with a [{batch}, {end}] mask; "
                f"got {self._new} new token(s), a mask of {tuple(attention_mask.shape)}"
            )
        host, (layers, rows, _) = self._step_host, self._table.shape
        width = host.shape[2]
        padded = torch.full((layers, rows, width), 0 if self._discard is None else self._discard, dtype=torch.int32)
        padded[:, :batch] = host  # padding rows: every block on the discard page, one token
        lens = torch.tensor([n + 1 for n in self._row_lens] + [1] * (rows - batch), dtype=torch.int32)
        self._table[:, :, :width].copy_(staged_for(padded, self._device), non_blocking=True)
        self._kv_lens.copy_(staged_for(lens, self._device), non_blocking=True)
        self._step_mask[:batch, :end].copy_(attention_mask, non_blocking=True)
        self._step_mask[batch:].fill_(True)
        self._uploaded = self._stepping = True
        return self._step_mask

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [rows, kv_heads, new, head_dim] of the loaded step. Decode K/V are stored by the attention
        launch (`PagedDecode`, either backend), quantized ones by theirs under Triton
        (`_write_quantized`); a prefill's are written here."""
        if self._pending is not None:
            raise RuntimeError(f"StepCache: no paged attention read layer {self._pending[0]}'s update")
        batch, heads, new, head_dim = key_states.shape
        rows = self._table.shape[1] if self._stepping else len(self._row_lens)
        if (batch, new) != (rows, self._new) or (heads, head_dim) != (self.kv_heads, self.head_dim):
            raise ValueError(
                f"StepCache loaded for {rows} rows x {self._new} new tokens of "
                f"{self.kv_heads} x {self.head_dim}, got K/V {tuple(key_states.shape)}"
            )
        if not self._uploaded:
            self._upload()
        # each row from its own length: the lengths' buffer less the new tokens (< 0: padding, not stored)
        if self.kv_layout is not None:
            self._write_quantized(layer_idx, self._kv_lens - new, key_states, value_states)
            self._pending = (layer_idx, key_states, value_states)
        elif new == 1:
            self._pending = (layer_idx, key_states, value_states)
        else:
            write = write_kv if use_triton(key_states) else write_kv_torch
            k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [rows, new, kv heads, dim]
            pool = self.pool
            write(pool.storage, pool.page_elems, self._layer_tables[layer_idx], self._kv_lens - new, k, v,
                  self.block_size)  # fmt: skip
            self._pending = (layer_idx, key_states, None)
        _ACTIVE.set(self._weak_self)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._lens[layer_idx] if self._row_lens and layer_idx < self.num_layers else 0

    def release(self) -> None:
        """The rows own their pages: only the discard page goes back."""
        self._row_lens, self._added, self._new, self._pending = [], [], 0, None
        if self._discard is not None:
            self.pool.free([self._discard])
            self._discard = None
