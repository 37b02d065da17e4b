"""The playground without its UI: one MultiLoraModel, one prompt, several adapters (and/or the
base) in ONE batched generate() call, streamed; adapters loaded from an allowed folder; a history
of the page pool for the memory panel.

With an `Engine` (continuous batching), each row is a request of its own instead, and the rows of
users who ask at the same time share the engine's decode steps rather than waiting in turn.

Kept free of Gradio so that it can be used and tested on its own; `ui.py` only wires it up.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from hf_multilora import MultiLoraModel
from hf_multilora.serving import Engine, SamplingParams, StreamEvent

from .demo import Demo
from .streaming import BatchStreamer, Snapshot

BASE_CHOICE = "base"  # the choice for a row without adapter (adapter id None)
HISTORY_LENGTH = 500  # memory samples kept for the plot


class PlaygroundError(ValueError):
    """A request the playground refuses; its message is meant for the user."""


@dataclass(frozen=True)
class Settings:
    """Generation settings of one request. temperature 0 means greedy decoding."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise PlaygroundError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PlaygroundError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PlaygroundError(f"top-p must be in (0, 1], got {self.top_p}")

    def sampling_params(self) -> SamplingParams:
        """The same settings for one request of the serving engine."""
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed)  # fmt: skip

    def generate_kwargs(self) -> dict[str, Any]:
        """The keywords of generate() for these settings (the seed is set separately)."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


@dataclass(frozen=True)
class RowOutput:
    choice: str
    text: str
    tokens: int  # new tokens so far, EOS not counted
    seconds: float  # since generate() started, until the row finished (or now)
    finished: bool
    eos: bool  # finished at an EOS token rather than at max new tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Progress:
    """All rows of one request at one point of the stream; `done` on the last one."""

    rows: list[RowOutput]
    seconds: float
    done: bool


class Playground:
    def __init__(
        self,
        model: MultiLoraModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt_format: str = "{text}",
        adapter_dir: str | os.PathLike | None = None,
        demo: Demo | None = None,
        engine: Engine | None = None,
    ) -> None:
        """Serve `model` through `tokenizer`. The user's text goes where `{text}` is in
        `prompt_format`. Adapters can be loaded from folders under `adapter_dir` only (None: not
        at all). `demo` carries the tasks and examples shown in demo mode. `engine` (an Engine of
        `model`): rows are requests of it, so concurrent users share batches; greedy rows give
        what generate() gives, sampled ones are seeded per row (the same seed for each)."""
        if engine is not None and engine.model is not model:
            raise PlaygroundError("the engine serves another model than the playground's")
        if BASE_CHOICE in model.adapter_names:
            raise PlaygroundError(
                f"{BASE_CHOICE!r} names the base model here; register the adapter under another name"
            )
        self.model = model
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"  # new tokens follow the prompt in every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        self._eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.prompt_format = prompt_format
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.demo = demo
        self.engine = engine
        # One request at a time on the model: the seed, generate() and the memory sample belong together.
        self._lock = threading.Lock()
        # Replaced, never mutated, so that readers in other threads can copy it while a request runs.
        self._history: tuple[dict[str, Any], ...] = ()
        self._steps = 0
        self._kv_peak = 0
        self._record_memory("start")

    @classmethod
    def load(
        cls,
        base: str | os.PathLike,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        *,
        device: str | None = None,
        pool_bytes: int | None = None,
        continuous_batching: bool = False,
        **kwargs: Any,
    ) -> Playground:
        """Load the base model and tokenizer (a folder or a Hub id) and register `adapters`;
        `continuous_batching`: serve the rows through an Engine of the model (see the
        constructor's `engine`); `kwargs` go to the constructor."""
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = MultiLoraModel.from_pretrained(base, adapters, pool_bytes=pool_bytes)
        if device is not None:
            model.to(device)
        if continuous_batching:
            kwargs["engine"] = Engine(model, tokenizer)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_demo(
        cls, demo: Demo, adapters: Mapping[str, str | os.PathLike] | None = None, **kwargs: Any
    ) -> Playground:
        """The demo assets' model and adapters, plus `adapters`; the adapters' folder is the
        allowed directory unless `adapter_dir` says otherwise."""
        kwargs.setdefault("adapter_dir", demo.root / "adapters")
        return cls.load(
            demo.base,
            {**demo.adapters, **(adapters or {})},
            prompt_format=demo.prompt_format,
            demo=demo,
            **kwargs,
        )

    # ------------------------------------------------------------------ generation

    @property
    def choices(self) -> list[str]:
        """What a row can use: the base, then the registered adapters."""
        return [BASE_CHOICE, *self.model.adapter_names]

    def prompt(self, text: str) -> str:
        return self.prompt_format.replace("{text}", text)

    def generate_stream(self, text: str, choices: Sequence[str], settings: Settings) -> Iterator[Progress]:
        """One batched generate() with a row per choice, all on the same prompt; yields the rows
        as tokens arrive (fewer updates when the consumer is slower than the model), the last
        with `done`. The seed is set right before generate(), so the result equals a direct
        `model.generate` of the same batch after `torch.manual_seed(settings.seed)`."""
        adapter_ids = self._adapter_ids(choices)
        if not text.strip():
            raise PlaygroundError("type a prompt first")
        if self.engine is not None:
            yield from self._engine_stream(text, choices, adapter_ids, settings)
            return
        batch = self.tokenizer([self.prompt(text)] * len(adapter_ids), return_tensors="pt", padding=True)
        streamer = BatchStreamer(len(adapter_ids), self._eos_ids, on_step=self._note_kv_pages)
        cancel = threading.Event()
        worker = threading.Thread(
            target=self._generate,
            args=(batch.to(self.model.device), adapter_ids, settings, streamer, cancel),
            name="playground-generate",
            daemon=True,
        )
        worker.start()
        try:
            for snapshot in streamer:
                if snapshot.done:
                    worker.join()  # its memory sample is in the history before the last update
                yield self._progress(choices, snapshot, streamer.started)
        finally:
            cancel.set()  # the consumer went away: stop generating at the next step
            worker.join()

    def _engine_stream(
        self, text: str, choices: Sequence[str], adapter_ids: list[str | None], settings: Settings
    ) -> Iterator[Progress]:
        """A request of the engine per row; their events merged into the same Progress updates."""
        prompt_ids = self.tokenizer(self.prompt(text))["input_ids"]
        events: queue.Queue[tuple[int, StreamEvent, float]] = queue.Queue()
        streams = []
        try:
            for adapter in adapter_ids:
                streams.append(self.engine.submit(prompt_ids, adapter, settings.sampling_params()))
            readers = [
                threading.Thread(target=_forward_events, args=(row, stream, events), name="playground-row", daemon=True)
                for row, stream in enumerate(streams)
            ]  # fmt: skip
            for reader in readers:
                reader.start()
            rows = len(streams)
            tokens: list[list[int]] = [[] for _ in range(rows)]
            finished_at: list[float | None] = [None] * rows
            eos = [False] * rows
            started = time.perf_counter()
            while any(t is None for t in finished_at):
                batch = [events.get()]
                while not events.empty():  # everything that came meanwhile: one update
                    batch.append(events.get())
                for row, event, at in batch:
                    if event.error is not None:
                        raise RuntimeError(f"the {choices[row]!r} row failed: {event.error}")
                    if event.token_id is not None:
                        tokens[row].append(event.token_id)
                    if event.finish_reason is not None:
                        finished_at[row], eos[row] = at, event.finish_reason == "stop"
                self._note_kv_pages()
                done = all(t is not None for t in finished_at)
                if done:
                    with self._lock:
                        self._record_memory("generate")
                snapshot = Snapshot([list(t) for t in tokens], list(finished_at), list(eos), done)
                yield self._progress(choices, snapshot, started)
        finally:
            for stream in streams:
                stream.cancel()  # the consumer went away (or a row failed): the engine frees the rest

    def _adapter_ids(self, choices: Sequence[str]) -> list[str | None]:
        if not choices:
            raise PlaygroundError("select at least one adapter or the base")
        unknown = [c for c in choices if c not in self.choices]
        if unknown:
            raise PlaygroundError(f"unknown adapter(s) {unknown}; known: {self.choices}")
        return [None if c == BASE_CHOICE else c for c in choices]

    def _generate(
        self,
        batch: Mapping[str, torch.Tensor],
        adapter_ids: list[str | None],
        settings: Settings,
        streamer: BatchStreamer,
        cancel: threading.Event,
    ) -> None:
        """The generating thread: errors go to the consumer through the streamer."""
        try:
            with self._lock:
                try:
                    torch.manual_seed(settings.seed)
                    streamer.start()
                    self.model.generate(
                        **batch,
                        adapter_ids=adapter_ids,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                        pad_token_id=self.tokenizer.pad_token_id,
                        **settings.generate_kwargs(),
                    )
                finally:
                    self._record_memory("generate")
            streamer.end()
        except BaseException as error:  # handed over, raised again in the consumer
            streamer.fail(error)

    def _progress(self, choices: Sequence[str], snapshot: Snapshot, started: float) -> Progress:
        now = time.perf_counter()
        ends = [now if t is None else t for t in snapshot.finished_at]
        rows = [
            RowOutput(
                choice=choice,
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                tokens=len(tokens),
                seconds=end - started,
                finished=finished is not None,
                eos=eos,
            )
            for choice, tokens, end, finished, eos in zip(
                choices, snapshot.tokens, ends, snapshot.finished_at, snapshot.eos, strict=True
            )
        ]
        return Progress(rows, (max(ends) if snapshot.done else now) - started, snapshot.done)

    # ------------------------------------------------------------------ adapters from folders

    def adapter_folders(self) -> list[str]:
        """Folders (relative to adapter_dir, one or two levels down) holding a PEFT adapter: the
        UI offers these."""
        if self.adapter_dir is None:
            return []
        found = [
            *self.adapter_dir.glob("*/adapter_config.json"),
            *self.adapter_dir.glob("*/*/adapter_config.json"),
        ]
        inside = [p.parent for p in found if p.resolve().is_relative_to(self.adapter_dir)]
        return sorted(p.relative_to(self.adapter_dir).as_posix() for p in inside)

    def resolve_folder(self, folder: str) -> Path:
        """`folder`, relative to adapter_dir, as a real path inside it. The check is made on the
        resolved path (symlinks followed, `..` applied), so neither an absolute path nor a link
        can lead the UI to read anything outside adapter_dir."""
        if self.adapter_dir is None:
            raise PlaygroundError(
                "loading adapters from folders is off: start the playground with --adapter-dir DIR"
            )
        if not folder or not folder.strip():
            raise PlaygroundError(f"give a folder under {self.adapter_dir}")
        path = (self.adapter_dir / folder.strip()).resolve()
        if not path.is_relative_to(self.adapter_dir):
            raise PlaygroundError(f"{folder!r} is outside the adapter directory {self.adapter_dir}")
        if not path.is_dir():
            raise PlaygroundError(f"{folder!r} is not a folder under {self.adapter_dir}")
        return path

    def load_adapter_from(self, folder: str, name: str = "") -> str:
        """Register the PEFT adapter in `folder` (under adapter_dir) as `name` (default: the
        folder's name); returns the name. The model's errors (AdapterLoadError for a folder
        that is not a usable adapter, ValueError for a name in use) leave the registry as it was.
        The model is told adapter_dir too: the folder may be inside it while its files are links
        to elsewhere, and the weights, read at first use, are checked again then."""
        path = self.resolve_folder(folder)
        name = name.strip() or path.name
        if name == BASE_CHOICE:
            raise PlaygroundError(f"{BASE_CHOICE!r} names the base model; pick another name")
        with self._lock:
            self.model.load_adapter(path, name, allowed_dir=self.adapter_dir)
            self._record_memory(f"load {name}")
        return name

    # ------------------------------------------------------------------ memory

    def memory(self) -> list[dict[str, Any]]:
        """Samples of `model.memory_stats()` (oldest first): one at start, one after each request
        and each adapter load, with `step`, `event` and `pages_kv_peak` (KV pages held at the
        busiest point of the request: they return to the pool when it ends). Before the first
        request the pool does not exist and the samples have no page counts."""
        return list(self._history)

    def _note_kv_pages(self) -> None:
        """Called by the generating thread at every step, while the request's KV pages are held."""
        self._kv_peak = max(self._kv_peak, self.model.memory_stats().get("pages_kv", 0))

    def _record_memory(self, event: str) -> None:
        sample = {
            **self.model.memory_stats(),
            "step": self._steps,
            "event": event,
            "pages_kv_peak": self._kv_peak,
        }
        self._steps += 1
        self._kv_peak = 0
        self._history = (*self._history[1 - HISTORY_LENGTH :], sample)


def _forward_events(row: int, stream: Any, events: queue.Queue) -> None:
    for event in stream:
        events.put((row, event, time.perf_counter()))


class _Cancelled(StoppingCriteria):
    """Stops every row once the consumer has gone away (e.g. the browser tab was closed)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )
