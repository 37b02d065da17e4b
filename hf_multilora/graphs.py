"""Decode steps of `MultiLoraModel.generate` replayed from a CUDA graph.

Why: HF's eager decode step is host-bound. Each of the model's layers costs Python and launch time,
so a step of a 7B model at batch 32 takes ~30 ms of host work for a few ms of GPU work. A captured
graph replays the whole forward with one launch.

How, in one generate() call: the model's `forward` is wrapped (`DecodeGraphs.__call__`). A forward of
one new token per row on the call's PagedCache is a decode step; anything else (the prefill, a call
asking for attentions) runs eager. For a decode step the cache first does the step's host
bookkeeping (`PagedCache.begin_step`: a new block where one is due, written into the reserved device
table in place; lengths and key mask in fixed buffers), the token ids and positions are copied into
fixed input buffers, and the graph of that batch size is replayed. The first step of a batch size
runs the forward eagerly once (Triton compiles, the LoRA plan and the decode plans are prepared, the
step's K/V are stored) and then captures it: storing the same K/V again is harmless.

What a graph reads must keep its address while the graph lives: the entry holds a reference to every
such object (inputs, the cache's table, lengths, mask and decode plans, the LoRA plan, its prepared
launches and workspace), so no other tensor can take those addresses, and a key built from them can
never match a graph captured over freed memory. The LoRA plan depends only on the rows' adapters,
fixed for the call; graphs live as long as the call.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .cache import PagedCache

# Keywords HF's generate() gives a decode forward that a replay reproduces (inputs copied in, or
# fixed for the call); anything else makes the step eager.
_REPLAYABLE = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
               "return_dict", "logits_to_keep"}  # fmt: skip
_FLAGS_FOR_EAGER = ("output_attentions", "output_hidden_states")
logger = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [batch, 1], copied into before each replay
    position_ids: torch.Tensor  # [batch, 1]
    output: Any  # the ModelOutput the capture returned; its tensors are the graph's outputs
    kept: tuple  # everything else the graph reads (see the module doc)


class DecodeGraphs:
    """The wrapped forward of one generate() call: decode steps replayed, the rest eager.

    `forward`: the model's own forward. `cache`: the call's PagedCache (reserved). `lora_state()`:
    the LoRA runtime's objects a captured step reads (kept alive with the graph). `stats`: counts of
    captures, replays and eager steps by reason, added to by every call. A capture that fails
    (e.g. a driver without programmatic dependent launch in graphs) raises when `required`, else
    its steps run eager, counted, with a warning.
    """

    def __init__(
        self,
        forward: Callable,
        cache: PagedCache,
        lora_state: Callable[[], tuple],
        stats: Counter,
        required: bool = False,
    ) -> None:
        self.forward, self.cache, self.lora_state, self.stats = forward, cache, lora_state, stats
        self.required = required
        self._graphs: dict[tuple, _Captured | None] = {}  # None: its capture failed
        self._pool = torch.cuda.graph_pool_handle()
        functools.update_wrapper(self, forward)  # generate() inspects the forward's signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reason = self._eager_reason(args, kwargs)
        if reason is not None:
            self.stats[f"eager: {reason}"] += 1
            return self.forward(*args, **kwargs)
        key_mask = self.cache.begin_step(kwargs["attention_mask"])
        try:
            step_kwargs = {**kwargs, "attention_mask": key_mask[:, : kwargs["attention_mask"].shape[1]]}
            input_ids = kwargs["input_ids"]
            lora_plan = self.lora_state()[0]
            key = (input_ids.shape[0], id(lora_plan), *(t.data_ptr() for t in self.cache.step_buffers()))
            if key not in self._graphs:
                output = self._capture(key, step_kwargs)
                if output is not None:  # the capture failed: the eager warm-up did this step
                    return output
            captured = self._graphs[key]
            if captured is None:
                self.stats["eager: capture failed"] += 1
                return self.forward(**step_kwargs)
            captured.input_ids.copy_(input_ids)
            captured.position_ids.copy_(kwargs["position_ids"])
            captured.graph.replay()
            self.stats["replays"] += 1
            return type(captured.output)(captured.output)  # a shallow copy: the caller may edit it
        finally:
            self.cache.end_step()

    def close(self) -> None:
        """Drop the graphs (and their memory); the call is over."""
        self._graphs.clear()

    def _eager_reason(self, args: tuple, kwargs: dict) -> str | None:
        if args:
            return "positional arguments"
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        input_ids = kwargs.get("input_ids")
        if cache is not self.cache or input_ids is None or input_ids.dim() != 2:
            return "not a step on the call's cache"
        if input_ids.shape[1] != 1 or self.cache.get_seq_length() == 0:
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

    def _capture(self, key: tuple, kwargs: dict) -> Any:
        """Run the step eagerly (compiles and prepares everything; stores this step's K/V), then
        capture it on fixed inputs into `self._graphs[key]`. Returns None, or the eager output
        when the capture failed (the key then runs eager)."""
        step = {**kwargs, "input_ids": kwargs["input_ids"].clone(), "position_ids": kwargs["position_ids"].clone()}
        eager = self.forward(**step)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
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
        kept = (*self.cache.step_buffers(), *self.cache.decode_plans(), *self.lora_state(), step)
        self._graphs[key] = _Captured(graph, step["input_ids"], step["position_ids"], output, kept)
        return None
