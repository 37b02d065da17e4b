"""A generate() streamer for a whole batch: every row's tokens as they are produced.

transformers' TextIteratorStreamer takes one row only; the playground streams all rows of ONE
batched generate() call, so this streamer keeps the tokens of each row, notices each row's EOS
(generate then pads that row until the others finish), and hands snapshots to a consumer thread.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class Snapshot:
    """Tokens of every row so far (EOS excluded), and when each row finished (None: still going)."""

    tokens: list[list[int]]
    finished_at: list[float | None]
    eos: list[bool]  # the row stopped at an EOS token (not at max_new_tokens)
    done: bool  # generate() returned


class BatchStreamer(BaseStreamer):
    """Receives generate()'s tokens (the prompt `[batch, len]` first, then `[batch]` per step) in
    the generating thread; iterate it in another thread to get Snapshots, coalesced when the
    consumer is slower than the model. An error raised by the generating thread (`fail`) is
    raised again in the consumer."""

    def __init__(
        self, rows: int, eos_ids: Collection[int], on_step: Callable[[], None] | None = None
    ) -> None:
        self._tokens: list[list[int]] = [[] for _ in range(rows)]
        self._finished_at: list[float | None] = [None] * rows
        self._eos = [False] * rows
        self._eos_ids = frozenset(eos_ids)
        self._on_step = on_step
        self._prompt_seen = False
        self._ended = False
        self._queue: queue.Queue[Snapshot | BaseException] = queue.Queue()
        self.started = time.perf_counter()

    def start(self) -> None:
        """Reset the clock: call right before generate(), so waiting for the model is not counted."""
        self.started = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        now = time.perf_counter()
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self._finished_at[row] is not None:
                continue  # generate() pads finished rows
            if token in self._eos_ids:
                self._finished_at[row], self._eos[row] = now, True
            else:
                self._tokens[row].append(token)
        if self._on_step is not None:
            self._on_step()
        self._queue.put(self._snapshot(done=False))

    def end(self) -> None:
        """Called by generate() when it is done; again (a no-op) by the caller, in case it was not."""
        if self._ended:
            return
        self._ended = True
        now = time.perf_counter()
        self._finished_at = [now if t is None else t for t in self._finished_at]
        self._queue.put(self._snapshot(done=True))

    def fail(self, error: BaseException) -> None:
        self._queue.put(error)

    def _snapshot(self, done: bool) -> Snapshot:
        return Snapshot([list(t) for t in self._tokens], list(self._finished_at), list(self._eos), done)

    def __iter__(self) -> Iterator[Snapshot]:
        while True:
            item = self._queue.get()
            while not isinstance(item, BaseException) and not item.done and not self._queue.empty():
                item = self._queue.get()  # skip to the newest: the consumer fell behind
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.done:
                return
