"""An OpenAI-compatible HTTP server over an Engine (FastAPI): the adapter is named in `model`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent
events with `"stream": true`), POST /v1/load_lora_adapter and /v1/unload_lora_adapter (folders under
the adapter directory only), GET /health and GET /metrics (Prometheus text). `model` is an
adapter's name, or the served base model's own name for no adapter. Errors come in OpenAI's JSON
shape: 400 bad parameters, 401 a wrong API key, 404 an unknown model, 503 a full queue (with
Retry-After). A client that goes away cancels its request (its pages go back at the next step).

Extensions to OpenAI's parameters, as vLLM takes them: `top_k`, `ignore_eos`. `n` choices are n
engine requests, decoded side by side in the same batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..adapters.loading import AdapterLoadError
from .engine import Engine, EngineOverloaded
from .requests import MAX_LOGPROBS, RequestError, RequestStream, SamplingParams, StreamEvent, TokenLogprob

RETRY_AFTER_S = 1
MAX_CHOICES = 128  # `n` at most, as OpenAI's chat completions take it
_SAMPLING_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "presence_penalty",
                   "frequency_penalty", "logit_bias"}  # fmt: skip
_UNSUPPORTED = {  # OpenAI parameters we refuse rather than ignore (the answer would not be what was asked)
    "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "response_format": (None, {"type": "text"}),
}  # fmt: skip


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


class OpenAIService:
    """The OpenAI routes' logic over one Engine, free of any web framework: the FastAPI app below and
    the Ray Serve replicas (serving/ray.py) call it.

    `model_name`: the base model's name in `model`. `adapter_dir`: the only folder `load_adapter`
    may load from (None: it refuses). `chat_template`: a Jinja chat template instead of the
    tokenizer's own. `system_fingerprint`: named in every response (OpenAI's field): which replica
    answered, on Ray Serve."""

    def __init__(
        self,
        engine: Engine,
        *,
        model_name: str,
        adapter_dir: str | Path | None = None,
        chat_template: str | None = None,
        system_fingerprint: str | None = None,
    ) -> None:
        if engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer")
        if model_name in engine.model.adapter_names:
            raise ValueError(f"the base model's name {model_name!r} is also an adapter's name")
        self.engine, self.model_name, self.chat_template = engine, model_name, chat_template
        self.system_fingerprint = system_fingerprint
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.created = int(time.time())

    def models(self) -> dict:
        def entry(name: str, parent: str | None) -> dict:
            card = {"id": name, "object": "model", "created": self.created, "owned_by": "hf_multilora"}
            return {**card, "parent": parent} if parent else card

        entries = [entry(self.model_name, None)] + [entry(n, self.model_name) for n in self.engine.model.adapter_names]
        return {"object": "list", "data": entries}

    def submit(self, route: str, body: dict) -> Reply:
        """Start the request of `body` for `route` ("completions" or "chat"); raises ApiError."""
        chat = route == "chat"
        prompt = self._chat_prompt(body) if chat else self._completion_prompt(body)
        adapter = self.adapter_of(body.get("model"))
        params, choices = _sampling(body, chat), _choices(body)
        streams: list[RequestStream] = []
        try:
            for i in range(choices):  # a seeded request's choices draw from seed, seed + 1, ...
                seed = params.seed if params.seed is None else (params.seed + i) % 2**63
                streams.append(self.engine.submit(prompt, adapter, dataclasses.replace(params, seed=seed)))
        except (KeyError, RequestError, EngineOverloaded) as error:
            for stream in streams:  # all choices or none
                stream.cancel()
            if isinstance(error, KeyError):
                raise ApiError(404, str(error.args[0]), "not_found_error", "model") from error
            if isinstance(error, RequestError):
                raise bad_request(str(error)) from error
            raise ApiError(503, str(error), "overloaded_error") from error
        token_text = self.engine.tokenizer.decode if params.logprobs is not None else None
        return Reply(streams, body["model"], chat, created=int(time.time()), token_text=token_text,
                     fingerprint=self.system_fingerprint)  # fmt: skip

    def adapter_of(self, model: object) -> str | None:
        """The adapter `model` names (None: the base model); ApiError when it names nothing served."""
        if not isinstance(model, str) or not model:
            raise bad_request("model must name the base model or an adapter", "model")
        if model == self.model_name:
            return None
        if model not in self.engine.model.adapter_names:
            raise ApiError(404, f"the model {model!r} does not exist", "not_found_error", "model")
        return model

    def _completion_prompt(self, body: dict) -> str | list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if (isinstance(prompt, str) and prompt) or (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
        ):
            return prompt
        raise bad_request("prompt must be a non-empty string or a list of token ids (one prompt)", "prompt")

    def _chat_prompt(self, body: dict) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise bad_request("messages must be a non-empty list of {role, content} with text content", "messages")
        tokenizer = self.engine.tokenizer
        template = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise bad_request("the model's tokenizer has no chat template (start the server with one)")
        return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)

    def load_adapter(self, body: dict) -> str:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise bad_request("lora_name and lora_path must be non-empty strings")
        if self.adapter_dir is None:
            raise ApiError(403, "loading adapters at run time is off (start the server with --adapter-dir)",
                           "permission_error")  # fmt: skip
        if name == self.model_name:
            raise bad_request(f"{name!r} is the base model's name", "lora_name")
        folder = Path(path) if Path(path).is_absolute() else self.adapter_dir / path
        try:
            self.engine.model.load_adapter(folder, name, allowed_dir=self.adapter_dir)
        except (AdapterLoadError, ValueError, OSError) as error:
            raise bad_request(str(error), "lora_path") from error
        return f"adapter {name} loaded"

    def unload_adapter(self, body: dict) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in self.engine.model.adapter_names:
            raise ApiError(404, f"no adapter named {name!r}", "not_found_error", "lora_name")
        try:
            self.engine.unload_adapter(name)
        except RequestError as error:
            raise ApiError(409, str(error), "conflict_error", "lora_name") from error
        return f"adapter {name} unloaded"

    def metrics(self) -> str:
        return prometheus_text(self.engine.metrics())


def key_refusal(api_key: str | None, request: Request) -> JSONResponse | None:
    """The 401 answer to a request without `Authorization: Bearer <api_key>` (None: let it through)."""
    if api_key is None or request.headers.get("authorization") == f"Bearer {api_key}":
        return None
    return JSONResponse(error_body(ApiError(401, "invalid or missing API key", "authentication_error")), 401)


def json_answer(payload: dict, status: int) -> JSONResponse:
    """`payload` as JSON; a 503 (overloaded) tells the client when to come back."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(payload, status_code=status, headers=headers)


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}}


def build_app(service: OpenAIService, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app of `service`. `api_key`: required as `Authorization: Bearer <key>` on the /v1
    routes (None: open)."""
    app = FastAPI(title="hf_multilora", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return json_answer(error_body(error), error.status)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        refused = key_refusal(api_key, request) if request.url.path.startswith("/v1/") else None
        return refused or await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics())

    @app.get("/v1/models")
    async def models() -> dict:
        return service.models()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _respond(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _respond(request, "chat")

    async def _respond(request: Request, route: str) -> Any:
        body = await json_body(request)
        reply = service.submit(route, body)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(reply.chunks(usage), media_type="text/event-stream")
        return await reply.whole(request.is_disconnected)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        return PlainTextResponse(service.load_adapter(await json_body(request)))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        return PlainTextResponse(service.unload_adapter(await json_body(request)))

    return app


async def json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"the body is not JSON: {error}") from error
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def _choices(body: dict) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"n must be an int in [1, {MAX_CHOICES}], got {n!r}", "n")
    return n


def _logprobs_asked(body: dict, chat: bool) -> int | None:
    """The number of top tokens to report with each output token (None: no logprobs). Completions:
    `logprobs` is that number; chat: `logprobs` true, with `top_logprobs` tokens (default 0)."""
    top = body.get("top_logprobs") if chat else body.get("logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS):
        name = "top_logprobs" if chat else "logprobs"
        raise bad_request(f"{name} must be an int in [0, {MAX_LOGPROBS}], got {top!r}", name)
    if not chat:
        return top
    asked = body.get("logprobs")
    if asked not in (None, True, False):
        raise bad_request(f"logprobs must be true or false, got {asked!r}", "logprobs")
    if top is not None and not asked:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if asked else None


def _sampling(body: dict, chat: bool) -> SamplingParams:
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise bad_request(f"{name}={body[name]!r} is not supported", name)
    given = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    given["logprobs"] = _logprobs_asked(body, chat)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        given["max_tokens"] = body["max_completion_tokens"]
    if isinstance(given.get("stop"), str):
        given["stop"] = (given["stop"],)
    if isinstance(given.get("stop"), list):
        given["stop"] = tuple(given["stop"])
    if isinstance(given.get("logit_bias"), dict):  # JSON object keys are strings: token ids as text
        try:
            given["logit_bias"] = {int(token): bias for token, bias in given["logit_bias"].items()}
        except ValueError as error:
            raise bad_request(f"logit_bias keys must be token ids, got {list(given['logit_bias'])}", "logit_bias") from error
    try:
        return SamplingParams(**given)
    except (RequestError, TypeError) as error:
        raise bad_request(str(error)) from error


class Reply:
    """OpenAI's response objects for one request of `n` choices (one engine request each): whole, or
    as stream chunks."""

    def __init__(
        self, streams: list[RequestStream], model: str, chat: bool, created: int,
        token_text: Callable[[list[int]], str] | None = None, fingerprint: str | None = None,
    ) -> None:  # fmt: skip
        """`token_text`: the tokenizer's decode, to name the tokens of logprobs (None: not asked).
        `fingerprint`: the responses' system_fingerprint."""
        self.streams, self.model, self.chat, self.created, self.token_text = streams, model, chat, created, token_text
        self.fingerprint = fingerprint
        self.id = ("chatcmpl-" if chat else "cmpl-") + streams[0].request_id

    def _usage(self) -> dict:
        prompt = self.streams[0].usage.prompt_tokens  # one prompt for all choices, as OpenAI counts it
        completion = sum(s.usage.completion_tokens for s in self.streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _envelope(self, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices}  # fmt: skip

    def _cancel(self) -> None:
        for stream in self.streams:
            if not stream.finished:
                stream.cancel()

    async def _events(self) -> AsyncIterator[tuple[int, StreamEvent]]:
        """(choice index, event) of every choice, as they come."""
        queue: asyncio.Queue[tuple[int, StreamEvent | None]] = asyncio.Queue()

        async def forward(index: int, stream: RequestStream) -> None:
            try:
                async for event in stream:
                    await queue.put((index, event))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(forward(i, s)) for i, s in enumerate(self.streams)]
        try:
            running = len(tasks)
            while running:
                index, event = await queue.get()
                if event is None:
                    running -= 1
                else:
                    yield index, event
        finally:
            for task in tasks:
                task.cancel()

    async def whole(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> dict:
        """The response once every choice ended; `disconnected()` is asked after every token (a client
        that went away cancels the request)."""
        try:
            async for _ in self._events():
                if disconnected is not None and await disconnected():
                    self._cancel()
        finally:
            self._cancel()
        failed = next((s for s in self.streams if s.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"the request failed: {failed.error}", "server_error")
        choices = []
        for index, stream in enumerate(self.streams):
            logprobs = None
            if self.token_text is not None:
                logprobs = self._logprobs(list(zip(stream.token_ids, stream.logprobs, strict=True)), 0)
            choice: dict[str, Any] = {"index": index, "finish_reason": stream.finish_reason, "logprobs": logprobs}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": stream.text}
            else:
                choice["text"] = stream.text
            choices.append(choice)
        return {**self._envelope(choices, chunk=False), "usage": self._usage()}

    async def chunks(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events; when the client goes away the server stops iterating, and the request
        is cancelled."""
        try:
            async for chunk in self._chunks(include_usage):
                yield chunk
        finally:
            self._cancel()

    async def _chunks(self, include_usage: bool) -> AsyncIterator[str]:
        if self.chat:
            for index in range(len(self.streams)):
                first = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield _sse(self._envelope([first], chunk=True))
        pending: list[list[tuple[int, TokenLogprob]]] = [[] for _ in self.streams]  # logprobs not sent yet
        offsets = [0] * len(self.streams)  # completions' text_offset of the next token
        async for index, event in self._events():
            if event.logprob is not None and event.token_id is not None:
                pending[index].append((event.token_id, event.logprob))
            if event.finish_reason == "error":
                error = {"message": f"the request failed: {event.error}", "type": "server_error", "code": 500}
                yield _sse({"error": error})
                break
            if not event.text and event.finish_reason is None:
                continue
            logprobs = self._logprobs(pending[index], offsets[index])
            if logprobs is not None and not self.chat:
                offsets[index] += sum(len(t) for t in logprobs["tokens"])
            pending[index] = []
            choice: dict[str, Any] = {"index": index, "finish_reason": event.finish_reason, "logprobs": logprobs}
            if self.chat:
                choice["delta"] = {"content": event.text} if event.text else {}
            else:
                choice["text"] = event.text
            yield _sse(self._envelope([choice], chunk=True))
        if include_usage:
            yield _sse({**self._envelope([], chunk=True), "usage": self._usage()})
        yield "data: [DONE]\n\n"

    def _logprobs(self, tokens: list[tuple[int, TokenLogprob]], offset: int) -> dict | None:
        """OpenAI's `logprobs` of a choice (or a chunk) for these (token id, logprob) pairs: chat's
        `content` list, or completions' parallel lists (`text_offset` from `offset` on); None where
        the request did not ask."""
        if self.token_text is None:
            return None
        text = self.token_text
        if self.chat:
            def entry(token: int, logprob: float) -> dict:
                name = text([token])
                return {"token": name, "logprob": logprob, "bytes": list(name.encode())}

            content = [{**entry(t, e.logprob), "top_logprobs": [entry(*top) for top in e.top]} for t, e in tokens]
            return {"content": content, "refusal": None}
        names = [text([t]) for t, _ in tokens]
        offsets = list(itertools.accumulate((len(n) for n in names[:-1]), initial=offset))[: len(names)]
        top = [{text([t]): v for t, v in e.top} | {name: e.logprob} for name, (_, e) in zip(names, tokens, strict=True)]
        return {"tokens": names, "token_logprobs": [e.logprob for _, e in tokens], "top_logprobs": top,
                "text_offset": offsets}  # fmt: skip


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def prometheus_text(metrics: dict[str, Any]) -> str:
    """The engine's metrics in Prometheus' text format (gauges and counters, `hf_multilora_` names)."""
    return labelled_prometheus_text([({}, metrics)])


def labelled_prometheus_text(snapshots: Sequence[tuple[dict[str, str], dict[str, Any]]]) -> str:
    """Several engines' metrics (each with its labels, e.g. a replica's name) in one exposition: each
    family's samples follow its one TYPE line, as the format requires."""
    families: dict[str, tuple[str, list[str]]] = {}
    for labels, metrics in snapshots:
        for family, kind, extra, value in _samples(metrics):
            names = {**labels, **extra}
            label_text = "{" + ",".join(f'{k}="{v}"' for k, v in names.items()) + "}" if names else ""
            families.setdefault(family, (kind, []))[1].append(f"{family}{label_text} {float(value)}")
    lines = []
    for family, (kind, samples) in families.items():
        lines += [f"# TYPE {family} {kind}", *samples]
    return "\n".join(lines) + "\n" if lines else ""


def _samples(metrics: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, str], float]]:
    """(family, type, labels, value) of each sample of one engine's metrics."""
    gauges = {
        "requests_waiting": metrics["waiting"], "requests_running": metrics["running"],
        "output_tokens_per_second": metrics["tokens_per_s"],
    }  # fmt: skip
    for name, value in gauges.items():
        yield f"hf_multilora_{name}", "gauge", {}, value
    for kind, key in (("total", "pages_total"), ("free", "pages_free"), ("kv", "pages_kv"), ("adapter", "pages_adapter")):
        yield "hf_multilora_pool_pages", "gauge", {"kind": kind}, metrics.get(key, 0)
    counted = {"submitted", "prefills", "prefill_waits", "prefill_tokens", "prefill_padding", "prefill_seconds",
               "decode_steps", "decode_seconds", "reserve_seconds", "prefetch_seconds", "preemptions", "graph_captures", "graph_replays"}  # fmt: skip
    for name, value in metrics.items():
        if name in counted:
            yield f"hf_multilora_{name}_total", "counter", {}, value
    for key, value in metrics.items():
        if key.startswith("finished_"):
            yield "hf_multilora_requests_finished_total", "counter", {"reason": key[9:]}, value
