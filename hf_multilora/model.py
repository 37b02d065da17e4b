"""MultiLoraModel: one HF base model, many LoRA adapters, one batched generate() with an adapter per row.

The base model is left as it is: targeted linear layers get a forward that adds the SGMV delta of
the current plan, and a pre-forward hook on the model plans each forward once. Adapters live in a
host store (pinned when CUDA is there); a call copies the rank rows of the ones it needs into pages
of the model's unified page pool, which is created on the first call on the base model's device.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import unicodedata
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, StoppingCriteriaList

from . import fusion
from .adapters.host_store import HostAdapter
from .adapters.loading import AdapterSource, ModelTargets, check_peft_adapter, load_peft_adapter
from .cache import PagedCache, ReleaseFinishedRows, paged_attention_in, refuse_quantized_kv_on
from .eviction import KvBudget
from .graphs import DecodeGraphs
from .kernels.kv_quant import KV_DTYPES
from .kernels.sgmv import align_up
from .layers import LoraRuntime, add_lora_to_forward, rank_capacity
from .memory.page_pool import PagePool
from .routing import BASE_ADAPTER, batch_rows, expand_rows, forward_shape, resolve_adapter_ids

KV_BLOCK_SIZE = 16  # tokens per KV block: with the model's KV width it sets the pool's page size
DEFAULT_POOL_FRACTION = 0.5  # of the device memory free at the first call, when no size is given
DEFAULT_CPU_POOL_BYTES = 256 * 2**20
_HOST_READ_THREADS = 8  # adapters read from disk at once when a call misses several


class MultiLoraModel(torch.nn.Module):
    """A causal LM that serves many LoRA adapters at once: `generate(..., adapter_ids=[...])` gives
    each row of one batch its own adapter (or none), computed by SGMV kernels in one pass instead
    of PEFT's loop over adapters.

    It wraps the base model in place (a planning pre-hook on it; a LoRA forward on each module a
    registered adapter targets), so attributes it lacks fall through to the base model. Calls and
    registry changes on one instance run one at a time (a re-entrant lock).
    """

    def __init__(
        self,
        base_model: PreTrainedModel,
        *,
        pool_bytes: int | None = None,
        pool_fraction: float | None = None,
        host_cache_bytes: int | None = None,
    ) -> None:
        """Wrap an already loaded base model.

        The unified page pool (adapter weights and, through PagedCache, KV blocks) takes
        `pool_bytes`, or `pool_fraction` of the device memory free at the first call (default
        0.5 on CUDA; 256 MiB on CPU). Adapters the running call does not use are evicted least
        recently used first when pages run out.

        Registering an adapter checks it without reading its weights; they are read at first use
        into a host copy (pinned on CUDA). `host_cache_bytes` bounds those copies (None: keep all):
        past it the least recently used are dropped and read from disk again when needed.
        """
        super().__init__()
        self.base_model = base_model
        self._targets = ModelTargets.of(base_model)
        targets = self._targets.targets
        if not targets:
            raise ValueError(
                f"{type(base_model).__name__} has no Linear or Conv1D layer a LoRA adapter could target"
            )
        devices = {m.weight.device for n, m in base_model.named_modules() if n in targets}
        if len(devices) > 1:
            raise ValueError(
                f"the base model's layers are spread over {sorted(map(str, devices))}; one device only"
            )
        self._module_names = list(targets)
        self._modules_by_name = dict(base_model.named_modules())
        self._registry: dict[str, AdapterSource] = {}
        self._hosts: OrderedDict[str, HostAdapter] = OrderedDict()  # host copies, LRU order
        self._host_cache_bytes = _positive_or_none("host_cache_bytes", host_cache_bytes)
        self._host_loads = 0
        self._hooks: dict[int, Callable[[], None]] = {}  # module index -> undo of its LoRA forward
        self._module_index = {name: i for i, name in enumerate(self._module_names)}
        self._module_users: Counter[int] = Counter()  # module index -> registered adapters targeting it
        self._lock = threading.RLock()
        # Per thread: the row slots of the routed call this thread is running (the base model and
        # its planning hook are shared; another thread's plain call must not see them).
        self._routing = threading.local()
        self._graph_stats: Counter[str] = Counter()
        self._decode_graphs: DecodeGraphs | None = None  # of the current runtime, kept across calls
        self._hook_epoch = 0  # bumped when a module gains or loses its LoRA forward (graphs depend on it)
        self._pool_size = self._checked_pool_size(pool_bytes, pool_fraction)
        self._runtime: LoraRuntime | None = None  # built on the first call, on the base's device
        # The base model's hook and LoRA forwards reach this model through a weak reference: a strong
        # one from the base (a submodule of this model) would be a cycle, and a dropped model, its
        # page pool included, would wait for Python's cyclic collector (forever where the heap is
        # frozen, Engine(freeze_gc=True)) instead of going at once.
        itself = weakref.ref(self)
        self._runtime_of = lambda: getattr(itself(), "_runtime", None)
        self._plan_hook = base_model.register_forward_pre_hook(functools.partial(_plan_forward_of, itself),
                                                               with_kwargs=True)  # fmt: skip
        self._fusion = fusion.Fusion(base_model)  # RMSNorm and rotary as one launch each, on CUDA

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | PreTrainedModel,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        *,
        pool_bytes: int | None = None,
        pool_fraction: float | None = None,
        host_cache_bytes: int | None = None,
        **hf_kwargs: Any,
    ) -> MultiLoraModel:
        """Load the base (path, hub id or a loaded PreTrainedModel) and register `adapters`
        ({name: PEFT adapter folder or hub id}). `hf_kwargs` go to AutoModelForCausalLM.from_pretrained."""
        if isinstance(base, PreTrainedModel):
            if hf_kwargs:
                raise TypeError(f"{sorted(hf_kwargs)} apply when loading the base; it is already loaded")
            model = base
        else:
            model = AutoModelForCausalLM.from_pretrained(base, **hf_kwargs)
        multi = cls(model, pool_bytes=pool_bytes, pool_fraction=pool_fraction, host_cache_bytes=host_cache_bytes)
        for name, source in (adapters or {}).items():
            multi.load_adapter(source, name)
        return multi

    # ------------------------------------------------------------------ adapter registry

    @property
    def adapter_names(self) -> list[str]:
        """Registered adapters; an int in adapter_ids indexes this list."""
        return list(self._registry)

    def _rank_classes(self) -> list[str]:
        """One registered adapter per rank capacity of the fixed decode plans (the first registered of
        each): what `Engine.capture_decode_graphs` needs to capture every decode graph."""
        first: dict[int, str] = {}
        for name, source in self._registry.items():
            first.setdefault(rank_capacity(source.max_rank), name)
        return list(first.values())

    def load_adapter(
        self,
        path: str | os.PathLike,
        adapter_name: str,
        *,
        replace: bool = False,
        allowed_dir: str | os.PathLike | None = None,
    ) -> None:
        """Register a PEFT LoRA adapter (folder or hub id): config, tensor names and shapes are
        checked now, the weights are read at first use. A failure leaves the registry as it was.
        With `allowed_dir`, every file read, now and at first use, must resolve inside it (no hub id)."""
        _check_adapter_name(adapter_name)
        with self._lock:
            if adapter_name in self._registry and not replace:
                raise ValueError(
                    f"adapter {adapter_name!r} is already loaded; pass replace=True to replace it"
                )
            source = check_peft_adapter(adapter_name, path, self._targets, allowed_dir=allowed_dir)
            self._forget_copies(adapter_name)
            self._retarget(self._registry.get(adapter_name), source)
            self._registry[adapter_name] = source

    def unload_adapter(self, adapter_name: str) -> None:
        """Forget an adapter: its host copy and pool pages are freed now, and modules no other
        adapter targets get their plain forward back. Integer adapter_ids of later adapters shift."""
        with self._lock:
            if adapter_name not in self._registry:
                raise KeyError(f"unknown adapter {adapter_name!r}; known adapters: {self.adapter_names}")
            self._forget_copies(adapter_name)
            self._retarget(self._registry.pop(adapter_name), None)

    def prefetch_adapters(self, adapter_names: Sequence[str], *, host_only: bool = False) -> None:
        """Read these adapters into host memory if needed and start copying them into the pool
        (on a side CUDA stream), so that a later call finds them resident.

        `host_only=True` stops at host memory and uses no pool pages: a server can read its whole
        catalogue at start-up (as S-LoRA keeps every adapter in host memory) so that no call waits
        on a disk read. With host_cache_bytes set, later names win when they do not all fit."""
        with self._lock:
            unknown = [n for n in adapter_names if n not in self._registry]
            if unknown:
                raise KeyError(f"unknown adapters {unknown}; known adapters: {self.adapter_names}")
            if host_only:
                names = list(dict.fromkeys(adapter_names))
                for start in range(0, len(names), _HOST_READ_THREADS):
                    self._host_adapters(names[start : start + _HOST_READ_THREADS])
                return
            residency = self._follow_base_placement().residency
            residency.acquire_names(adapter_names, self._host_adapters)
            residency.release(adapter_names)

    def _forget_copies(self, adapter_name: str) -> None:
        self._hosts.pop(adapter_name, None)
        if self._runtime is not None:
            self._runtime.residency.drop(adapter_name)

    def _host_adapters(self, names: list[str]) -> list[HostAdapter]:
        """Host copies of `names`, read from disk when not cached; then the cache is trimmed to
        host_cache_bytes, least recently used first, never dropping these."""
        missing = [n for n in dict.fromkeys(names) if n not in self._hosts]
        loaded = dict(zip(missing, self._read_adapters(missing), strict=True))
        self._host_loads += len(missing)
        hosts = []
        for name in names:
            host = loaded[name] if name in loaded else self._hosts.pop(name)
            self._hosts[name] = host
            hosts.append(host)
        if self._host_cache_bytes is not None:
            held = sum(h.nbytes for h in self._hosts.values())
            for old in [n for n in self._hosts if n not in names]:
                if held <= self._host_cache_bytes:
                    break
                held -= self._hosts.pop(old).nbytes
        return hosts

    def _read_adapters(self, names: list[str]) -> list[HostAdapter]:
        """Read several adapters from disk at once: a miss sits on its call's critical path, and
        most of a read is file I/O and first-touch page faults of new host memory, which threads
        overlap. All or nothing: the first failure is raised and nothing is kept."""
        def read(name: str) -> HostAdapter:
            source = self._registry[name]
            return load_peft_adapter(
                name,
                source.directory,
                self._targets,
                self.base_model.dtype,
                pin_memory=torch.cuda.is_available(),
                allowed_dir=source.allowed_dir,
            )

        if len(names) <= 1:
            return [read(n) for n in names]
        with ThreadPoolExecutor(max_workers=min(len(names), _HOST_READ_THREADS)) as pool:
            return list(pool.map(read, names))

    def _retarget(self, old: AdapterSource | None, new: AdapterSource | None) -> None:
        """LoRA forwards on exactly the modules some registered adapter targets. Kept as counts
        per module, so registering or unloading one adapter costs its own modules only (not a
        pass over every registered adapter: thousands are registered one by one)."""
        for source, step in ((old, -1), (new, 1)):
            for name in source.modules if source is not None else ():
                self._module_users[self._module_index[name]] += step
        for m in {self._module_index[n] for s in (old, new) if s is not None for n in s.modules}:
            if self._module_users[m] > 0 and m not in self._hooks:
                module = self._modules_by_name[self._module_names[m]]
                self._hooks[m] = add_lora_to_forward(module, m, self._runtime_of)
                self._hook_epoch += 1
            elif self._module_users[m] == 0 and m in self._hooks:
                self._hooks.pop(m)()
                self._hook_epoch += 1

    # ------------------------------------------------------------------ calls

    def forward(
        self,
        *args: Any,
        adapter_ids: Sequence | None = None,
        adapter_names: Sequence | None = None,
        **kwargs: Any,
    ):
        """The base model's forward with one adapter per row (inference only: runs under no_grad)."""
        with torch.no_grad(), self._routed(args, kwargs, adapter_ids, adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(
        self,
        *args: Any,
        adapter_ids: Sequence | None = None,
        adapter_names: Sequence | None = None,
        cuda_graphs: bool | None = None,
        kv_cache_dtype: str | None = None,
        kv_budget: float | None = None,
        kv_recent: int = 64,
        **kwargs: Any,
    ):
        """The base model's generate(); row i uses adapter_ids[i] (a name, an int, or None for the base).

        Beam search and num_return_sequences expand the batch; each copy keeps its row's adapter.
        Unless `past_key_values` is given (or `use_cache=False`), the KV cache is a PagedCache in
        the model's page pool, read in place by the paged attention kernel, and its pages return
        to the pool when the call ends; `paged_cache=False` keeps transformers' default cache. With
        greedy search or sampling, a row's pages return to the pool once it ends on EOS (unless
        `output_scores` / `output_logits` ask for the logits of every step, which a released row no
        longer computes the way DynamicCache would).

        `kv_cache_dtype`: "fp8" or "int4" stores the paged cache's K/V quantized per token and head
        (kernels/kv_quant.py: 1.9x / 3.7x the tokens per page at Llama-2-7B's shapes); each forward
        attends to its own tokens exactly and to earlier ones dequantized (on CUDA inside the Triton
        attention, kernels/paged_attention_quant.py; FP8 needs compute capability 8.9+), decode steps
        replayed from CUDA graphs as with the model's own dtype. None: the model's dtype.

        `kv_budget` (in (0, 1]) with `kv_recent`: heavy-hitter eviction (H2O / Q-Hitter; eviction.py):
        per row and KV head the cache keeps the `kv_recent` newest tokens and the most attended others,
        `kv_budget` of the tokens in all, and gives the rest's pages back (the prompt scored from its
        last 32 queries, as SnapKV does; decode steps add the attention they computed). 1.0 or None:
        no eviction. Combines with `kv_cache_dtype` and CUDA graphs (a compaction runs between
        replays); not with beams, assisted decoding or sliding-window models.

        `cuda_graphs`: decode steps replayed from CUDA graphs (captured per batch bucket and length
        bucket; the prefill stays eager). None: wherever the call allows it (CUDA, the paged cache, no
        attentions or hidden states asked for); True: required (ValueError naming why not);
        False: eager. `graph_stats()` counts captures, replays and eager steps by reason.
        """
        if cuda_graphs not in (None, True, False):
            raise TypeError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        paged = kwargs.pop("paged_cache", True) and not {"past_key_values", "cache"} & kwargs.keys()
        paged = paged and kwargs.get("use_cache", True) is not False
        self._check_kv_cache_dtype(kv_cache_dtype, paged)
        self._check_kv_budget(kv_budget, kv_recent, paged, kwargs)
        no_graphs = self._why_no_graphs(paged, kwargs) if cuda_graphs is not False else "cuda_graphs=False"
        if cuda_graphs and no_graphs:
            raise ValueError(f"cuda_graphs=True, but {no_graphs}")
        with self._routed(args, kwargs, adapter_ids, adapter_names):
            if not paged:
                return self.base_model.generate(*args, **kwargs)
            cache = PagedCache(self._runtime.residency.pool, self.base_model.config, kv_dtype=kv_cache_dtype,
                               kv_budget=kv_budget, kv_recent=kv_recent)  # fmt: skip
            if no_graphs is None:
                # Widths rounded up to a power of two: calls of similar lengths share step buffers and graphs.
                cache.reserve(1 << (_max_tokens(self.base_model, args, kwargs) - 1).bit_length())
            graphs = self._decode_graphs_in(cache, bool(cuda_graphs)) if no_graphs is None else nullcontext()
            try:
                with paged_attention_in(self.base_model), graphs:
                    kwargs = self._with_release_of_finished_rows(cache, kwargs)
                    return self.base_model.generate(*args, **{_cache_keyword(self.base_model): cache}, **kwargs)
            finally:
                cache.release()

    def _check_kv_cache_dtype(self, kv_cache_dtype: str | None, paged: bool) -> None:
        """Refuse a kv_cache_dtype the call cannot honour, before anything is allocated."""
        if kv_cache_dtype is None:
            return
        if kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be None or one of {KV_DTYPES}, got {kv_cache_dtype!r}")
        if not paged:
            raise ValueError(
                "kv_cache_dtype applies to the paged cache: not with paged_cache=False, a cache of the "
                "caller's own, or use_cache=False"
            )
        refuse_quantized_kv_on(self._first_target_weight().device, kv_cache_dtype)

    def _check_kv_budget(self, kv_budget: float | None, kv_recent: int, paged: bool, kwargs: dict) -> None:
        """A budget the call cannot honour is refused before anything is allocated."""
        if KvBudget.of(kv_budget, kv_recent) is None:
            return
        if not paged:
            raise ValueError(
                "kv_budget applies to the paged cache: not with paged_cache=False, a cache of the caller's own, "
                "or use_cache=False"
            )
        config = kwargs.get("generation_config") or self.base_model.generation_config
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1:
            raise ValueError("kv_budget (heavy-hitter eviction) does not support beam search: num_beams must be 1")
        for name in ("assistant_model", "prompt_lookup_num_tokens"):
            if kwargs.get(name) is not None:
                raise ValueError(f"kv_budget (heavy-hitter eviction) does not support assisted decoding ({name})")
        text = self.base_model.config.get_text_config(decoder=True)
        if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
            raise ValueError("kv_budget (heavy-hitter eviction) does not support sliding-window attention: a "
                             "window over kept slots is not a window over positions")  # fmt: skip

    def _graphs_of_runtime(self) -> DecodeGraphs:
        """The decode graphs of the current runtime (dropped with it when the model moves)."""
        if self._decode_graphs is None:
            itself = weakref.ref(self)  # not self: the pool would wait for the cyclic collector after `del model`
            self._decode_graphs = DecodeGraphs(
                self.base_model.forward, self._runtime.captured_state, lambda: itself()._hook_epoch, self._graph_stats
            )
        return self._decode_graphs

    @contextmanager
    def _decode_graphs_in(self, cache: PagedCache, required: bool) -> Iterator[None]:
        """Within: the base model's decode steps on `cache` replayed from CUDA graphs (`DecodeGraphs` is
        its forward; one-token LoRA forwards use the fixed decode tables)."""
        base, graphs = self.base_model, self._graphs_of_runtime()
        own_forward = base.__dict__.get("forward")
        graphs.start(cache, required)
        self._runtime.fixed_decode = True
        base.forward = graphs
        try:
            yield
        finally:
            if own_forward is None:
                del base.forward
            else:
                base.forward = own_forward
            graphs.stop()
            self._runtime.fixed_decode = False

    def _why_no_graphs(self, paged: bool, kwargs: dict) -> str | None:
        """Why this generate() call cannot replay its decode steps from CUDA graphs (None: it can)."""
        device = self._first_target_weight().device
        if device.type != "cuda":
            return f"the base model is on {device}, not on a CUDA device"
        if not paged:
            return "the call does not use the paged cache (paged_cache=False, a cache of its own, or use_cache=False)"
        config = kwargs.get("generation_config") or self.base_model.generation_config
        if any(kwargs.get(k, getattr(config, k, False)) for k in ("output_attentions", "output_hidden_states")):
            return "the call asks for attentions or hidden states"
        return None

    def page_pool(self) -> PagePool:
        """The unified page pool (adapter rows and KV blocks), created now if no call made it yet. It is
        replaced (and this one emptied) when the base model moves to another device or dtype."""
        with self._lock:
            return self._follow_base_placement().residency.pool

    def _pin_adapters(self, names: Sequence[str]) -> None:
        """Make these adapters resident and keep them so until `_unpin_adapters` (the serving engine
        holds a running request's adapter for its whole life). PoolExhaustedError changes nothing."""
        with self._lock:
            self._follow_base_placement().residency.acquire_names(names, self._host_adapters)

    def _unpin_adapters(self, names: Sequence[str]) -> None:
        with self._lock:
            if self._runtime is not None:
                self._runtime.residency.release(names)

    def _logits_of_step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: PagedCache,
        adapter_ids: list,
        attention_mask: torch.Tensor | None = None,
        cuda_graphs: bool = False,
    ) -> torch.Tensor:
        """One forward of the serving engine: rows of `input_ids` [rows, tokens] at `position_ids`,
        their K/V added to `cache` (a serving StepCache), row i with adapter_ids[i], keys masked by
        the 2-D `attention_mask` where rows have padding; returns the last position's logits
        [rows, vocab]. `cuda_graphs`: a decode step is replayed from a CUDA graph (the engine checked
        `_why_no_graphs` and gives a mask and the discard page)."""
        base = self.base_model
        with torch.no_grad(), self._routed((), {"input_ids": input_ids}, adapter_ids, None):
            if self._runtime.residency.pool is not cache.pool:
                raise RuntimeError("the base model moved to another device or dtype since the engine started")
            graphs = self._decode_graphs_in(cache, required=False) if cuda_graphs else nullcontext()
            with paged_attention_in(base), graphs:
                out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=True, logits_to_keep=1, **{_cache_keyword(base): cache})  # fmt: skip
        return out.logits[:, -1]

    def graph_stats(self) -> dict[str, int]:
        """Counts since the model was wrapped: graphs captured, decode steps replayed, and steps run
        eagerly by reason (prefills among them); and `graph_pool_bytes`, the device memory the live
        graphs' pool reserved when they were captured (0 once they were dropped with a move)."""
        pool = self._decode_graphs.pool_bytes() if self._decode_graphs is not None else 0
        return {**self._graph_stats, "graph_pool_bytes": pool}

    def _with_release_of_finished_rows(self, cache: PagedCache, kwargs: dict) -> dict:
        """kwargs plus a ReleaseFinishedRows criterion, where generate() would stop rows on EOS alone."""
        config = kwargs.get("generation_config") or self.base_model.generation_config

        def setting(key: str) -> Any:
            return kwargs.get(key, getattr(config, key, None))

        eos = setting("eos_token_id")
        if eos is None or (setting("num_beams") or 1) > 1 or setting("output_scores") or setting("output_logits"):
            return kwargs
        criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
        criteria.append(ReleaseFinishedRows(cache, eos))
        return {**kwargs, "stopping_criteria": criteria}

    @contextmanager
    def _routed(
        self, args: tuple, kwargs: dict, adapter_ids: Sequence | None, adapter_names: Sequence | None
    ) -> Iterator[None]:
        with self._lock:
            names = resolve_adapter_ids(
                adapter_ids, adapter_names, self.adapter_names, batch_rows(args, kwargs)
            )
            runtime = self._follow_base_placement()
            distinct = list(dict.fromkeys(n for n in names or () if n is not None))
            residents = runtime.residency.acquire_names(distinct, self._host_adapters)
            slot_of = {n: r.slot for n, r in zip(distinct, residents, strict=True)}
            self._routing.row_slots = [slot_of[n] if n is not None else -1 for n in names] if names else None
            try:
                with self._fusion.active():
                    yield
            finally:
                self._routing.row_slots = None
                runtime.clear()
                runtime.residency.release(distinct)

    def _plan_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Plan each forward of a routed call once; forwards outside one (in any thread) leave the
        runtime alone: its plan belongs to the routed call, and the LoRA layers apply it in the
        routed call's thread only."""
        row_slots = getattr(self._routing, "row_slots", None)
        if row_slots is None:
            return
        rows, tokens_per_row = forward_shape(args, kwargs)
        graphs = self._decode_graphs if self._runtime.fixed_decode else None
        padding = graphs.padding(args, kwargs) if graphs is not None else 0
        self._runtime.set_rows(expand_rows(row_slots, rows) + [-1] * padding, tokens_per_row)

    def _follow_base_placement(self) -> LoraRuntime:
        """The runtime on the base's device and dtype: built at the first call, and again (with a
        new pool, copies rebuilt from the host store) after base_model.to(another device/dtype)."""
        weight = self._first_target_weight()
        runtime = self._runtime
        if runtime is None or (weight.device, weight.dtype) != (runtime.residency.device, runtime.residency.dtype):
            # Frees the old pool (and the graphs that read it) before the new one is sized.
            self._runtime = runtime = self._decode_graphs = None
            runtime = self._runtime = LoraRuntime(self._module_names, self._new_pool(weight))
        return runtime

    def _checked_pool_size(
        self, pool_bytes: int | None, fraction: float | None
    ) -> tuple[int | None, float | None]:
        """The pool is created at the first call; its settings are checked now so that a bad one
        fails where it is given, not in the middle of a later generate()."""
        if pool_bytes is not None and fraction is not None:
            raise ValueError("give pool_bytes or pool_fraction, not both")
        _positive_or_none("pool_bytes", pool_bytes)
        weight = self._first_target_weight()
        page_bytes = self._page_elems() * weight.element_size()
        if pool_bytes is not None and pool_bytes < page_bytes:
            raise ValueError(
                f"pool_bytes={pool_bytes} holds no page: this model's pages are {page_bytes} bytes "
                "(one block of KV or the widest adapter row)"
            )
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise ValueError(f"pool_fraction must be in (0, 1], got {fraction!r}")
            if weight.device.type != "cuda":
                raise ValueError(
                    f"pool_fraction sizes the pool from free CUDA memory, but the base model is on "
                    f"{weight.device}: move it to CUDA before wrapping it, or give pool_bytes"
                )
        return pool_bytes, fraction

    def _first_target_weight(self) -> torch.Tensor:
        return self._modules_by_name[self._module_names[0]].weight

    def _page_elems(self) -> int:
        return align_up(max(self._widest_row(), _kv_block_elems(self.base_model.config)))

    def _new_pool(self, weight: torch.Tensor) -> PagePool:
        page_elems = self._page_elems()
        pool_bytes, fraction = self._pool_size
        if pool_bytes is None and fraction is None:
            if weight.device.type == "cuda":
                fraction = DEFAULT_POOL_FRACTION
            else:
                pool_bytes = DEFAULT_CPU_POOL_BYTES
        return PagePool.for_device(page_elems, weight.dtype, weight.device, pool_bytes=pool_bytes, fraction=fraction)

    def _widest_row(self) -> int:
        return max(align_up(max(m.weight.shape)) for m in map(self._modules_by_name.get, self._module_names))

    # ------------------------------------------------------------------ plumbing

    def memory_stats(self) -> dict[str, Any]:
        """Adapters registered, host copies (count, bytes, reads from disk); from the first call on,
        when the pool exists, also its pages (total / free / KV / adapter, page bytes), the resident
        adapters (least recently used first), residency hits / misses / evictions and the bytes
        copied to the device. docs/api.md lists the keys."""
        stats: dict[str, Any] = {
            "adapters_registered": len(self._registry),
            "adapters_in_host_memory": len(self._hosts),
            "host_bytes": sum(h.nbytes for h in self._hosts.values()),
            "host_loads": self._host_loads,
        }
        if self._runtime is not None:
            stats.update(self._runtime.residency.stats())
        return stats

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


def _check_adapter_name(name: object) -> None:
    """Names are shown in UIs, logs and API responses and typed back by users: a blank name or one
    with control characters (newlines, escapes) would be invisible or forge output there."""
    if not isinstance(name, str) or not name.strip() or name == BASE_ADAPTER:
        raise ValueError(f"invalid adapter name {name!r}: a non-blank string other than {BASE_ADAPTER!r}")
    control = [c for c in name if unicodedata.category(c) in ("Cc", "Cf")]
    if control:
        raise ValueError(f"invalid adapter name {name!r}: it contains control characters {control}")


def _positive_or_none(what: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _max_tokens(model: PreTrainedModel, args: tuple, kwargs: dict) -> int:
    """Tokens per row a generate() call can reach: the prompt's plus max_new_tokens, else max_length."""
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    batch = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids", kwargs.get("inputs"))
    prompt = batch.shape[1] if isinstance(batch, torch.Tensor) and batch.dim() == 2 else 0
    return prompt + new if new is not None else kwargs.get("max_length", config.max_length)


def _cache_keyword(model: torch.nn.Module) -> str:
    """The keyword that hands generate() its cache: transformers renamed `past_key_values` to `cache`
    (5.24 warns on the old name, 6.0 drops it); a model's forward names the one it takes."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _kv_block_elems(config: Any) -> int:
    """Elements of one layer's K and V for KV_BLOCK_SIZE tokens: the pool's pages hold one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * KV_BLOCK_SIZE * kv_heads * head_dim


def _plan_forward_of(model: weakref.ref[MultiLoraModel], module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """The base model's forward pre-hook: the MultiLoraModel's `_plan_forward`, while it lives."""
    live = model()
    if live is not None:
        live._plan_forward(module, args, kwargs)
