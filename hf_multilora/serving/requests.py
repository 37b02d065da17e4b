"""What a client asks the engine for (SamplingParams), and what it gets back (a RequestStream of
StreamEvents), shared by the Python API and the HTTP server."""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .detokenize import IncrementalText


class RequestError(ValueError):
    """A request the engine refuses; its message names the problem (the HTTP server answers 400)."""


MAX_LOGPROBS = 20  # most likely tokens reported per output token at most (OpenAI's chat and vLLM's default)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy (top_p, top_k and seed then do nothing);
    top_k 0 and top_p 1 are off. `seed` makes sampling reproducible per request, whatever else runs
    in the batch. `stop`: strings that end the output (not included in it); needs the engine's
    tokenizer. `max_tokens`: new tokens at most (an EOS token ends earlier, unless `ignore_eos`).
    `presence_penalty`, `frequency_penalty`, `logit_bias`: OpenAI's, applied to the logits before
    anything else (greedy rows too): a token's logit less frequency_penalty x its count in the
    output so far, less presence_penalty if it is there at all, plus its bias (token id -> bias, a
    mapping, kept as sorted pairs). `logprobs`: None, or report each output token's log-probability
    and the `logprobs` most likely tokens' (at most MAX_LOGPROBS; see TokenLogprob)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        try:
            bias = dict(self.logit_bias)
        except (TypeError, ValueError):
            bias = {None: self.logit_bias}  # refused below, by name
        if not all(_is_int(t) and t >= 0 and _is_real(b) and -100 <= b <= 100 for t, b in bias.items()):
            raise RequestError(f"logit_bias must map token ids (ints >= 0) to numbers in [-100, 100], got {bias!r}")
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))
        checks = {
            "max_tokens": _is_int(self.max_tokens) and self.max_tokens >= 1,
            "temperature": _is_real(self.temperature) and self.temperature >= 0,
            "top_p": _is_real(self.top_p) and 0 < self.top_p <= 1,
            "top_k": _is_int(self.top_k) and self.top_k >= 0,
            "seed": self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
            "presence_penalty": _is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "frequency_penalty": _is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "logprobs": self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise RequestError(
                f"invalid sampling parameters: {values} (max_tokens >= 1, temperature >= 0, "
                f"0 < top_p <= 1, top_k >= 0, 0 <= seed < 2**63, penalties in [-2, 2], logprobs None or in [0, {MAX_LOGPROBS}])"
            )

    @property
    def penalized(self) -> bool:
        """Whether the output's token counts change the logits."""
        return bool(self.presence_penalty or self.frequency_penalty)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class TokenLogprob:
    """An output token's log-probability under the model (log-softmax of its logits as the model gave
    them: before penalties, bias, temperature, top-k and top-p, as vLLM reports by default), and the
    `top` most likely tokens' as (token id, log-probability), the most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class StreamEvent:
    """One step of a request: a new token and the text it completes (text may lag behind tokens
    while it could still be the start of a stop string), or the end (`finish_reason` set: "stop",
    "length", "cancelled" or "error", with `error` then). `logprob`: the token's, where the request
    asked for them."""

    token_id: int | None
    text: str
    finish_reason: str | None = None
    error: str | None = None
    logprob: TokenLogprob | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0


class RequestStream:
    """A request's events, from the engine's thread to one consumer: iterate it (`for event in
    stream`) or `async for` it, or `result()` to wait for the whole text. `cancel()` ends it; the
    engine frees its pages at the next step."""

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.usage = Usage(prompt_tokens)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per token id, where the request asked for them
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = threading.Event()
        self._cond = threading.Condition()
        self._events: deque[StreamEvent] = deque()
        self._closed = False
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- the engine's side
    def push(self, event: StreamEvent) -> None:
        with self._cond:
            if self._closed:
                return
            if event.token_id is not None:
                self.token_ids.append(event.token_id)
                self.usage.completion_tokens += 1
                if event.logprob is not None:
                    self.logprobs.append(event.logprob)
            self.text += event.text
            if event.finish_reason is not None:
                self.finish_reason, self.error, self._closed = event.finish_reason, event.error, True
            self._events.append(event)
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, ready in wakers:
            loop.call_soon_threadsafe(ready.set)

    @property
    def finished(self) -> bool:
        return self._closed

    # -- the consumer's side
    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            with self._cond:
                while not self._events:
                    if self._closed:
                        return
                    self._cond.wait()
                event = self._events.popleft()
            yield event

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        ready = asyncio.Event()
        waker = (asyncio.get_running_loop(), ready)
        with self._cond:
            self._wakers.append(waker)
        try:
            while True:
                with self._cond:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        if self._closed:
                            return
                        ready.clear()  # under the lock: a push after this sets it again
                if event is not None:
                    yield event
                else:
                    await ready.wait()
        finally:
            with self._cond:
                self._wakers.remove(waker)

    def result(self, timeout: float | None = None) -> str:
        """The whole text once the request ended (raises RuntimeError if it ended in an error)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed, timeout):
                raise TimeoutError(f"request {self.request_id} still running after {timeout} s")
        if self.finish_reason == "error":
            raise RuntimeError(f"request {self.request_id} failed: {self.error}")
        return self.text


@dataclass
class Request:
    """The engine's view of one request (its own thread only)."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    stream: RequestStream
    generator: torch.Generator | None  # a seeded request's own draws (None: the engine's)
    text: IncrementalText | None  # the output's text, decoded a few tokens per step (with a tokenizer)
    arrival: float
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0  # of the decoded output, already sent
    admitted: float | None = None
    pinned: bool = False  # its adapter is held resident (from admission to its end or preemption)
    output_counts: torch.Tensor | None = None  # float32 [vocab] on the device: the sampler's, for penalties

    def context(self) -> list[int]:
        """Prompt and generated tokens: what a preempted request recomputes."""
        return self.prompt_ids + self.generated

    def context_length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


def stop_at(text: str, stops: Sequence[str]) -> tuple[int | None, int]:
    """(where the first stop string starts in text or None, how much of text is safe to send: the
    rest could still become a stop string)."""
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    if first is not None:
        return first, first
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return None, len(text) - hold
