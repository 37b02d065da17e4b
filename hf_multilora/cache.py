"""PagedCache: a transformers ``Cache`` whose K/V live in pages of a :class:`PagePool`, read in place by a
registered paged attention function.

Enabling it on a plain HF decoder (Llama, Qwen2, Mistral, ... anything calling ``past_key_values.update`` then
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``)::

    from hf_multilora.cache import PagedCache, ReleaseFinishedRows, use_paged_attention
    use_paged_attention(model)               # sets model's attention implementation to PAGED_ATTENTION
    cache = PagedCache(pool, model.config)   # pool: a PagePool with the model's device and dtype
    try:
        out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=32,
                             stopping_criteria=StoppingCriteriaList([ReleaseFinishedRows(cache, eos_id)]))
    finally:
        cache.release()                      # pages back to the pool (garbage collection does it too, later)

``MultiLoraModel.generate`` builds its own ``PagedCache`` and calls ``release()`` when the call ends.

Why it is built this way:

- **One page = one block of ``block_size`` tokens of one layer**, K ``[block_size, kv_heads, head_dim]`` then V
  (the layout of ``hf_multilora.kernels.paged_attention``). Each row has a page table per layer.
- **Lengths live on the host.** HF batches are rectangular: every row gains the same ``q_len`` tokens per
  forward (left padding included, hidden by the key mask), so the host knows every length and a decode step
  runs ``write_kv`` and ``paged_attention`` with host ints and a device page table that changes only when a
  block is added (every ``block_size`` steps, one pinned non-blocking upload): no device-to-host sync.
- **How attention finds the cache.** HF mask functions are not given the cache, so the mask is only the 2-D
  padding mask (``PagedAttentionMask``). ``update()`` writes the new K/V into pages, returns them unchanged,
  records ``(layer_idx, key tensor)`` as pending and puts a weak reference to the cache in a ``ContextVar``
  (per thread / task). The attention function, called next by the same layer with the same tensors, takes
  the cache from there and checks ``module.layer_idx`` and the key's identity before reading pages; without
  a pending update (``use_cache=False``, a ``DynamicCache``) it computes dense attention instead. An update
  whose pages no attention read (the model does not use ``PAGED_ATTENTION``) makes the next update raise
  rather than attend silently to the new tokens only.
- **Sharing by reference counting.** Beam search reorders rows, so rows share pages; a page is in use while
  some table entry names it (the tables are the reference counts) and returns to the pool when none does.
  Rows only write into their last, partial block: after a reorder / select / repeat / crop, a partial last
  block that several rows share is copied (copy-on-write, all layers in one allocation).
- **Atomic allocation**: new blocks for all layers of all rows are taken in one ``pool.allocate`` call, which
  raises ``PoolExhaustedError`` (``needed``, ``available``) before anything changes: cache and pool stay
  consistent and usable.
- **Sliding window**: every page is kept; the kernel applies the window, so results equal ``DynamicCache``.
- **Pages nobody attends to are not stored** (where HF's rectangular batches waste the most memory). Blocks
  that hold only a row's left padding, and every block of a row that finished, point at one shared
  *discard page* (zeroed, written by those tokens, read only into outputs that are thrown away). The padding
  comes from the attention mask of the call that fills an empty cache (``use_paged_attention`` installs a
  forward pre-hook that hands it over); finished rows are reported by ``ReleaseFinishedRows``, a stopping
  criterion for greedy search and sampling (``MultiLoraModel.generate`` adds it). A finished row's pages
  return to the pool at its next block boundary, and it attends to nothing from then on.

Limitations: inference only (no dropout, no gradients); causal or sliding-window causal text decoders
(no softcap, attention sinks, custom 4-D masks or mask overlays); beam search reorders the tables on the
host, one device-to-host copy of ``beam_idx`` per step (beam search synchronises there anyway).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.masking_utils import AttentionMaskInterface

from .backend import use_triton
from .eviction import HeavyHitters, KvBudget, SlotRegion, in_place_moves, move_slots
from .kernels.kv_quant import KvLayout, gather_kv_quant_torch, write_kv_quant_torch
from .kernels.paged_attention import (
    LOG2_E,
    PagedDecode,
    gather_kv,
    paged_attention,
    paged_attention_torch,
    write_kv,
    write_kv_torch,
)
from .kernels.paged_attention_quant import paged_attention_quant, write_kv_quant
from .memory.page_pool import PagePool
from .transfer import staged_for

PAGED_ATTENTION = "hf_multilora_paged"
"""The name under which the attention and mask functions are registered (``config._attn_implementation``)."""

_ACTIVE: ContextVar[weakref.ref | None] = ContextVar("hf_multilora_paged_cache", default=None)


@dataclass(frozen=True)
class PagedAttentionMask:
    """What the mask function gives the attention layers: the padding mask, not a dense [B, 1, Q, K] mask.

    ``key_mask``: bool ``[batch, tokens so far]``, True = real token; None when no attention mask was given.
    """

    key_mask: torch.Tensor | None


class StepBuffers(NamedTuple):
    """The fixed device buffers decode steps replayed from a graph read (see ``PagedCache.begin_step``),
    and the decode plans made over them; caches of one step shape lend them to each other (``adopt``)."""

    table: torch.Tensor  # int32 [layers, step rows, blocks]
    kv_lens: torch.Tensor  # int32 [step rows]
    key_mask: torch.Tensor  # bool [step rows, blocks * block_size]
    plans: dict  # PagedDecode by (query shape, mask, window, scale, backend)
    scores: torch.Tensor | None = None  # heavy-hitter eviction: fp32 [layers, step rows, kv_heads, blocks * block_size]


def paged_mask(
    batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> PagedAttentionMask:
    """Mask function registered for ``PAGED_ATTENTION``: causality and the window are applied by the kernel."""
    return PagedAttentionMask(attention_mask)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered for ``PAGED_ATTENTION``; returns ``[batch, q_len, heads, head_dim]``."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("paged attention supports neither logit softcapping nor attention sinks")
    if attention_mask is not None and not isinstance(attention_mask, PagedAttentionMask):
        raise NotImplementedError(
            f"{PAGED_ATTENTION} takes the padding mask from its own mask function, "
            f"not a {type(attention_mask).__name__}"
        )
    key_mask = attention_mask.key_mask if attention_mask is not None else None
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    ref = _ACTIVE.get()
    cache = ref() if ref is not None else None
    step = cache._take_step(module.layer_idx, key) if cache is not None else None
    if step is None:
        return _dense_attention(query, key, value, key_mask, scale, sliding_window), None
    table, new_value = step
    if cache._stepping:  # a graph reads the fixed buffer begin_step filled (with eviction: the slot mask)
        key_mask, width = cache._step_mask if cache.step_masked() else None, cache._step_mask.shape[1]
    elif cache.eviction is not None:  # the slots' own mask
        key_mask = cache._evicting_mask(module.layer_idx, key, key_mask)
        width = key_mask.shape[1]
    logits = None
    if cache.eviction is not None and query.shape[2] == 1 and use_triton(query):  # the keys' logits, for the scores
        logits = torch.empty(*query.shape[:2], width, dtype=torch.float32, device=query.device)  # read to kv_lens
    if cache.kv_layout is not None:
        out = cache._attend_quantized(module.layer_idx, query, key, value, table, key_mask, scale, sliding_window, logits)
    else:
        out = cache._attend(module.layer_idx, query, key, new_value, table, key_mask, scale, sliding_window, logits)
    if cache.eviction is not None:
        cache._score(module.layer_idx, query, key, table, key_mask, scale, logits)
    return out, None


def _dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Plain attention over contiguous K/V, for forwards without a PagedCache (HF's causal/window semantics)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, -kv_len:]
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries see everything: no NaN rows
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale)
    return out.transpose(1, 2).contiguous()


def _ragged_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    starts: list[int],
    key_mask: torch.Tensor | None,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One new token per row (query, key, value [batch, heads, 1, head_dim]) after rows of different
    lengths (the serving engine's): row b's token goes to slot starts[b] after its past keys
    (past_k/v [batch, kv_heads, longest, head_dim], slot-aligned with `key_mask`), and the slots
    after it (other rows' lengths) are masked and zeroed."""
    if query.shape[2] != 1:
        raise ValueError(f"rows of different lengths take one new token each, got {query.shape[2]}")
    batch, longest = query.shape[0], past_k.shape[2]
    rows, slots = torch.arange(batch), torch.arange(longest + 1)
    position = torch.tensor(starts)[:, None]
    allowed = slots[None, :] <= position
    if sliding_window is not None:
        allowed = allowed & (slots[None, :] > position - sliding_window)
    allowed = allowed.to(query.device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, : longest + 1].bool()
    keep = (slots[None, :] < position).to(query.device)[:, None, :, None]  # the past slots each row has
    full_k = torch.where(keep, torch.cat([past_k, torch.zeros_like(key)], dim=2), 0)
    full_v = torch.where(keep, torch.cat([past_v, torch.zeros_like(value)], dim=2), 0)
    full_k[rows, :, starts], full_v[rows, :, starts] = key[:, :, 0], value[:, :, 0]
    return _dense_attention(query, full_k, full_v, allowed, scale, None)


AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
AttentionMaskInterface.register(PAGED_ATTENTION, paged_mask)


def use_paged_attention(model: torch.nn.Module) -> None:
    """Make ``model`` (a transformers model) attend through ``PAGED_ATTENTION``: a ``PagedCache`` needs it.

    Also hands the attention mask of a call that fills an empty ``PagedCache`` to that cache (a forward
    pre-hook, installed once), so blocks of left padding take no pages of their own.
    """
    set_attention(model, PAGED_ATTENTION)
    if getattr(model, "_hf_multilora_padding_hook", None) is None:
        model._hf_multilora_padding_hook = model.register_forward_pre_hook(
            _hand_over_padding, with_kwargs=True
        )


@contextlib.contextmanager
def paged_attention_in(model: torch.nn.Module) -> Iterator[None]:
    """`model` attends through ``PAGED_ATTENTION`` inside the block, with its own implementation again after.

    transformers' `set_attn_implementation` walks every submodule and checks the model's source
    (~2 ms at 7B): the serving engine enters this block at every step. So the first switch of a
    model goes through it, and records what it set in each config the attention layers read; later
    switches write those values, and the block's exit writes back each config's own value.
    """
    configs = _attention_configs(model)
    previous = [c._attn_implementation_internal for c in configs]
    paged = getattr(model, "_hf_multilora_paged_implementations", None)
    if paged is None:
        use_paged_attention(model)
        paged = model._hf_multilora_paged_implementations = [c._attn_implementation_internal for c in configs]
    else:
        for config, implementation in zip(configs, paged, strict=True):
            config._attn_implementation_internal = implementation
    try:
        yield
    finally:
        for config, implementation in zip(configs, previous, strict=True):
            config._attn_implementation_internal = implementation


def _attention_configs(model: torch.nn.Module) -> list[PretrainedConfig]:
    """The configs (the model's, its sub-models', their sub-configs) whose attention implementation
    `set_attn_implementation` may set; found once per model."""
    found = getattr(model, "_hf_multilora_attention_configs", None)
    if found is None:
        pending = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
        unique: dict[int, PretrainedConfig] = {}
        while pending:
            config = pending.pop()
            if id(config) not in unique:
                unique[id(config)] = config
                subs = (getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
                pending.extend(sub for sub in subs if isinstance(sub, PretrainedConfig))
        found = model._hf_multilora_attention_configs = list(unique.values())
    return found


def _hand_over_padding(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 calls it `cache`
    mask = kwargs.get("attention_mask")
    if isinstance(cache, PagedCache) and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        cache.note_attention_mask(mask)


def refuse_quantized_kv_on(device: torch.device, kv_dtype: str) -> None:
    """ValueError where `kv_dtype` pages cannot be written: FP8 on a GPU without FP8 conversion."""
    if kv_dtype == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"'fp8' KV needs a GPU with FP8 conversion (compute capability 8.9+); this one is {major}.{minor}: "
            "use kv_cache_dtype='int4'"
        )


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch ``model``'s attention implementation (e.g. back to what it was before a paged call)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


class _PagedLayer(CacheLayerMixin):
    """Per-layer face of a PagedCache for HF code that looks at ``cache.layers``; the state is on the cache."""

    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int) -> None:
        super().__init__()
        self._cache, self.layer_idx = weakref.ref(cache), layer_idx  # weak: `del cache` releases at once

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self._cache().update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache().get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self._cache().get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1


class PagedCache(Cache):
    """K/V cache in pages of ``pool`` (``kind="kv"``), one page table per layer and row; see the module doc.

    ``config``: the model's config (layers, KV heads, head size). ``block_size``: tokens per page; default, the
    largest power of two whose K and V fit in one page. Call ``release()`` when done with it.
    """

    def __init__(
        self,
        pool: PagePool,
        config: Any,
        block_size: int | None = None,
        *,
        kv_dtype: str | None = None,
        kv_budget: float | None = None,
        kv_recent: int = 64,
    ) -> None:
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.pool, self.num_layers = pool, config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        token_elems = 2 * self.kv_heads * self.head_dim
        self.kv_layout = self._quantized_layout(kv_dtype, block_size)
        if self.kv_layout is not None:
            block_size = self.kv_layout.tokens
        else:
            if block_size is None:
                block_size = 1 << max((pool.page_elems // token_elems).bit_length() - 1, 0)
            if block_size < 1 or block_size & (block_size - 1) or block_size * token_elems > pool.page_elems:
                raise ValueError(
                    f"block_size must be a power of two whose K and V fit in a page: {block_size} token(s) of "
                    f"{token_elems} elements, pages of {pool.page_elems}"
                )
        self.block_size = block_size
        self.budget = KvBudget.of(kv_budget, kv_recent)  # heavy-hitter eviction (eviction.py), None: off
        self._device = pool.storage.device
        super().__init__(layers=[_PagedLayer(self, i) for i in range(self.num_layers)])
        self._weak_self = weakref.ref(self)
        self._reserved_blocks = 0  # device table width kept from reserve(): its address stays put
        self._reset_state()

    def _quantized_layout(self, kv_dtype: str | None, block_size: int | None) -> KvLayout | None:
        """The page layout of FP8 / INT4 K/V (kernels/kv_quant.py), None for the pool's own dtype."""
        if kv_dtype is None:
            return None
        if block_size is not None:
            raise ValueError("block_size comes from the layout of quantized KV pages; give kv_dtype or block_size")
        refuse_quantized_kv_on(self.pool.storage.device, kv_dtype)
        page_bytes = self.pool.page_elems * self.pool.storage.element_size()
        return KvLayout.of(kv_dtype, self.kv_heads, self.head_dim, page_bytes)

    def _reset_state(self) -> None:
        self._host: torch.Tensor | None = None  # int32 [layers, batch, blocks] page ids, the source of truth
        self._table: torch.Tensor | None = None  # its copy on the pool's device, what the kernels read
        self._table_stale = True  # _host changed since it was copied into _table
        self._layer_tables: tuple[torch.Tensor, ...] = ()  # _table's layers (a view costs the host ~2 us)
        self._kv_lens: torch.Tensor | None = None  # int32 [batch] on the device, all equal to _kv_lens_end
        self._kv_lens_end = -1  # -1: _kv_lens must be filled again
        self._step_mask: torch.Tensor | None = None  # bool [step rows, reserved tokens]: see begin_step
        self._step_rows: int | None = None  # rows of the device step buffers once adopted (>= batch: see adopt)
        self._stepping = False  # between begin_step and end_step
        self._step_masked: bool | None = None  # whether begun steps read the key mask (the first decides)
        self.adopted = False  # the step buffers are fixed (adopt): see adopt
        self._lens = [0] * self.num_layers  # tokens per row, per layer (layers update one after another)
        self._pending: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # layer, K, V to store
        self._plans: dict[tuple, PagedDecode] = {}  # decode plans for the current table width
        self._discard: int | None = None  # the shared page of blocks nobody attends to (see the module doc)
        self._fill_mask: torch.Tensor | None = None  # attention mask of the call filling the empty cache
        self._finished: torch.Tensor | None = None  # bool [batch] on the host: rows whose pages are released
        self._finishing: torch.Tensor | None = None  # bool [batch] on the device, from ReleaseFinishedRows
        self._evicted = 0  # tokens per row evicted so far: the logical length is _lens + _evicted
        self._prompt_compacted = False  # the first decode step compacts the scored prompt to the budget
        self.eviction = HeavyHitters(self.budget, self.num_layers, self.kv_heads) if self.budget else None

    # -- what attention layers call -------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new K/V ``[batch, kv_heads, new, head_dim]`` in pages; returns them unchanged. One new token
        under Triton (decode) is stored by the attention launch that reads the pages (``PagedDecode``)."""
        if self._pending is not None:
            raise RuntimeError(
                f"PagedCache: no paged attention read layer {self._pending[0]}'s update; "
                f"call use_paged_attention(model) (attention implementation {PAGED_ATTENTION!r})"
            )
        if self._stepping:  # begin_step did this token's bookkeeping; stored at each row's last position
            if self.kv_layout is not None:  # quantized: by a write launch (`_write_quantized`)
                self._write_quantized(layer_idx, self._kv_lens - 1, key_states, value_states)
            elif self.eviction is not None:  # the launch that stores logits does not store K/V
                k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
                write_kv(self.pool.storage, self.pool.page_elems, self._layer_tables[layer_idx], self._kv_lens - 1,
                         k, v, self.block_size)  # fmt: skip
            # the V a bf16 decode launch stores (quantized launches read the attention's own value)
            self._pending = (layer_idx, key_states, None if self.eviction is not None else value_states)
            _ACTIVE.set(self._weak_self)
            return key_states, value_states
        batch, heads, new, head_dim = key_states.shape
        pool, device = self.pool, self._device
        got = (heads, head_dim, key_states.dtype, key_states.device)
        if got != (self.kv_heads, self.head_dim, pool.dtype, device):
            raise ValueError(
                f"PagedCache: K/V of (kv heads, head_dim, dtype, device) {got}; the cache and its pool hold "
                f"{(self.kv_heads, self.head_dim, pool.dtype, device)}"
            )
        if self._host is None:
            self._host = torch.empty(self.num_layers, batch, 0, dtype=torch.int32)
        elif batch != self._host.shape[1]:
            raise ValueError(f"PagedCache holds {self._host.shape[1]} rows, got K/V for {batch}")
        if self.eviction is not None:
            self._before_evicting_forward(layer_idx, new)
        start = self._lens[layer_idx]
        end = start + new
        self._prepare_tokens(end, new)
        if self.kv_layout is not None:  # stored quantized (`_write_quantized`); attended as they are
            self._write_quantized(layer_idx, start, key_states, value_states)
            self._lens[layer_idx] = end
            self._pending = (layer_idx, key_states, value_states)
            _ACTIVE.set(self._weak_self)
            return key_states, value_states
        triton = use_triton(key_states)
        deferred = new == 1 and triton and self.eviction is None  # eviction reads the stored key's logit
        if not deferred:
            write = write_kv if triton else write_kv_torch
            k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [batch, new, kv heads, dim]
            write(pool.storage, pool.page_elems, self._layer_tables[layer_idx], start, k, v, self.block_size)
        self._lens[layer_idx] = end
        self._pending = (layer_idx, key_states, value_states if deferred else None)
        _ACTIVE.set(self._weak_self)
        return key_states, value_states

    def _write_quantized(
        self, layer_idx: int, start: torch.Tensor | int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> None:
        """Quantize and store K/V [batch, kv_heads, new, head_dim] from position start (or start[b]), a
        decode token too: in the attention launch its store took registers the attention needed
        (`kernels/paged_attention_quant._quant_tiles`)."""
        triton = use_triton(key_states)
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        write = write_kv_quant if triton else write_kv_quant_torch
        write(self.pool.storage, self.kv_layout, self._layer_tables[layer_idx], start, k, v)

    def _take_step(
        self, layer_idx: int, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(layer's page table, the new V whose K/V the attention must still store, or None) if ``key`` is
        what ``update`` just took for ``layer_idx``; None otherwise."""
        pending = self._pending
        if pending is None or pending[1] is not key or pending[0] != layer_idx:
            return None
        self._pending = None
        return self._layer_tables[layer_idx], pending[2]

    def _decode(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        table: torch.Tensor,
        key_mask: torch.Tensor | None,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """One layer of a decode step through the ``PagedDecode`` planned for these shapes; plans live until
        the page tables change width (every ``block_size`` tokens) or rows."""
        backend = "triton" if use_triton(query) else "torch"  # the package's rule, not the kernels' own
        plan_key = (query.shape, key_mask is not None, sliding_window, scale, backend)
        plan = self._plans.get(plan_key)
        if plan is None:
            batch, heads, _, head_dim = query.shape
            plan = PagedDecode(
                self.pool.storage, self.pool.page_elems, self.block_size, batch, heads, self.kv_heads, head_dim,
                table.shape[1], scale, key_mask is not None, sliding_window, backend=backend,
            )  # fmt: skip
            self._plans[plan_key] = plan
        return plan(query, key, value, table, self._kv_lens, key_mask)

    def _attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        new_value: torch.Tensor | None,
        table: torch.Tensor,
        key_mask: torch.Tensor | None,
        scale: float,
        sliding_window: int | None,
        logits: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of a forward over pages in the pool's dtype (its K/V already stored, or stored by
        the decode launch when `new_value` is given)."""
        length = self._lens[layer_idx]
        if key_mask is not None and key_mask.shape[-1] < length:
            raise ValueError(f"the attention mask covers {key_mask.shape[-1]} positions, the cache {length}")
        if new_value is not None:
            return self._decode(query, key, new_value, table, key_mask, scale, sliding_window)
        pool = self.pool
        args = (query.transpose(1, 2), pool.storage, pool.page_elems, table, self._kv_lens, self.block_size,
                self.kv_heads, scale)  # fmt: skip
        if use_triton(query):
            return paged_attention(*args, key_mask=key_mask, sliding_window=sliding_window, logits=logits)
        return paged_attention_torch(*args, key_mask=key_mask, sliding_window=sliding_window)

    def _attend_quantized(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        table: torch.Tensor,
        key_mask: torch.Tensor | None,
        scale: float,
        sliding_window: int | None,
        logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of a forward over quantized pages: the tokens before it dequantized from their
        pages, its own tokens (key, value [batch, kv_heads, new, head_dim]) as they are."""
        if use_triton(query):
            mask = key_mask if key_mask is None or key_mask.dtype == torch.bool else key_mask.bool()
            return paged_attention_quant(
                q=query.transpose(1, 2), k_new=key.transpose(1, 2), v_new=value.transpose(1, 2),
                storage=self.pool.storage, layout=self.kv_layout, block_table=table, kv_lens=self._kv_lens,
                scale=scale, key_mask=mask, sliding_window=sliding_window, logits=logits,
            )  # fmt: skip
        new = key.shape[2]
        starts = (self._kv_lens - new).tolist()  # each row's tokens before this forward (< 0: left padding)
        longest = max(starts)
        if longest <= 0 and min(starts) < longest:  # empty rows, left-padded: the padding is not a key
            positions = torch.tensor(starts, device=key.device)[:, None] + torch.arange(new, device=key.device)
            stored = positions >= 0
            if key_mask is not None:  # by position, as the Triton kernel reads it
                stored &= key_mask.bool().gather(1, positions.clamp(min=0))
            return _dense_attention(query, key, value, stored, scale, sliding_window)
        past_k, past_v = gather_kv_quant_torch(self.pool.storage, self.kv_layout, table, longest)
        past_k, past_v = past_k.to(query.dtype).transpose(1, 2), past_v.to(query.dtype).transpose(1, 2)
        if min(starts) == longest:  # one length for every row (generate, a prefill)
            full_k, full_v = torch.cat([past_k, key], dim=2), torch.cat([past_v, value], dim=2)
            return _dense_attention(query, full_k, full_v, key_mask, scale, sliding_window)
        return _ragged_decode_attention(query, key, value, past_k, past_v, starts, key_mask, scale, sliding_window)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen (positions), evicted ones included."""
        return self._lens[layer_idx] + self._evicted if layer_idx < self.num_layers else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    # -- fixed addresses, for decode steps replayed from a CUDA graph ----------------------------------------
    def reserve(self, max_tokens: int) -> None:
        """Keep the device page table ``max_tokens`` wide from now on, updated in place, so that its address,
        and those of the lengths and the key mask, stay put from step to step (a captured graph reads them).
        Pages are still taken a block at a time; a longer sequence gets a wider table (a new address)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self._reserved_blocks = -(-max_tokens // self.block_size)
        self._table_stale = True

    def begin_step(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Do the host bookkeeping of one decode token for every layer at once (a new block where one is
        due, the lengths, the key mask copied into a fixed buffer), so that the forward that follows, or a
        graph replay of one, does nothing on the host: ``update`` then only hands each layer's K/V to the
        attention (quantized K/V it stores first, at positions read from the fixed lengths). Needs Triton
        (the decode launch stores the new K/V) and ``reserve``; ``attention_mask``
        is the step's 2-D mask, [batch, tokens so far + 1]. Returns the fixed key mask buffer. Call
        ``end_step`` after the forward.

        With heavy-hitter eviction, a compaction due at this token happens here, the key mask buffer
        holds the slot mask, and the step's scores go to the lent buffer (``adopt``)."""
        if not self._reserved_blocks or self._host is None:
            raise RuntimeError("PagedCache.begin_step needs reserve() and a filled cache (a prefill first)")
        batch = self._host.shape[1]
        logical_end = self.get_seq_length() + 1
        if attention_mask.shape != (batch, logical_end):
            raise ValueError(
                f"begin_step: attention_mask must be [{batch}, {logical_end}], got {tuple(attention_mask.shape)}"
            )
        if self.eviction is not None:
            self._compact_if_due()
        end = self._length() + 1
        self._prepare_tokens(end, 1)
        width = self._table.shape[2] * self.block_size
        mask = self._step_mask
        if mask is None or mask.shape != (self._device_rows(), width):
            mask = self._step_mask = torch.ones(self._device_rows(), width, dtype=torch.bool, device=self._device)
        if self._step_masked is None:  # one sync per call: the key mask costs the int4 kernel ~15%
            self._step_masked = not bool(attention_mask.all())
        if self.eviction is not None:
            attention_mask = self.eviction.note_step(attention_mask[:, -1].to(self._device), end, logical_end)
        mask[:batch, :end].copy_(attention_mask, non_blocking=True)
        self._lens = [end] * self.num_layers
        self._stepping = True
        return mask

    def step_masked(self) -> bool:
        """Whether begun steps read the key mask: False once the first found no padding in the call's
        mask (HF's decode steps only add real tokens). A graph is captured with the mask or without."""
        return self._step_masked is not False

    def end_step(self) -> None:
        """Close a step begun by ``begin_step``; a forward that failed part-way leaves nothing pending."""
        self._stepping, self._pending = False, None

    def step_shape(self, rows: int) -> tuple[int, int]:
        """(rows, device table width in blocks) of this cache's step buffers padded to ``rows``: the step
        buffers of caches of one shape are interchangeable."""
        return rows, self._table.shape[2]

    def step_state(self) -> StepBuffers:
        """The step buffers and decode plans, for ``adopt`` by a later cache."""
        scores = self.eviction._scores if self.eviction is not None and self.eviction.lent else None
        return StepBuffers(self._table, self._kv_lens, self._step_mask, self._plans, scores)

    def adopt(self, state: StepBuffers | None, rows: int | None = None) -> None:
        """After the prefill, before the first ``begin_step``: use ``state`` (another cache's
        ``step_state`` of the same ``step_shape``) as this cache's step buffers, so that graphs captured
        over them read this cache; None: make this cache's own buffers (table, lengths, key mask) now.

        ``rows`` (default: the batch) pads the buffers to a batch bucket, so that calls of a few batch
        sizes share one graph: a padding row has one token (its K/V land in slot 0 of this cache's
        discard page, taken now if the cache has none), attends to it alone, and its outputs are dropped."""
        batch = self._host.shape[1]
        rows = batch if rows is None else rows
        if rows < batch:
            raise ValueError(f"adopt: {rows} step rows cannot hold the cache's {batch} rows")
        if rows > batch and self._discard is None:
            self._set_discard(self.pool.allocate(1, "kv")[0])
        self._step_rows, self._kv_lens_end, self._table_stale = rows, -1, True
        width = self._table.shape[2] * self.block_size
        scores_shape = (self.num_layers, rows, self.kv_heads, width)
        if state is None:
            self._upload_table()  # padded to the step rows
            self._kv_lens = torch.empty(rows, dtype=torch.int32, device=self._device)
            self._step_mask = torch.ones(rows, width, dtype=torch.bool, device=self._device)
            scores = torch.empty(scores_shape, device=self._device) if self.eviction is not None else None
        else:
            table, kv_lens, mask, scores = state.table, state.kv_lens, state.key_mask, state.scores
            if (table.shape != (self.num_layers, *self.step_shape(rows)) or kv_lens.shape != (rows,)
                    or mask.shape != (rows, width)
                    or (None if scores is None else scores.shape) != (None if self.eviction is None else scores_shape)):  # fmt: skip
                raise ValueError(f"adopt: buffers of another shape than this cache's {self.step_shape(rows)}, or "
                                 "scores where the cache evicts nothing (or none where it does)")  # fmt: skip
            mask[batch:].fill_(True)  # a padding row of an earlier call may have had padding of its own
            self._table, self._layer_tables = table, table.unbind(0)
            self._kv_lens, self._step_mask, self._plans = kv_lens, mask, state.plans
        if scores is not None:
            self.eviction.lend(scores)
        self.adopted = True

    def step_buffers(self) -> tuple[torch.Tensor, ...]:
        """The fixed device buffers a step begun by ``begin_step`` reads: table, lengths, key mask (and,
        with eviction, the scores it adds to)."""
        if self.eviction is not None:
            return self._table, self._kv_lens, self._step_mask, self.eviction._scores
        return self._table, self._kv_lens, self._step_mask

    def _prepare_tokens(self, end: int, new: int) -> None:
        """Pages, device table and lengths for a forward that brings the rows to ``end`` tokens, ``new`` of
        them in this forward."""
        missing = -(-end // self.block_size) - self._host.shape[2]
        if missing > 0:
            self._release_finished_rows()
            self._grow(missing)
        if self._table_stale:
            self._upload_table()
        if self._kv_lens_end != end:
            batch, rows = self._host.shape[1], self._device_rows()
            if self._kv_lens is None or self._kv_lens.shape[0] != rows:
                self._kv_lens = torch.empty(rows, dtype=torch.int32, device=self._device)
            self._kv_lens.fill_(end)
            if rows > batch:  # padding rows (adopt): their one token
                self._kv_lens[batch:].fill_(new)
            if self._finished is not None and self._finished.any():  # they attend to their new tokens alone
                self._kv_lens[:batch].masked_fill_(self._finished.to(self._device, non_blocking=True), new)
            self._kv_lens_end = end

    def _upload_table(self) -> None:
        """Copy the host table to the device: in place into the reserved table while it fits (same address),
        else into a new tensor of the host table's width."""
        host, device = self._host, self._device
        layers, batch, width = host.shape
        rows = self._device_rows()
        if rows > batch:  # padding rows (adopt) name the discard page
            host = torch.cat([host, torch.full((layers, rows - batch, width), self._discard, dtype=torch.int32)], dim=1)
        staged = staged_for(host, device)
        table = self._table
        wide = max(width, self._reserved_blocks)
        if table is None or table.shape != (layers, rows, wide):
            # Unused columns name page 0: the kernels read no block past a row's length.
            table = self._table = torch.zeros(layers, rows, wide, dtype=torch.int32, device=device)
            self._layer_tables = table.unbind(0)
            self._plans = {}
        table[:, :, :width].copy_(staged, non_blocking=True)
        self._table_stale = False

    # -- what generate() and users call between forwards -----------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes old row ``beam_idx[i]`` (pages shared, copy-on-write of partial blocks)."""
        if self._finishing is not None:
            raise RuntimeError(
                "ReleaseFinishedRows works with greedy search and sampling, not beam search: a beam that "
                "ends is replaced, not finished"
            )
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (ints or a bool mask), in that order; rows may repeat."""
        if self._host is None:
            return
        self._refuse_with_eviction("reordering or selecting rows (beam search, contrastive search)")
        indices = torch.as_tensor(indices).cpu()
        indices = indices.nonzero().flatten() if indices.dtype == torch.bool else indices.long()
        self._replace(self._host.index_select(1, indices), self._length(), indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row ``repeats`` times in place (beams / ``num_return_sequences``), sharing its pages."""
        if self._host is not None:
            self._refuse_with_eviction("repeating rows of a filled cache")
            rows = torch.arange(self._host.shape[1]).repeat_interleave(repeats)
            self._replace(self._host.index_select(1, rows), self._length(), rows)

    def crop(self, max_length: int) -> None:
        """HF semantics: ``crop(-n)`` drops the last n tokens, ``crop(n > 0)`` keeps the first n, 0 does nothing."""
        self._refuse_with_eviction("crop (assisted decoding)")
        length = self._length()
        keep = max(length + max_length, 0) if max_length < 0 else min(max_length or length, length)
        if self._host is not None and keep != length:
            self._replace(self._host[:, :, : -(-keep // self.block_size)], keep)

    def reset(self) -> None:
        self.release()

    def _refuse_with_eviction(self, what: str) -> None:
        if self.eviction is not None:
            raise NotImplementedError(f"heavy-hitter eviction (kv_budget) does not support {what}")

    def release(self) -> None:
        """Give every page back to the pool and empty the cache (idempotent; the cache stays usable)."""
        if getattr(self, "_host", None) is not None:
            self.pool.free(self._pages_of(self._host) + ([] if self._discard is None else [self._discard]))
        self._reset_state()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the pool may already be gone
            self.release()

    # -- heavy-hitter eviction (eviction.py) ------------------------------------------------------------------
    def _before_evicting_forward(self, layer_idx: int, new: int) -> None:
        """A prompt is scored in the cache's first forward only. The first decode step compacts every layer
        to the budget (as SnapKV does: waiting for a block boundary let rows attend to the whole prompt
        for up to a block of steps, 59 with int4 pages), and so does every decode token that starts a
        new block (a row holds at most the budget and one block)."""
        if new > 1 and self._lens[layer_idx]:
            raise NotImplementedError(
                "heavy-hitter eviction scores the prompt in the cache's first forward; later forwards take one "
                "token per row (no chunked prefill, assisted decoding or multi-turn reuse of the cache)"
            )
        if layer_idx == 0 and new == 1:
            self._compact_if_due()

    def _compact_if_due(self) -> None:
        """Before a decode token (see `_before_evicting_forward`)."""
        slots = self._lens[0]
        if slots and (slots % self.block_size == 0 or not self._prompt_compacted):
            self._prompt_compacted = True
            self._compact(slots)

    def _evicting_mask(self, layer_idx: int, key: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """The key mask over the layer's slots (HF's mask is over positions, which no longer line up)."""
        slots = self._lens[layer_idx]
        return self.eviction.slot_mask(key, key_mask, slots, slots + self._evicted)

    def _score(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, table: torch.Tensor,
               key_mask: torch.Tensor, scale: float, logits: torch.Tensor | None) -> None:  # fmt: skip
        """Add this forward's attention to the layer's scores: the prompt's (an observation window of
        its last queries) or a decode step's (the kernel's logits, or computed here on the torch path).
        A begun step's positions were noted by begin_step (a graph replays what happens here)."""
        slots, new = self._lens[layer_idx], key.shape[2]
        if not self._stepping:
            self.eviction.note_positions(layer_idx, slots, new, slots + self._evicted)
        if new > 1:
            self.eviction.add_prefill(layer_idx, query, key, key_mask, scale)
            return
        if logits is None:  # the torch path: the keys as the attention read them, this token's exact
            if self.kv_layout is not None:
                keys, _ = gather_kv_quant_torch(self.pool.storage, self.kv_layout, table, slots)
            else:
                keys, _ = gather_kv(self.pool.storage, self.pool.page_elems, table, self._kv_lens, self.block_size,
                                    self.kv_heads, self.head_dim)  # fmt: skip
            keys = keys[:, :slots].to(query.dtype).clone()
            keys[:, -1] = key[:, :, 0]
            group = query.shape[1] // self.kv_heads
            logits = torch.einsum("bhd,bnhd->bhn", query[:, :, 0].float(), keys.float().repeat_interleave(group, 2))
            logits = logits * (scale * LOG2_E)
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask[:, None, :slots], float("-inf"))
        self.eviction.add_decode(layer_idx, logits, self._kv_lens)

    def _compact(self, slots: int) -> None:
        """Keep each layer's chosen slots (HeavyHitters.keep) in place (`in_place_moves`) and give back
        the pages past the new length; allocates nothing."""
        keep = self.eviction.keep(slots, slots + self._evicted)
        if keep is None:
            return
        layers, batch, _ = self._host.shape
        kept, rows = keep.shape[-1], layers * batch
        source, move_from, to = in_place_moves(keep, slots)
        if self._table_stale:
            self._upload_table()
        data, regions, page_size = self._slot_regions()
        table = self._table[:, :batch].reshape(rows, -1).long()
        move_slots(data, regions, page_size, self.block_size, table, table, move_from.view(rows, *move_from.shape[2:]),
                   to.view(rows, *to.shape[2:]))  # fmt: skip
        host = self._host[:, :, : -(-kept // self.block_size)].clone()
        self.pool.free(sorted(self._unreferenced_by(host)))
        self.eviction.compact(source)
        self._set_table(host)
        self._lens = [kept] * self.num_layers
        self._evicted += slots - kept
        self._kv_lens_end = -1

    def _slot_regions(self) -> tuple[torch.Tensor, list[SlotRegion], int]:
        """The storage in the units the page layout counts (elements; bytes for quantized pages), the
        regions of a token's data, and the page size in those units."""
        dim, layout = self.head_dim, self.kv_layout
        if layout is None:
            token = self.kv_heads * dim
            regions = [SlotRegion(start, token, dim, dim) for start in (0, self.block_size * token)]
            return self.pool.storage, regions, self.pool.page_elems
        tokens, codes = layout.tokens, layout.code_bytes
        regions = [SlotRegion(start, codes, tokens * codes, codes) for start in (layout.k_codes, layout.v_codes)]
        meta = layout.meta_bytes  # every scale and minimum of a (token, head), together from k_scale on
        regions.append(SlotRegion(layout.k_scale, meta, tokens * meta, meta))
        return self.pool.storage.view(torch.uint8), regions, layout.page_bytes

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """With eviction: the position of the token each slot of the layer holds, int64 [batch, kv_heads,
        slots] (what its last forward attended to, per KV head)."""
        if self.eviction is None:
            raise ValueError("kept_positions needs heavy-hitter eviction (kv_budget < 1)")
        return self.eviction.positions[layer_idx][..., : self._lens[layer_idx]]

    # -- helpers ----------------------------------------------------------------------------------------------
    def _device_rows(self) -> int:
        """Rows of the device table and lengths: the batch, or the step rows it was padded to (adopt)."""
        batch = self._host.shape[1]
        return self._step_rows if self._step_rows and self._step_rows >= batch else batch

    def _length(self) -> int:
        if len(set(self._lens)) != 1:
            raise RuntimeError("PagedCache: layers hold different lengths (a forward is under way)")
        return self._lens[0]

    def _pages_of(self, table: torch.Tensor) -> list[int]:
        """The pages ``table`` names, the discard page aside (the cache owns that one until release)."""
        return [p for p in table.unique().tolist() if p != self._discard]

    def _unreferenced_by(self, table: torch.Tensor) -> set[int]:
        """Pages of the current table that ``table`` no longer names: what replacing it frees."""
        return set(self._pages_of(self._host)) - set(self._pages_of(table))

    def _set_table(self, host: torch.Tensor) -> None:
        self._host, self._table_stale = host, True

    def note_attention_mask(self, attention_mask: torch.Tensor) -> None:
        """The 2-D mask of the forward about to run; used when that forward fills the empty cache: blocks that
        hold only a row's leading padding then share the discard page. (``use_paged_attention``'s hook calls
        this; calling it by hand is for forwards that get the cache positionally.)"""
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [batch, tokens], got shape {tuple(attention_mask.shape)}"
            )
        if self._host is None:
            self._fill_mask = attention_mask

    def _grow(self, missing: int) -> None:
        """Add ``missing`` blocks to every layer and row in ONE allocation (all or nothing): a fresh page each,
        but blocks of leading padding (first fill only) and blocks of finished rows get the discard page."""
        layers, batch, have = self._host.shape
        needs_page = torch.ones(batch, missing, dtype=torch.bool)
        if self._fill_mask is not None and have == 0 and self._fill_mask.shape[0] == batch:
            padding = (self._fill_mask.cumsum(-1) == 0).sum(-1).cpu()  # leading zeros per row
            block_end = (torch.arange(missing) + 1) * self.block_size
            needs_page &= block_end[None, :] > padding[:, None]
        if self._finished is not None:
            needs_page &= ~self._finished[:, None]
        per_layer = int(needs_page.sum())
        new_discard = self._discard is None and not bool(needs_page.all())
        pages = self.pool.allocate(layers * per_layer + new_discard, "kv")
        if new_discard:
            self._set_discard(pages.pop())
        fresh = torch.full(
            (layers, batch, missing), -1 if self._discard is None else self._discard, dtype=torch.int32
        )
        fresh[:, needs_page] = torch.tensor(pages, dtype=torch.int32).view(layers, per_layer)
        self._fill_mask = None
        self._set_table(torch.cat([self._host, fresh], dim=2))

    def mark_finished(self, rows: torch.Tensor) -> None:
        """Rows (bool ``[batch]``, on any device; sticky) that will never be read again: their pages return
        to the pool at the next block boundary. Called by ``ReleaseFinishedRows``; no device->host sync."""
        rows = rows.to(torch.bool)
        self._finishing = rows.clone() if self._finishing is None else self._finishing | rows

    def _release_finished_rows(self) -> None:
        """Point every block of newly finished rows at the discard page and free what no row names any more
        (one device->host copy of the flags, at a block boundary)."""
        if self._finishing is None or self._host is None:
            return
        finishing = self._finishing.cpu()
        if finishing.shape[0] != self._host.shape[1]:
            raise ValueError(
                f"{finishing.shape[0]} finished-row flags for a cache of {self._host.shape[1]} rows"
            )
        finished = self._finished if self._finished is not None else torch.zeros_like(finishing)
        newly = finishing & ~finished
        if newly.any() and self._host.shape[2]:
            table = self._host.clone()
            table[:, newly] = -1
            freed = self._unreferenced_by(table)
            if self._discard is None:  # one of the freed pages becomes it (the pool may be full)
                self._set_discard(freed.pop() if freed else self.pool.allocate(1, "kv")[0])
            table[table == -1] = self._discard
            self.pool.free(sorted(freed))
            self._set_table(table)
            self._kv_lens_end = -1
        self._finished = finished | finishing

    def _set_discard(self, page: int) -> None:
        """Zeroed once: rows that attend to it must see finite numbers, whatever was in the page before."""
        self._discard = page
        self.pool.storage[page * self.pool.page_elems : (page + 1) * self.pool.page_elems].zero_()

    def _replace(self, table: torch.Tensor, length: int, rows: torch.Tensor | None = None) -> None:
        """Install ``table`` (rows ``rows`` of the current one, or blocks cut from it) holding ``length`` tokens.

        Rows only ever write into the block at ``length``; where that block is partial and shared by several
        rows (or is the discard page of a row that has not finished), every row but the first gets a copy.
        Then pages no entry names any more go back to the pool.
        """
        finished = (
            self._finished if self._finished is not None else torch.zeros(table.shape[1], dtype=torch.bool)
        )
        if rows is not None:
            finished = finished[rows]
        copies: list[tuple[int, int, int]] = []  # (layer, row, page to copy)
        last = length // self.block_size
        if length % self.block_size:
            seen: set[int] = set()
            for flat, page in enumerate(table[:, :, last].flatten().tolist()):
                layer, row = divmod(flat, table.shape[1])
                if finished[row]:
                    continue
                if page in seen or page == self._discard:
                    copies.append((layer, row, page))
                seen.add(page)
        fresh = self.pool.allocate(len(copies), "kv") if copies else []  # raises before any change
        if copies:
            table = table.clone()
            used = self.pool.page_elems if self.kv_layout is not None else 2 * self.block_size * self.kv_heads * self.head_dim
            pages = self.pool.storage[: self.pool.num_pages * self.pool.page_elems].view(
                self.pool.num_pages, -1
            )
            src = torch.tensor([page for *_, page in copies], device=self.pool.storage.device)
            pages[torch.tensor(fresh, device=self.pool.storage.device), :used] = pages[src, :used]
            for (layer, row, _), page in zip(copies, fresh, strict=True):
                table[layer, row, last] = page
        self.pool.free(sorted(self._unreferenced_by(table)))
        if self._finished is not None:
            self._finished = finished
        if self._finishing is not None and rows is not None:
            self._finishing = self._finishing[rows.to(self._finishing.device)]
        self._set_table(table.contiguous())
        self._lens = [length] * self.num_layers
        self._kv_lens_end = -1


class ReleaseFinishedRows(StoppingCriteria):
    """A stopping criterion that ends rows on an EOS token, as generate's own does, and tells ``cache`` so:
    their KV pages go back to the pool at the next block boundary (a batch that keeps decoding for its
    longest row holds only the live rows' pages). For greedy search and sampling (not beam search).

    The rows it releases are exactly those it reports as done, so generate() never reads them again. A
    released row attends to nothing, so its logits after its EOS (``output_scores`` / ``output_logits``)
    are not those DynamicCache would give; its tokens are padding either way.
    """

    def __init__(self, cache: PagedCache, eos_token_id: int | Sequence[int] | torch.Tensor) -> None:
        eos = torch.as_tensor(eos_token_id).flatten()
        if eos.numel() == 0 or eos.is_floating_point():
            raise ValueError(f"eos_token_id must be one or more token ids, got {eos_token_id!r}")
        self.cache, self._eos = cache, eos

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        if self._eos.device != input_ids.device:
            self._eos = self._eos.to(input_ids.device)
        done = torch.isin(input_ids[:, -1], self._eos)
        self.cache.mark_finished(done)
        return done
