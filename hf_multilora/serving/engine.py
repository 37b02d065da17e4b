"""Engine: continuous batching of requests, each with its own adapter, on one MultiLoraModel.

Why: `generate()` is a static batch. A long request holds it and a new one waits for all of it, and
concurrent calls on one model queue behind its lock. Here requests join and leave the running batch
at step boundaries (iteration-level scheduling, as in Orca / vLLM), and every decode step is ONE
forward over all running rows, each with its own adapter (SGMV) and its own KV pages in the model's
unified pool.

One engine thread runs the loop; `submit()` (any thread, or an asyncio task) only queues. A step:
1. Requests whose client went away (`RequestStream.cancel`) leave; their pages go back at once.
2. Waiting requests are admitted, the oldest first, while the pool has room for their adapters (held
   resident until they end) and prompts and the batch has room, and prefilled, those of similar
   prompt lengths in one forward (each row with its adapter; `_next_group` picks them among the
   next `prefill_lookahead`; the left padding is not stored), and their first tokens sampled.
   While rows decode, a small prefill waits a few steps for more rows to end (`_defer`): each
   prefill forward costs the running batch a step. The adapter of a new request is read into host
   memory at the first step after it arrives (`prefetch_adapters(host_only=True)`), so admitting it
   does not wait on a disk.
3. One decode forward for all running rows is launched, and then the tokens of the step launched
   before it are read: the host's work for a step (reading tokens, ending rows, the next step's
   tables and inputs) overlaps the device's work for the step before (vLLM's async scheduling).
   A row's input token may thus be one the host has not read yet: it stays on the device. A row
   whose request ended with the step read late ran one step more, whose token is dropped; a row
   whose tokens reach max_tokens is not launched again. A row that needs a new block and finds the
   pool empty first reads the launched step (rows it ends give their pages back), then preempts
   the youngest running request (its pages freed; it waits again at the head of the queue and
   recomputes its prompt and output when readmitted): requests wait instead of failing. A request
   that could not fit even alone is refused at `submit`.
Rows end on EOS (unless ignore_eos), at max_tokens, on a stop string, or when cancelled.

On CUDA, decode steps replay CUDA graphs (`graphs.DecodeGraphs`, as generate() does): the running
rows are padded to a batch bucket (1, 2, 4, 8, then multiples of 8) and their tables to a
power-of-two width, so requests joining and leaving replay the graphs already captured; the engine
then holds one page for the padding rows' K/V while it decodes. Prefills stay eager; long prompts
are not chunked.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..graphs import batch_bucket
from ..memory.page_pool import PoolExhaustedError
from ..model import MultiLoraModel
from ..transfer import to_device, to_host
from .detokenize import IncrementalText
from .requests import Request, RequestError, RequestStream, SamplingParams, StreamEvent, TokenLogprob, stop_at
from .sampling import StepLogprobs, next_tokens, step_logprobs
from .step_cache import RowKV, StepCache

logger = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The queue is full: try again later (the HTTP server answers 503 with Retry-After)."""


@dataclass
class _Launched:
    """A decode step whose tokens the host has not read yet."""

    requests: list[Request]
    tokens: torch.Tensor  # int64 [rows] on the device: each row's next token
    host: torch.Tensor  # int64 [rows]: their copy on the host, complete once `ready` is
    logprobs: StepLogprobs | None  # on the host, complete once `ready` is (None: no row asked)
    ready: torch.cuda.Event | None  # None: on the CPU, copied already


class Engine:
    """Continuous batching over `model` (see the module doc).

    `tokenizer`: decodes outputs (`StreamEvent.text`) and finds stop strings; without one, events
    carry token ids only and `stop` is refused. `eos_token_id`: default the model's generation
    config's. `max_running`: rows in the running batch at most. `max_waiting`: queued requests at
    most (more: `EngineOverloaded`). `max_prefill_rows`: newly admitted requests prefilled in one
    forward at most. `min_prefill_rows`, `max_prefill_wait`: while rows decode, a prefill of fewer
    rows waits up to that many decode steps for more rows to end (see `_defer`). `prefill_lookahead`:
    the waiting requests (the oldest first) a prefill group is chosen from, by prompt length, to pad
    less (see `_next_group`; 1: the oldest alone). `cuda_graphs`:
    decode steps replayed from CUDA graphs; None: wherever the model allows it (on CUDA), True:
    required (ValueError naming why not), False: eager. `kv_cache_dtype`: "fp8" or "int4" keeps the
    requests' KV quantized in the pool (as `generate(kv_cache_dtype=...)`: more tokens per page, so
    more requests fit); None: the model's dtype. `async_scheduling`: each decode step is launched
    before the tokens of the step before it are read (see the module doc); False: read before the
    next launch (no step runs for a row that has ended; for comparisons and debugging).
    `capture_graphs`: tokens (prompt + output) of the longest request expected; an engine that
    decodes with graphs captures them all before it starts (`capture_decode_graphs` with its default
    adapters), one that decodes eagerly ignores it. `freeze_gc`: what exists once the engine has
    started (the model, adapters, captured graphs) is moved out of Python's garbage collection
    (`gc.freeze()`, as vLLM's engine does), and again after each `capture_decode_graphs`: a full
    collection otherwise walks all of it, 350 ms at Llama-2-7B on the H200 host, and stops the
    engine's thread meanwhile (a TTFT outlier). Frozen objects are still freed when their count of
    references drops to zero, but cycles among them never are: for a process that serves (the
    server and the Ray replicas freeze), not one that builds and drops many models. Call `close()`
    (or use it as a context manager) to stop it.
    """

    def __init__(
        self,
        model: MultiLoraModel,
        tokenizer: Any = None,
        *,
        max_running: int = 64,
        max_waiting: int = 1024,
        max_prefill_rows: int = 16,
        min_prefill_rows: int = 8,
        max_prefill_wait: int = 16,
        prefill_lookahead: int = 64,
        eos_token_id: int | Sequence[int] | None = None,
        cuda_graphs: bool | None = None,
        kv_cache_dtype: str | None = None,
        async_scheduling: bool = True,
        capture_graphs: int | None = None,
        freeze_gc: bool = False,
    ) -> None:
        if not isinstance(model, MultiLoraModel):
            raise TypeError(f"Engine serves a MultiLoraModel, got {type(model).__name__}")
        for name, value in (("max_running", max_running), ("max_waiting", max_waiting),
                            ("max_prefill_rows", max_prefill_rows), ("min_prefill_rows", min_prefill_rows),
                            ("max_prefill_wait", max_prefill_wait), ("prefill_lookahead", prefill_lookahead)):  # fmt: skip
            lowest = 0 if name == "max_prefill_wait" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
        if capture_graphs is not None and (type(capture_graphs) is not int or capture_graphs < 1):
            raise ValueError(f"capture_graphs must be None or an int >= 1 (tokens), got {capture_graphs!r}")
        for name, value in (("async_scheduling", async_scheduling), ("freeze_gc", freeze_gc)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if cuda_graphs not in (None, True, False):
            raise TypeError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        model._check_kv_cache_dtype(kv_cache_dtype, paged=True)
        no_graphs = model._why_no_graphs(True, {}) if cuda_graphs is not False else "cuda_graphs=False"
        if cuda_graphs and no_graphs:
            raise ValueError(f"cuda_graphs=True, but {no_graphs}")
        self.cuda_graphs = no_graphs is None
        self.model, self.tokenizer = model, tokenizer
        self.max_running, self.max_waiting, self.max_prefill_rows = max_running, max_waiting, max_prefill_rows
        self.min_prefill_rows, self.max_prefill_wait = min_prefill_rows, max_prefill_wait
        self.prefill_lookahead, self.async_scheduling, self.freeze_gc = prefill_lookahead, async_scheduling, freeze_gc
        self._deferred = 0  # decode steps the head of the queue has waited for a larger prefill
        if eos_token_id is None:
            eos_token_id = model.base_model.generation_config.eos_token_id
        self.eos = set() if eos_token_id is None else set(torch.as_tensor(eos_token_id).flatten().tolist())
        self.stats: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()  # decode steps by the number of rows they ran
        self._waiting: deque[Request] = deque()
        # Adapters of requests queued since the last step, read into host memory at the next one: once
        # per arrival. Asking every step for every waiting request's adapter cost ~7.5 us a name, so
        # up to ~1 ms of each ~9 ms step at 7B with 400 adapters and ~190 requests waiting.
        self._arrived: set[str] = set()
        self._running: list[Request] = []
        self._kv: dict[str, RowKV] = {}
        self._launched: _Launched | None = None  # the last decode step, its tokens not read yet
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._pool = model.page_pool()
        self._cache = StepCache(self._pool, model.base_model.config, kv_dtype=kv_cache_dtype)
        self._generator = torch.Generator(device=self._pool.storage.device)  # unseeded requests' draws
        self._generator.seed()
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens) per step
        if capture_graphs is not None and self.cuda_graphs:
            self.capture_decode_graphs(capture_graphs)  # freezes the heap after
        elif freeze_gc:
            _freeze_heap()
        self._thread = threading.Thread(target=self._loop, name="hf_multilora-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the clients' side
    def submit(
        self,
        prompt: str | Sequence[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
    ) -> RequestStream:
        """Queue a request: `prompt` (text, needs the tokenizer, or token ids), `adapter` (a registered
        name, or None for the base model). Returns its stream at once; bad input raises RequestError,
        a full queue EngineOverloaded, before anything is queued."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        if adapter is not None and adapter not in self.model.adapter_names:
            raise KeyError(f"unknown adapter {adapter!r}; known adapters: {self.model.adapter_names}")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need the engine's tokenizer")
        vocab = self.model.base_model.config.vocab_size
        outside = [token for token, _ in params.logit_bias if token >= vocab]
        if outside:
            raise RequestError(f"logit_bias names token ids outside the vocabulary [0, {vocab}): {outside}")
        self._check_fits(len(prompt_ids) + params.max_tokens)
        generator = None  # a seeded request draws from its own; the others from the engine's
        if params.temperature > 0 and params.seed is not None:
            generator = torch.Generator(device=self._pool.storage.device).manual_seed(params.seed)
        request_id = f"req-{next(self._ids)}"
        stream = RequestStream(request_id, len(prompt_ids))
        text = IncrementalText(self.tokenizer) if self.tokenizer is not None else None
        request = Request(request_id, prompt_ids, adapter, params, stream, generator, text, time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_waiting:
                raise EngineOverloaded(f"{len(self._waiting)} requests are waiting (max_waiting={self.max_waiting})")
            self._waiting.append(request)
            if adapter is not None:
                self._arrived.add(adapter)
            self.stats["submitted"] += 1
            self._cond.notify_all()
        return stream

    def generate(self, prompt: str | Sequence[int], adapter: str | None = None, **params: Any) -> str:
        """Submit and wait for the text (a convenience for scripts and tests)."""
        return self.submit(prompt, adapter, SamplingParams(**params)).result()

    def unload_adapter(self, name: str) -> None:
        """Unregister an adapter no queued or running request uses (else RequestError)."""
        with self._cond:
            users = sum(r.adapter == name for r in [*self._waiting, *self._running])
            if users:
                raise RequestError(f"adapter {name!r} is in use by {users} request(s); try again when they end")
            self.model.unload_adapter(name)

    def capture_decode_graphs(self, max_context: int, adapters: Sequence[str | None] | None = None) -> int:
        """Capture now, before serving, the decode graphs that requests of up to `max_context` tokens
        (prompt + output) would otherwise capture, and the kernels they would compile, while they
        wait: one per batch bucket up to `max_running` and power-of-two table width, for each of
        `adapters` (each stands for batches whose largest adapter rank rounds up as its does; None:
        batches without adapters; default: None and one registered adapter of each rank capacity).
        vLLM captures its batch sizes at start-up for the same reason: a capture or compile inside a
        request's time is a TTFT outlier. Call it while no request is queued or running; returns the
        graphs it captured. The steps run on rows whose pages are all the one padding page (no KV is
        taken), and graphs already captured are replayed."""
        if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 1:
            raise ValueError(f"max_context must be an int >= 1, got {max_context!r}")
        adapters = [None, *self.model._rank_classes()] if adapters is None else list(adapters)
        unknown = [a for a in adapters if a is not None and a not in self.model.adapter_names]
        if unknown or not adapters:
            raise KeyError(f"adapters: one or more registered names or None; unknown: {unknown}")
        if not self.cuda_graphs:
            raise ValueError("this engine decodes eagerly (no CUDA graphs to capture)")
        block = self._cache.block_size
        widths = [1 << i for i in range((-(-max_context // block) - 1).bit_length() + 1)]
        buckets = sorted({batch_bucket(n) for n in range(1, self.max_running + 1)}, reverse=True)
        before = self.model.graph_stats().get("captures", 0)
        with self._cond:  # the loop takes no step meanwhile: submit() waits
            if self._waiting or self._running or self._launched is not None:
                raise RuntimeError("capture_decode_graphs() needs an idle engine: requests are queued or running")
            discard = self._cache.hold_discard()
            try:
                device = self._pool.storage.device
                paddings = {}  # table width -> a row whose pages are all the padding page
                for width in widths:
                    padding = paddings[width] = RowKV(self._cache.num_layers, block)
                    padding.table = torch.full((self._cache.num_layers, width), discard, dtype=torch.int32)
                    padding.length = width * block - 1
                for adapter, width, rows in itertools.product(dict.fromkeys(adapters), widths, buckets):
                    padding = paddings[width]
                    self._forward_rows([padding] * rows, [adapter] * rows,
                                       torch.zeros(rows, 1, dtype=torch.int64, device=device),
                                       [[padding.length]] * rows, graphs=True)  # fmt: skip
            finally:
                self._cache.release()
        if self.freeze_gc:
            _freeze_heap()
        return self.model.graph_stats().get("captures", 0) - before

    def metrics(self) -> dict[str, Any]:
        """Queue and batch sizes, pool pages by kind, counters, and output tokens per second lately."""
        with self._cond:
            waiting, running = len(self._waiting), len(self._running)
            recent = list(self._recent)
        rate = 0.0
        if len(recent) > 1 and recent[-1][0] > recent[0][0]:
            rate = sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])
        graphs = self.model.graph_stats()
        return {
            "waiting": waiting, "running": running, "tokens_per_s": rate, **self._pool.stats(), **self.stats,
            "graph_captures": graphs.get("captures", 0), "graph_replays": graphs.get("replays", 0),
        }  # fmt: skip

    def close(self) -> None:
        """Stop the loop; requests still queued or running end with finish_reason "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs the engine's tokenizer; give token ids")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
        vocab = self.model.base_model.config.vocab_size
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise RequestError(f"the prompt must be one or more token ids in [0, {vocab})")
        return ids

    def _check_fits(self, tokens: int) -> None:
        """Refuse a request that could not run even alone in an empty pool (its KV at full length)."""
        row = RowKV(self._cache.num_layers, self._cache.block_size)
        pages = row.blocks_for(tokens) * self._cache.num_layers
        if pages > self._pool.num_pages:
            raise RequestError(
                f"the request needs {pages} KV pages for {tokens} tokens (prompt + max_tokens); "
                f"the pool has {self._pool.num_pages}"
            )

    # ------------------------------------------------------------------ the engine's thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._waiting or self._running)
                if self._closed:
                    break
            try:
                self._step()
            except Exception as error:  # a bug or a device error: fail what runs, keep serving
                logger.exception("hf_multilora engine step failed")
                self._launched = None
                for request in list(self._running):
                    self._finish(request, "error", error=f"{type(error).__name__}: {error}")
        with self._cond:
            leftover = list(self._waiting) + self._running
            self._waiting.clear()
        for request in leftover:
            self._finish(request, "cancelled")

    def _step(self) -> None:
        for request in [r for r in list(self._waiting) + self._running if r.stream.cancelled.is_set()]:
            self._finish(request, "cancelled")
        self._admit()
        if self._running or self._launched is not None:
            self._decode()

    def _admit(self) -> None:
        """Admit waiting requests, the oldest first, and prefill them, several in one forward where
        their prompts are of similar lengths (`_next_group`)."""
        while len(self._running) < self.max_running:
            group = self._next_group()
            if not group or self._defer(group):
                break
            admitted, started = [], time.perf_counter()
            for request in group:
                try:
                    self._reserve(request)
                except PoolExhaustedError as error:
                    if admitted or self._running:
                        break  # pages come back as running requests end
                    self._finish(request, "error", error=f"the pool has no room for it now: {error}")
                    continue
                except Exception as error:  # its adapter cannot be read (files gone, say): it fails alone
                    logger.warning("hf_multilora engine: %s cannot start: %s", request.request_id, error)
                    self._finish(request, "error", error=f"{type(error).__name__}: {error}")
                    continue
                admitted.append(request)
            self.stats["reserve_seconds"] += time.perf_counter() - started
            if not admitted:
                if self._running:
                    break
                continue
            with self._cond:
                for request in admitted:
                    self._waiting.remove(request)
            now = time.monotonic()
            for request in admitted:
                request.admitted = request.admitted or now
            self._running.extend(admitted)
            lengths = [r.context_length() for r in admitted]
            started = time.perf_counter()
            self._prefill(admitted)
            self.stats["prefill_seconds"] += time.perf_counter() - started
            self.stats["prefill_tokens"] += sum(lengths)
            self.stats["prefill_padding"] += max(lengths) * len(lengths) - sum(lengths)
        with self._cond:
            arrived = sorted(self._arrived)
            self._arrived.clear()
        started = time.perf_counter()
        for adapter in arrived:
            try:
                self.model.prefetch_adapters([adapter], host_only=True)
            except Exception:  # the request fails with the reason when it is admitted
                logger.debug("hf_multilora engine: prefetch of %s failed", adapter, exc_info=True)
        self.stats["prefetch_seconds"] += time.perf_counter() - started

    def _defer(self, group: list[Request]) -> bool:
        """Whether `group` waits for a larger prefill: while rows decode, each prefill forward costs
        the running batch a step of its own (tens of ms at 7B, mostly fixed), so a group smaller
        than `min_prefill_rows` (or than what waits) waits for more rows to end, `max_prefill_wait`
        decode steps at most. A full batch is the case that matters: at saturation a row ends every
        few steps, and prefilling each freed row alone cost the 7B serving trace 155 forwards of
        ~60 ms for 256 requests, more than its decode steps took (as TGI's `max_waiting_tokens`)."""
        with self._cond:
            waiting = len(self._waiting)
        quorum = min(self.min_prefill_rows, self.max_prefill_rows, waiting, self.max_running)
        if not self._running or len(group) >= quorum or self._deferred >= self.max_prefill_wait:
            self._deferred = 0
            return False
        self._deferred += 1
        self.stats["prefill_waits"] += 1
        return True

    def _next_group(self) -> list[Request]:
        """The next waiting requests to prefill together: the oldest, joined by those among the next
        `prefill_lookahead` whose prompts are closest to its length, while the batch has room, at most
        `max_prefill_rows`, and padding at most doubles their prompts' tokens (a forward's fixed cost
        is worth more prompt tokens than that at 7B). Every padded slot costs the forward what a token
        does, and a queue in arrival order mixes lengths (measured at 7B, prompts of 1k-3k tokens: 29%
        of the prefilled slots were padding). The oldest always goes, so a request waits behind at most
        as many groups as there are requests older than it."""
        with self._cond:
            waiting = list(self._waiting)
        room = min(self.max_prefill_rows, self.max_running - len(self._running))
        if not waiting or room < 1:
            return []
        anchor = waiting[0].context_length()
        chosen, lengths = {id(waiting[0])}, [anchor]
        nearest = sorted(waiting[1 : self.prefill_lookahead], key=lambda r: abs(r.context_length() - anchor))
        for request in nearest:  # a stable sort: arrival order among equally near ones
            if len(lengths) >= room:
                break
            candidate = [*lengths, request.context_length()]
            if max(candidate) * len(candidate) <= 2 * sum(candidate):
                chosen.add(id(request))
                lengths = candidate
        return [r for r in waiting if id(r) in chosen]

    def _prefill(self, requests: list[Request]) -> None:
        """One forward for the prompts of `requests`, left-padded to the longest; if it fails, each
        alone, so that a request whose prefill cannot run (an adapter that no longer loads, say) fails
        by itself."""
        self.stats["prefills"] += 1
        contexts = [r.context() for r in requests]
        width = max(len(c) for c in contexts)
        try:
            device = self._pool.storage.device
            logits = self._forward(
                requests,
                to_device([[0] * (width - len(c)) + c for c in contexts], device),
                [[0] * (width - len(c)) + list(range(len(c))) for c in contexts],
                added=[len(c) for c in contexts],
            )
        except Exception:
            if len(requests) == 1:
                logger.exception("hf_multilora engine: prefill of %s failed", requests[0].request_id)
                self._finish(requests[0], "error", error="its prefill failed (see the server log)")
                return
            for request in requests:
                self._prefill([request])
            return
        tokens = next_tokens(logits, requests, self._generator)
        logprobs = step_logprobs(logits, tokens, requests)
        self._emit(requests, tokens.tolist(), logprobs.per_row(requests) if logprobs is not None else None)

    def _reserve(self, request: Request) -> None:
        """The request's adapter held resident (for its whole run) and pages for its context (the
        padding of its prefill takes none); all or nothing (PoolExhaustedError)."""
        adapters = [request.adapter] if request.adapter is not None else []
        self.model._pin_adapters(adapters)
        row = self._kv.setdefault(request.request_id, RowKV(self._cache.num_layers, self._cache.block_size))
        try:
            row.grow(self._pool, request.context_length())
        except BaseException:
            self.model._unpin_adapters(adapters)
            raise
        request.pinned = True

    def _unreserve(self, request: Request) -> None:
        row = self._kv.pop(request.request_id, None)
        if row is not None:
            row.free(self._pool)
        if request.pinned and request.adapter is not None:
            self.model._unpin_adapters([request.adapter])
        request.pinned = False

    def _decode(self) -> None:
        """Launch the running rows' decode step, then read the step launched before it (see the
        module doc)."""
        started = time.perf_counter()
        while True:  # pages for every launched row's next token; read the last step, then preempt, while they lack
            requests = self._due()
            try:
                for request in requests:
                    row = self._kv[request.request_id]
                    row.grow(self._pool, row.length + 1)
                if self.cuda_graphs and requests:
                    self._cache.hold_discard()
                break
            except PoolExhaustedError:
                if self._launched is not None:
                    self._read_launched()
                    continue
                if len(self._running) == 1:
                    raise
                self._preempt(self._running[-1])
        launched = self._launch(requests) if requests else None
        self._read_launched()
        self._launched = launched
        if not self.async_scheduling:
            self._read_launched()
        self.stats["decode_seconds"] += time.perf_counter() - started

    def _due(self) -> list[Request]:
        """The running requests that take another decode step: those whose tokens, read or launched,
        fall short of max_tokens."""
        launched = {id(r) for r in self._launched.requests} if self._launched is not None else set()
        return [r for r in self._running if len(r.generated) + (id(r) in launched) < r.params.max_tokens]

    def _launch(self, requests: list[Request]) -> _Launched:
        """The decode forward of `requests` and its sampling, queued on the device; a row's input is
        the token the launched step gave it where it was in that step, else its last token read."""
        device = self._pool.storage.device
        known = to_device([r.generated[-1] for r in requests], device)
        if self._launched is None:
            inputs = known
        else:
            order = {id(r): j for j, r in enumerate(self._launched.requests)}
            take = to_device([order.get(id(r), -1) for r in requests], device)
            inputs = torch.where(take >= 0, self._launched.tokens[take.clamp(min=0)], known)
        positions = [[self._kv[r.request_id].length] for r in requests]
        logits = self._forward(requests, inputs[:, None], positions, graphs=self.cuda_graphs)
        self.stats["decode_steps"] += 1
        self.batch_sizes[len(requests)] += 1
        tokens = next_tokens(logits, requests, self._generator)
        logprobs = step_logprobs(logits, tokens, requests)
        if tokens.device.type != "cuda":  # no events to wait on: read now (on the CPU, the tensors themselves)
            return _Launched(requests, tokens, tokens.cpu(), logprobs, None)
        host, host_logprobs = to_host(tokens), logprobs.to_host() if logprobs is not None else None
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(requests, tokens, host, host_logprobs, ready)

    def _read_launched(self) -> None:
        """Wait for the launched step's tokens and hand them to their requests (those that ended
        meanwhile drop theirs)."""
        launched, self._launched = self._launched, None
        if launched is None:
            return
        if launched.ready is not None:
            launched.ready.synchronize()
        logprobs = launched.logprobs.per_row(launched.requests) if launched.logprobs is not None else None
        live = [(i, r) for i, r in enumerate(launched.requests) if not r.stream.finished]
        if live:
            tokens = launched.host.tolist()
            self._emit([r for _, r in live], [tokens[i] for i, _ in live],
                       [logprobs[i] for i, _ in live] if logprobs is not None else None)  # fmt: skip

    def _forward(
        self,
        requests: list[Request],
        tokens: torch.Tensor,
        positions: list[list[int]],
        added: list[int] | None = None,
        graphs: bool = False,
    ) -> torch.Tensor:
        """Last-position logits of one forward: one row per request, its tokens (int64 [rows, new], on
        the device) added to its KV (the last `added[i]` of row i's; the ones before are left
        padding). `graphs`: a decode step replayed from a CUDA graph."""
        rows = [self._kv[r.request_id] for r in requests]
        new = tokens.shape[1]
        added = [new] * len(rows) if added is None else added
        logits = self._forward_rows(rows, [r.adapter for r in requests], tokens, positions, added, graphs)
        for row, count in zip(rows, added, strict=True):
            row.length += count
        return logits

    def _forward_rows(
        self,
        rows: list[RowKV],
        adapters: list[str | None],
        tokens: torch.Tensor,
        positions: list[list[int]],
        added: list[int] | None = None,
        graphs: bool = False,
    ) -> torch.Tensor:
        """`_forward` on KV rows of no request (their lengths left as they are)."""
        attention_mask = self._cache.load(rows, tokens.shape[1], added, mask_always=graphs)
        device = self._pool.storage.device
        return self.model._logits_of_step(tokens, to_device(positions, device), self._cache, adapters, attention_mask,
                                          cuda_graphs=graphs)  # fmt: skip

    def _emit(self, requests: list[Request], tokens: list[int], logprobs: list[TokenLogprob | None] | None) -> None:
        now = time.monotonic()
        with self._cond:
            self._recent.append((now, len(tokens)))
        for i, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            request.generated.append(token)
            params = request.params
            if token in self.eos and not params.ignore_eos:
                self._send(request, None, final=True)
                self._finish(request, "stop")
                continue
            logprob = logprobs[i] if logprobs is not None else None
            stopped = self._send(request, token, final=len(request.generated) >= params.max_tokens, logprob=logprob)
            if stopped:
                self._finish(request, "stop")
            elif len(request.generated) >= params.max_tokens:
                self._finish(request, "length")

    def _send(self, request: Request, token: int | None, final: bool, logprob: TokenLogprob | None = None) -> bool:
        """Push the token (and its logprob) and the text it completes; True when a stop string ended
        the request."""
        if self.tokenizer is None:
            if token is not None:
                request.stream.push(StreamEvent(token, "", logprob=logprob))
            return False
        output = request.generated if token is not None else request.generated[:-1]  # the EOS is no text
        request.text.extend(output, final)
        text = request.text.text
        stop, safe = stop_at(text, request.params.stop) if request.params.stop else (None, len(text))
        if final and stop is None:
            safe = len(text)
        delta = text[request.emitted_chars : safe]
        request.emitted_chars = max(request.emitted_chars, safe)
        if token is not None or delta:
            request.stream.push(StreamEvent(token, delta, logprob=logprob))
        return stop is not None

    def _preempt(self, request: Request) -> None:
        self._running.remove(request)
        self._unreserve(request)
        with self._cond:
            self._waiting.appendleft(request)
        self.stats["preemptions"] += 1

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request in self._running:
            self._running.remove(request)
        with self._cond:
            if request in self._waiting:
                self._waiting.remove(request)
        self._unreserve(request)
        if not self._running:
            self._cache.release()  # the padding rows' page, until decoding resumes
        request.stream.push(StreamEvent(None, "", finish_reason=reason, error=error))
        self.stats[f"finished_{reason}"] += 1


def _freeze_heap() -> None:
    """Collect what is garbage now, then move every object left out of the collector's reach."""
    gc.collect()
    gc.freeze()
