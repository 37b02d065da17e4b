"""The engine on Ray Serve: N replicas (one GPU each on GPUs), each request sent to a replica that
already holds its adapter while the load stays balanced, behind the same OpenAI routes as
`hf-multilora serve`.

Why: one replica serves as many adapters as its pool holds, but one GPU's throughput. More replicas
scale throughput; routing a request to a replica whose pool already holds its adapter (Ray Serve's
model multiplexing, keyed by the request's `model`) keeps each replica's set of hot adapters small,
as Punica's scheduler consolidates requests of an adapter on few GPUs.

Layout: a `Router` deployment (the HTTP ingress: authentication, JSON, server-sent events) and a
`Replica` deployment (a MultiLoraModel, its Engine and an OpenAIService). The router calls a replica
with `multiplexed_model_id=<model>`; our request router (serving/ray_router.py) prefers replicas
that loaded that id unless their queues are longer than the least loaded replica's by more than
`ModelSpec.affinity_slack`, and a replica "loads" it by making the adapter resident in its pool
(`Replica.hold`). Each replica publishes its engine's metrics to the application's `MetricsBoard`
actor, which the routers' /metrics reads.

On one machine: `hf-multilora serve --ray-replicas 2` (or `serve.run(application(spec, replicas=2))`);
`--ray-routers N` (`routers=N`) runs N Routers when one is not enough for the replicas' requests.
On a cluster: `ray start --head` on one node, `ray start --address=<head>:6379` on the others, then
on the head run `hf-multilora serve --ray-replicas N --ray-address auto` (or `serve.run` of
`application(...)` from a script): Ray places one replica per GPU anywhere in the cluster, and the
model and adapter paths must exist on every node (a shared filesystem or the Hub). The adapter
catalogue is fixed when the application is built: loading adapters at run time
(/v1/load_lora_adapter) is refused, because a replica started later would not know them.
"""

# No `from __future__ import annotations`: FastAPI must see Request itself in the Router's methods,
# which Ray Serve's ingress rewrites (string annotations then resolve to nothing: 422 answers).

import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from transformers import AutoTokenizer

from ..model import MultiLoraModel
from .engine import Engine
from .ray_router import AdapterAffinityRouter
from .server import (
    ApiError,
    OpenAIService,
    bad_request,
    error_body,
    json_answer,
    json_body,
    key_refusal,
    labelled_prometheus_text,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What every replica loads: `base` (a folder or Hub id), `adapters` {name: folder or Hub id},
    the base model's served `model_name`, a `chat_template` (None: the tokenizer's), the `device`
    (None: CUDA where there is one), the pool size and the engine's `max_running` and `kv_cache_dtype`.

    `max_waiting`: requests each replica's engine holds beyond `max_running` (None: 4 x max_running),
    ready to start as rows end. Ray Serve retries a full replica with backoff (up to 0.5 s), so a
    shallow queue leaves rows empty under overload (2 x max_running in all: one replica served
    0.45x the tokens with twice its share of clients, docs/benchmarks.md). `max_routing`: requests
    the router holds while every replica is full (more: 503 with Retry-After). `affinity_slack`: a
    replica that holds a request's adapter gets it while its queue is within that many requests of
    the least loaded replica's; past that the least loaded replica takes it (serving/ray_router.py)."""

    base: str
    adapters: dict[str, str] = field(default_factory=dict)
    model_name: str = "base"
    chat_template: str | None = None
    device: str | None = None
    pool_bytes: int | None = None
    max_running: int = 64
    kv_cache_dtype: str | None = None
    max_waiting: int | None = None
    max_routing: int = 1024
    affinity_slack: int = 8
    capture_graphs: int | None = None  # Engine's: decode graphs captured at start, for requests up to that many tokens

    def __post_init__(self) -> None:
        for name in ("max_running", "max_waiting", "max_routing", "affinity_slack", "capture_graphs"):
            value, lowest = getattr(self, name), 0 if name == "affinity_slack" else 1
            if not (value is None and name in ("max_waiting", "capture_graphs")) and (type(value) is not int or value < lowest):
                raise ValueError(f"ModelSpec.{name} must be an int >= {lowest}, got {value!r}")

    @property
    def engine_waiting(self) -> int:
        return 4 * self.max_running if self.max_waiting is None else self.max_waiting


METRICS_PUBLISH_S = 0.5  # how often each replica sends its engine's metrics to the board
METRICS_STALE_S = 5.0  # a replica silent this long is gone (scaled down, failed): it leaves /metrics


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest engine metrics of each replica of one application, for its routers' /metrics: Ray
    Serve hands a request to ONE replica, so a router cannot ask them all, and one replica's metrics
    at random per scrape would be silently wrong."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, metrics: dict) -> None:
        self._latest[replica] = (time.monotonic(), metrics)

    def snapshot(self) -> dict[str, dict]:
        """{replica: its metrics} of the replicas heard from within METRICS_STALE_S."""
        now = time.monotonic()
        self._latest = {r: (t, m) for r, (t, m) in self._latest.items() if now - t < METRICS_STALE_S}
        return {replica: metrics for replica, (_, metrics) in sorted(self._latest.items())}


def metrics_board(app_name: str) -> Any:
    """The application's board, created by whichever of its routers and replicas asks first; it lives
    as long as that process, and the next to ask after it is gone creates it again (its content is
    refreshed every METRICS_PUBLISH_S)."""
    return MetricsBoard.options(name=f"hf_multilora_metrics:{app_name}", get_if_exists=True).remote()


@serve.deployment
class Replica:
    def __init__(self, spec: ModelSpec) -> None:
        import torch

        device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = MultiLoraModel.from_pretrained(spec.base, spec.adapters, pool_bytes=spec.pool_bytes)
        model.to(device)
        self.engine = Engine(model, AutoTokenizer.from_pretrained(spec.base), max_running=spec.max_running,
                             max_waiting=spec.engine_waiting, kv_cache_dtype=spec.kv_cache_dtype,
                             capture_graphs=spec.capture_graphs, freeze_gc=True)  # fmt: skip
        context = serve.get_replica_context()
        self.service = OpenAIService(self.engine, model_name=spec.model_name, chat_template=spec.chat_template,
                                     system_fingerprint=f"hf_multilora-{context.replica_tag}")  # fmt: skip
        self._publish(context.app_name, context.replica_tag, once=True)  # on /metrics before the first request
        threading.Thread(target=self._publish, args=(context.app_name, context.replica_tag), daemon=True,
                         name="hf_multilora metrics").start()  # fmt: skip

    def _publish(self, app_name: str, replica: str, once: bool = False) -> None:
        """Send the engine's metrics to the application's board, every METRICS_PUBLISH_S unless `once`
        (the thread ends with the replica's process)."""
        board = None
        while True:
            try:
                board = board or metrics_board(app_name)
                ray.get(board.put.remote(replica, self.engine.metrics()), timeout=10)
            except Exception:  # the board's process went away: ask for it (create it) again
                logger.debug("hf_multilora replica %s: metrics not published", replica, exc_info=True)
                board = None
            if once:
                return
            time.sleep(METRICS_PUBLISH_S)

    @serve.multiplexed(max_num_models_per_replica=64)
    async def hold(self, model: str) -> str:
        """Ray Serve's model loading for `model`: its adapter made resident here (a cache of names;
        the pool's own LRU evicts adapters when pages run short)."""
        adapter = self.service.adapter_of(model)
        if adapter is not None:
            self.engine.model.prefetch_adapters([adapter])
        return model

    async def respond(self, route: str, body: dict) -> tuple[int, dict]:
        """(HTTP status, JSON) of a whole completion."""
        try:
            await self.hold(serve.get_multiplexed_model_id())
            return 200, await self.service.submit(route, body).whole()
        except ApiError as error:
            return error.status, error_body(error)

    async def respond_stream(self, route: str, body: dict) -> AsyncIterator[Any]:
        """First (status, error JSON or None), then the server-sent events."""
        try:
            await self.hold(serve.get_multiplexed_model_id())
            reply = self.service.submit(route, body)
        except ApiError as error:
            yield error.status, error_body(error)
            return
        yield 200, None
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        async for chunk in reply.chunks(usage):
            yield chunk

    async def models(self) -> dict:
        return self.service.models()


# Requests the router takes beyond what its replicas and its queue do: /health, /metrics and /v1/models stay
# answered under load.
ROUTER_SPARE_REQUESTS = 16

router_app = FastAPI(title="hf_multilora on Ray Serve", docs_url=None, redoc_url=None)


@serve.deployment
@serve.ingress(router_app)
class Router:
    """The HTTP ingress: checks the key, reads the JSON and hands the request to a replica chosen by
    its `model`. /metrics holds every replica's engine metrics, labelled `replica` (see
    `MetricsBoard`); /v1/models comes from one replica (they all serve the same)."""

    def __init__(self, replica: Any, api_key: str | None = None) -> None:
        self.replica, self.api_key = replica, api_key
        self.app_name = serve.get_replica_context().app_name

    @router_app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @router_app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        snapshots = await metrics_board(self.app_name).snapshot.remote()
        return PlainTextResponse(labelled_prometheus_text([({"replica": r}, m) for r, m in snapshots.items()]))

    @router_app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        return key_refusal(self.api_key, request) or await self.replica.models.remote()

    @router_app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._forward(request, "completions")

    @router_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._forward(request, "chat")

    @router_app.post("/v1/load_lora_adapter")
    @router_app.post("/v1/unload_lora_adapter")
    async def adapters(self, request: Request) -> Any:
        error = ApiError(501, "the adapters of a Ray Serve deployment are fixed when it is built "
                         "(ModelSpec.adapters); run-time loading is not supported there", "not_implemented_error")  # fmt: skip
        return key_refusal(self.api_key, request) or JSONResponse(error_body(error), 501)

    async def _forward(self, request: Request, route: str) -> Any:
        refused = key_refusal(self.api_key, request)
        if refused is not None:
            return refused
        try:
            body = await json_body(request)
        except ApiError as error:
            return JSONResponse(error_body(error), error.status)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return JSONResponse(error_body(bad_request("model must name the base model or an adapter", "model")), 400)
        handle = self.replica.options(multiplexed_model_id=model)
        try:
            if not body.get("stream"):
                status, payload = await handle.respond.remote(route, body)
                return json_answer(payload, status)
            events = handle.options(stream=True).respond_stream.remote(route, body)
            status, payload = await events.__anext__()
        except BackPressureError:  # max_routing requests already wait for a replica
            error = ApiError(503, "every replica is full and max_routing requests wait for one", "overloaded_error")
            return json_answer(error_body(error), 503)
        if status != 200:
            events.cancel()
            return json_answer(payload, status)

        async def chunks() -> AsyncIterator[str]:
            try:
                async for chunk in events:
                    yield chunk
            finally:  # the client went away: the replica's generator cancels the request
                events.cancel()

        return StreamingResponse(chunks(), media_type="text/event-stream")


def application(
    spec: ModelSpec,
    replicas: int = 1,
    *,
    routers: int = 1,
    api_key: str | None = None,
    gpus_per_replica: float | None = None,
) -> Any:
    """The Ray Serve application: `replicas` Replicas of `spec` behind `routers` Routers (Ray's proxy
    spreads requests over them). One Router costs ~10 ms of CPU per request (docs/benchmarks.md), so
    it saturates near ~90 requests/s: many replicas need more of them. `gpus_per_replica`: default 1
    where the cluster has GPUs and the spec's device is not the CPU, else 0."""
    for name, value in (("replicas", replicas), ("routers", routers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if gpus_per_replica is None:
        has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        gpus_per_replica = 1 if has_gpus and spec.device != "cpu" else 0
    # Ray Serve sends a replica at most `max_ongoing_requests` at once (default 5): left at that, an
    # engine would batch 5 rows. A replica takes what its engine runs and queues, so that rows ending
    # are replaced from its own queue at once; up to max_routing more wait in the router (Ray's
    # queue at the router's handle, FIFO), and the router takes all of them, so that its own routes
    # are never stuck behind completions in Ray's proxy. Each router keeps its own routing queue.
    per_replica = spec.max_running + spec.engine_waiting
    routing = RequestRouterConfig(request_router_class=AdapterAffinityRouter,
                                  request_router_kwargs={"slack": spec.affinity_slack})  # fmt: skip
    replica = Replica.options(num_replicas=replicas, max_ongoing_requests=per_replica,
                              max_queued_requests=spec.max_routing, request_router_config=routing,
                              ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 0})  # fmt: skip
    router = Router.options(num_replicas=routers,
                            max_ongoing_requests=replicas * per_replica + spec.max_routing + ROUTER_SPARE_REQUESTS,
                            ray_actor_options={"num_cpus": 0})  # fmt: skip
    return router.bind(replica.bind(spec), api_key)
