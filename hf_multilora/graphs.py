"""Decode steps of `MultiLoraModel.generate` replayed from CUDA graphs.

Why: HF's eager decode step is host-bound. Each of the model's layers costs Python and launch time,
so a step of a 7B model at batch 32 takes ~30 ms of host work for ~9 ms of GPU work. A captured
graph replays the whole forward with one launch.

How: during a graph-enabled generate() call the model's `forward` is `DecodeGraphs.__call__`. A
forward of one new token per row on the call's PagedCache is a decode step; anything else (the
prefill, a call asking for attentions) runs eager. For a decode step the cache first does the
step's host bookkeeping (`PagedCache.begin_step`: a new block where one is due, written into the
reserved device table in place; lengths and key mask in fixed buffers), the token ids and positions
are copied into fixed input buffers, and the graph is replayed. A new graph key runs the step
eagerly once (Triton compiles, plans are prepared, the step's K/V stored), which is that step's
result, and then captures it without running it.

Graphs outlive calls, so a new mix of adapters replays the graph it already has: the LoRA launches
of a decode step use `LoraRuntime`'s fixed decode tables (a tile per row, the rows' adapter
metadata rewritten in place per call; grids depend on the batch bucket and a rank capacity only),
and a call's PagedCache adopts the step buffers (table, lengths, key mask, decode plans) of the
first call of its shape. Batches are padded to a few sizes (`batch_bucket`): calls of 5, 6, 7 or 8
rows replay one graph; a padding row reads token 0 at position 0, has no adapter, writes its K/V
into the cache's discard page and its logits are dropped. The key is (batch bucket, the fixed LoRA plan, the adapter row table, the
LoRA modules' epoch, whether steps read the key mask, the step buffers' addresses). What a graph reads keeps its address while the
graph lives: the entry holds a reference to every such object, so no other tensor can take those
addresses and a key never matches a graph captured over freed memory.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .cache import PagedCache, StepBuffers
from .kernels.kv_quant import KvLayout
from .layers import LoraCapture

# Keywords HF's generate() gives a decode forward that a replay reproduces (inputs copied in, or
# fixed for the call); anything else makes the step eager.
_REPLAYABLE = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
               "return_dict", "logits_to_keep"}  # fmt: skip
_FLAGS_FOR_EAGER = ("output_attentions", "output_hidden_states")
logger = logging.getLogger(__name__)


def batch_bucket(rows: int) -> int:
    """The batch size a decode step of `rows` rows is padded to: 1, 2, 4, 8, then multiples of 8 (as
    vLLM's capture sizes): at most 7 padding rows, one graph per 8 batch sizes above 8."""
    if rows < 1:
        raise ValueError(f"a decode step has one or more rows, got {rows}")
    return 1 << (rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8


def eager_reason(cache: PagedCache | None, args: tuple, kwargs: dict) -> str | None:
    """Why a forward of a graph-enabled call on `cache` cannot be a replayed decode step (None: it can)."""
    if args:
        return "positional arguments"
    given = kwargs.get("cache", kwargs.get("past_key_values"))
    input_ids = kwargs.get("input_ids")
    if cache is None or given is not cache or input_ids is None or input_ids.dim() != 2:
        return "not a step on the call's cache"
    if input_ids.shape[1] != 1 or cache.get_seq_length() == 0:
        return "prefill"
    if any(kwargs.get(flag) for flag in _FLAGS_FOR_EAGER):
        return "attentions or hidden states asked for"
    unknown = sorted(k for k, v in kwargs.items() if k not in _REPLAYABLE and v is not None)
    if unknown:
        return f"inputs a replay does not take ({', '.join(unknown)})"
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is None or mask.dim() != 2 or positions is None or positions.shape != input_ids.shape:
        return "no 2-D attention mask or position ids"
    if kwargs.get("use_cache") is False:
        return "use_cache=False"
    return None


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [batch, 1], copied into before each replay
    position_ids: torch.Tensor  # [batch, 1]
    output: Any  # the ModelOutput the capture returned (its cache entry cleared); the graph's outputs
    cache_key: str | None  # the output's entry that names the cache: set to the calling one's
    kept: tuple  # everything else the graph reads (see the module doc)
    pool_bytes: int  # device memory the allocator reserved during the capture (the graph's pool)


class DecodeGraphs:
    """The wrapped forward of a model's generate() calls: decode steps replayed, the rest eager.

    Kept across calls (one per LoRA runtime): graphs are keyed by batch bucket, the LoRA launches'
    identity (batch bucket and rank capacity, not the adapters), the LoRA modules (`epoch()`) and the
    addresses of the KV step buffers, which a call's cache adopts from the calls before it
    (`_buffers`, by batch bucket, table width and the layout of quantized KV pages). So a new adapter
    mix replays the same graph.

    `forward`: the model's own forward. `lora_state()`: the LoRA runtime's objects a captured step
    reads (kept alive with the graph). `stats`: counts of captures, replays and eager steps by
    reason. A capture that fails (e.g. a driver without programmatic dependent launch in graphs)
    raises in a call that requires graphs, else its steps run eager, counted, with a warning.
    """

    def __init__(
        self, forward: Callable, lora_state: Callable[[], LoraCapture], epoch: Callable[[], int], stats: Counter
    ) -> None:
        self.forward, self.lora_state, self.epoch, self.stats = forward, lora_state, epoch, stats
        self.cache: PagedCache | None = None
        self.required = False
        self._graphs: dict[tuple, _Captured | None] = {}  # None: its capture failed
        # (batch bucket, table width, KV page layout, evicting) -> the first cache's
        self._buffers: dict[tuple[int, int, KvLayout | None, bool], StepBuffers] = {}
        self._pool: Any = None  # the graphs' memory pool, made at the first capture
        functools.update_wrapper(self, forward)  # generate() inspects the forward's signature

    def start(self, cache: PagedCache, required: bool) -> None:
        """A generate() call on `cache` (reserved), or a serving engine's step on its StepCache, begins."""
        self.cache, self.required = cache, required

    def stop(self) -> None:
        self.cache = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reason = eager_reason(self.cache, args, kwargs)
        if reason is not None:
            self.stats[f"eager: {reason}"] += 1
            return self.forward(*args, **kwargs)
        cache, input_ids = self.cache, kwargs["input_ids"]
        rows = input_ids.shape[0]
        bucket = batch_bucket(rows)
        self._adopt_buffers(cache, bucket)
        mask = kwargs["attention_mask"]
        key_mask = cache.begin_step(mask)
        try:
            lora = self.lora_state()
            key = (
                bucket, id(lora.plan), lora.rows.data_ptr(), self.epoch(), cache.step_masked(),
                *(t.data_ptr() for t in cache.step_buffers()),
            )  # fmt: skip
            captured = self._graphs.get(key)
            if captured is None:  # not captured yet, or its capture failed: a step on inputs of its own
                step = {
                    **kwargs, "attention_mask": key_mask[:, : mask.shape[1]],
                    "input_ids": _padded(input_ids, bucket), "position_ids": _padded(kwargs["position_ids"], bucket),
                }  # fmt: skip
                if key in self._graphs and not self.required:
                    self.stats["eager: capture failed"] += 1
                    return _unpadded(self.forward(**step), rows)
                return _unpadded(self._capture(key, step), rows)  # the eager warm-up did this step
            captured.input_ids[:rows].copy_(input_ids)
            captured.position_ids[:rows].copy_(kwargs["position_ids"])
            captured.graph.replay()
            self.stats["replays"] += 1
            result = _unpadded(captured.output, rows)  # a shallow copy: the caller may edit it
            if captured.cache_key is not None:
                result[captured.cache_key] = cache
            return result
        finally:
            cache.end_step()

    def padding(self, args: tuple, kwargs: dict) -> int:
        """Padding rows the coming forward will run with (0 unless it is a replayed decode step): its
        LoRA plan gives them no adapter."""
        if eager_reason(self.cache, args, kwargs) is not None:
            return 0
        rows = kwargs["input_ids"].shape[0]
        return batch_bucket(rows) - rows

    def _adopt_buffers(self, cache: PagedCache, rows: int) -> None:
        """The first step of a call: take the step buffers (padded to `rows`) of an earlier call of this
        shape (so its graphs read this call's KV), or lend this call's to later ones."""
        if cache.adopted:
            return
        # a graph reads pages of one layout, and adds to scores where it evicts
        shape = (*cache.step_shape(rows), cache.kv_layout, cache.eviction is not None)
        if shape in self._buffers:
            cache.adopt(self._buffers[shape], rows)
        else:
            cache.adopt(None, rows)
            self._buffers[shape] = cache.step_state()

    def _capture(self, key: tuple, step: dict) -> Any:
        """Run the step (`step`: padded inputs of its own) eagerly (compiles and prepares everything;
        this is the step's result), then capture it on those inputs into `self._graphs[key]` (where
        the capture fails, the key runs eager). Returns the eager output: a replay now would run the
        step twice (with eviction, add its attention to the scores twice)."""
        eager = self.forward(**step)
        device = step["input_ids"].device
        try:
            if device.type != "cuda":  # on a CUDA host the capture would record nothing and succeed
                raise RuntimeError(f"CUDA graphs capture CUDA work, this step runs on {device}")
            graph = torch.cuda.CUDAGraph()
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                reserved = torch.cuda.memory_reserved(device)  # after the capture emptied the allocator's cache
                output = self.forward(**step)
        except RuntimeError as error:
            if self.required:
                raise
            logger.warning("hf_multilora: a decode step could not be captured in a CUDA graph (%s); "
                           "this call's steps run eager", error)  # fmt: skip
            self._graphs[key] = None
            self.stats["eager: capture failed"] += 1
            return eager
        self.stats["captures"] += 1
        cache_key = next((k for k, v in output.items() if v is self.cache), None)
        if cache_key is not None:
            output[cache_key] = None  # later calls have caches of their own
        kept = (*self.cache.step_state(), *self.lora_state())  # plans are only ever added to its dict
        pool_bytes = max(0, torch.cuda.memory_reserved(device) - reserved)
        self._graphs[key] = _Captured(graph, step["input_ids"], step["position_ids"], output, cache_key, kept, pool_bytes)
        return eager

    def pool_bytes(self) -> int:
        """Device memory reserved while the live graphs were captured: what their memory pool holds."""
        return sum(g.pool_bytes for g in self._graphs.values() if g is not None)


def _padded(rows: torch.Tensor, bucket: int) -> torch.Tensor:
    """`rows` [batch, ...] followed by zero rows up to `bucket` rows: inputs of their own for a capture."""
    padding = rows.new_zeros((bucket - rows.shape[0], *rows.shape[1:]))
    return torch.cat([rows, padding])


def _unpadded(output: Any, rows: int) -> Any:
    """A shallow copy of a forward's output with the padding rows of its tensors dropped."""
    result = type(output)(output)
    for name, value in output.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] > rows:
            result[name] = value[:rows]
    return result
