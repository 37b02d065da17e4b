"""The engine on Ray Serve: 2 CPU replicas of the demo model behind the Router, driven by the
official `openai` client (skipped where Ray Serve is not installed: pip install 'hf_multilora[ray]')."""

import asyncio
import collections
import contextlib
import json
import re
import socket
import threading
import time
import types

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from hf_multilora.app.demo import read_demo  # noqa: E402

from hf_multilora.serving.ray import ModelSpec, application  # noqa: E402

DEMO = read_demo()
KEY = "ray-key"


@pytest.fixture(scope="module")
def url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The replicas need not inherit conftest's TRITON_INTERPRET=1 (the package's kernels follow
    # HF_MULTILORA_KERNELS, but a kernel called directly picks Triton by that variable): CPU replicas
    # serve through the torch paths, as a user's would.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "0"}})  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = ModelSpec(
        base=str(DEMO.base), adapters={n: str(p) for n, p in DEMO.adapters.items()}, model_name="demo-base",
        chat_template=DEMO.prompt_format.replace("{text}", "{{ messages[-1]['content'] }}"), device="cpu",
    )  # fmt: skip
    serve.run(application(spec, replicas=2, routers=2, api_key=KEY))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_two_replicas_serve_every_adapter_and_stream(url):
    deployments = serve.status().applications["default"].deployments
    assert deployments["Replica"].replica_states.get("RUNNING") == 2
    assert deployments["Router"].replica_states.get("RUNNING") == 2  # routers=2
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["demo-base", *DEMO.adapters]
    spec = json.loads((DEMO.root / "demo.json").read_text())["adapters"]
    jobs = [(name, ex["text"], ex["expected"]) for name, s in spec.items() for ex in s["examples"][:3]]
    results, fingerprints = {}, set()

    def call(job):
        name, text, _ = job
        reply = client.completions.create(model=name, prompt=DEMO.prompt_format.replace("{text}", text),
                                          max_tokens=32, temperature=0)  # fmt: skip
        results[job] = reply.choices[0].text
        fingerprints.add(reply.system_fingerprint)

    threads = [threading.Thread(target=call, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {job: job[2] for job in jobs} == results
    assert 1 <= len(fingerprints) <= 2 and all(f.startswith("hf_multilora-") for f in fingerprints)  # who answered
    name, text, expected = jobs[0]
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                            max_tokens=32, temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_errors_through_the_router(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="upper", prompt="x", max_tokens=2, top_p=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    reply = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"},
                       headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert reply.status_code == 501
    assert "hf_multilora_requests_running" in httpx.get(f"{url}/metrics").text


UPPER = {"model": "upper", "prompt": "a b c", "temperature": 0, "ignore_eos": True}


def samples(metrics, family):
    """{replica: value} of a family's samples in a /metrics text."""
    found = re.findall(rf'^{family}{{replica="([^"]+)"}} (\S+)$', metrics, flags=re.MULTILINE)
    return {replica: float(value) for replica, value in found}


def test_metrics_hold_every_replica_once(url):
    """Ray Serve hands /metrics' call to one replica: the router answered with a random replica's
    engine each scrape. Now every replica publishes to the application's board."""
    time.sleep(1.5)  # earlier tests' last requests published (CI once counted one of them in the difference)
    before = samples(httpx.get(f"{url}/metrics").text, "hf_multilora_submitted_total")
    assert len(before) == 2
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    answered_by = []

    def call(name):
        reply = client.completions.create(model=name, prompt="a b c", max_tokens=4, temperature=0)
        answered_by.append(reply.system_fingerprint.removeprefix("hf_multilora-"))

    threads = [threading.Thread(target=call, args=(name,)) for name in [*DEMO.adapters, "demo-base"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.5)  # three publications
    metrics = httpx.get(f"{url}/metrics").text
    after = samples(metrics, "hf_multilora_submitted_total")
    assert set(after) == set(before) and set(answered_by) <= set(after)  # labelled by replica tag
    assert sum(after.values()) - sum(before.values()) == len(threads)
    families = re.findall(r"^# TYPE (\S+) ", metrics, flags=re.MULTILINE)
    assert len(families) == len(set(families)) and "hf_multilora_pool_pages" in families  # one TYPE line each
    assert len(re.findall(r'^hf_multilora_pool_pages\{replica="[^"]+",kind="kv"\} ', metrics, flags=re.MULTILINE)) == 2


@contextlib.contextmanager
def deployed(url, name, replicas=1, **limits):
    """Another application of the demo on CPU replicas at {url}/{name} with these ModelSpec limits,
    its "upper" adapter loaded by a first short request; deleted afterwards."""
    spec = ModelSpec(base=str(DEMO.base), adapters={n: str(p) for n, p in DEMO.adapters.items()},
                     model_name="demo-base", device="cpu", **limits)  # fmt: skip
    serve.run(application(spec, replicas=replicas), name=name, route_prefix=f"/{name}")
    try:
        httpx.post(f"{url}/{name}/v1/completions", json={**UPPER, "max_tokens": 2}, timeout=120).raise_for_status()
        yield f"{url}/{name}"
    finally:
        serve.delete(name)


def start_clients(endpoint, count, max_tokens):
    """`count` threads, each posting one completion of `max_tokens` to `endpoint`; (threads, replies
    as they come)."""
    replies = []

    def call():
        replies.append(httpx.post(f"{endpoint}/v1/completions", json={**UPPER, "max_tokens": max_tokens}, timeout=120))

    threads = [threading.Thread(target=call) for _ in range(count)]
    for t in threads:
        t.start()
    return threads, replies


def test_a_replica_batches_more_than_ray_serves_default_of_5_requests(url):
    """Ray Serve hands a replica at most 5 requests at once unless told otherwise (and the router
    too): the engine would then never batch more than 5 rows, however many clients wait. Counted
    in decode steps: 12 concurrent requests of 96 tokens take 95-100 steps batched together, at least
    12 x 96 / 5 = 230 five at a time. (Polling the running-rows gauge, published every 0.5 s, saw
    none of a run that took ~1 s on CI.)"""
    with deployed(url, "single", max_running=16) as single:

        def decode_steps():
            time.sleep(1.5)  # three publications: the last steps counted
            return sum(samples(httpx.get(f"{single}/metrics", timeout=60).text, "hf_multilora_decode_steps_total").values())

        before = decode_steps()
        threads, replies = start_clients(single, 12, max_tokens=96)
        for t in threads:
            t.join()
        steps = decode_steps() - before
        assert [r.status_code for r in replies] == [200] * 12
        # each request's first token comes from its prefill: 95 steps when all 12 decode together
        assert 95 <= steps <= 12 * 96 / 8, f"{steps} decode steps for 12 concurrent requests of 96 tokens"


@pytest.mark.parametrize("name, value, lowest", [("max_running", 0, 1), ("max_waiting", 0, 1), ("max_routing", -1, 1),
                                                 ("max_routing", True, 1), ("affinity_slack", -1, 0),
                                                 ("capture_graphs", 0, 1)])  # fmt: skip
def test_a_model_spec_refuses_limits_out_of_range(name, value, lowest):
    with pytest.raises(ValueError, match=f"ModelSpec.{name} must be an int >= {lowest}"):
        ModelSpec(base=str(DEMO.base), **{name: value})


@pytest.mark.parametrize("name, value", [("replicas", 0), ("routers", 0), ("routers", True)])
def test_an_application_refuses_counts_below_one(name, value):
    spec = ModelSpec(base=str(DEMO.base), device="cpu")
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got {value!r}"):
        application(spec, **{name: value})


def test_serve_refuses_no_routers_before_starting_ray(capsys):
    from hf_multilora.app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--device", "cpu", "--ray-replicas", "2", "--ray-routers", "0"])
    assert exit_info.value.code == 2
    assert "--ray-routers must be >= 1, got 0" in capsys.readouterr().err


def test_overload_beyond_the_replicas_and_the_routing_queue_is_answered_503_with_retry_after(url):
    """A replica holds max_running + max_waiting requests and max_routing more wait in the router;
    past that a client hears 503 with Retry-After at once (not a request stuck in Ray's proxy), the
    router still answers /health, and the deployment serves normally once the load is gone. A first
    request, streamed, is on the replica (its response has begun) before a burst of 7 comes: the
    burst then finds the waiting slot free, and one of it is served. The routing slot is not counted
    on: in a burst, Ray's handle counts a request still being assigned to the replica as queued, so
    the burst can find the router's queue full (CI, 2 cores: 2 of 8 served once, 3 usually; sent as
    one burst of 8, once only 1, the rest counted as queued behind the first's assignment)."""
    with deployed(url, "tight", max_running=1, max_waiting=1, max_routing=1) as tight:
        first = {**UPPER, "max_tokens": 48, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{tight}/v1/completions", json=first, timeout=120) as running:
            assert running.status_code == 200  # submitted to the replica's engine
            threads, replies = start_clients(tight, 7, max_tokens=48)
            assert httpx.get(f"{tight}/health", timeout=30).status_code == 200
            events = [line.removeprefix("data: ") for line in running.iter_lines() if line.startswith("data: ")]
        for t in threads:
            t.join()
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 48
        refused = [r for r in replies if r.status_code == 503]
        served = [r for r in replies if r.status_code == 200]
        assert len(refused) + len(served) == 7, [r.status_code for r in replies]
        assert refused and 1 + len(served) >= 2, [r.status_code for r in replies]  # 1 running, 1 waiting
        assert all(r.headers.get("retry-after") for r in refused)
        assert all(r.json()["error"]["type"] == "overloaded_error" for r in refused)
        assert all(r.json()["usage"]["completion_tokens"] == 48 for r in served)
        httpx.post(f"{tight}/v1/completions", json={**UPPER, "max_tokens": 48}, timeout=120).raise_for_status()


def affinity_router(slack):
    """An AdapterAffinityRouter outside Ray Serve, with replicas "a" (holds "upper") and "b"."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from ray.serve.request_router import ReplicaID

    from hf_multilora.serving.ray_router import AdapterAffinityRouter

    deployment = DeploymentID(name="Replica", app_name="unit")
    router = AdapterAffinityRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN,
                                   use_replica_queue_len_cache=True)  # fmt: skip
    router.initialize_state(slack=slack)
    replicas = [types.SimpleNamespace(replica_id=ReplicaID(name, deployment), multiplexed_model_ids=held,
                                      max_ongoing_requests=32) for name, held in (("a", {"upper"}), ("b", set()))]  # fmt: skip
    return router, replicas


def choose(router, replicas, request_id, adapter="upper"):
    """(the replica's name, the pending request) for one routing decision."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    async def decide():
        metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id, multiplexed_model_id=adapter)
        pending = PendingRequest(args=[], kwargs={}, metadata=metadata)
        ranks = await router.choose_replicas(replicas, pending)
        assert len(ranks) == 1 and len(ranks[0]) == 1  # one rank of one replica: the count is exact
        return ranks[0][0].replica_id.unique_id, pending

    return asyncio.run(decide())


def test_the_router_counts_the_requests_it_assigned_before_any_replica_reports():
    """Ray's routing task makes many decisions from one snapshot of its queue-length cache before
    any request is sent: routed by that cache alone, all 24 of a burst went to the holder "a"."""
    router, replicas = affinity_router(slack=2)
    picks = [choose(router, replicas, str(i))[0] for i in range(24)]
    assert picks[:4] == ["a", "a", "a", "b"]  # the holder until it is 3 > 0 + slack ahead
    assert collections.Counter(picks) == {"a": 13, "b": 11}


def test_the_router_forgets_requests_done_or_abandoned_and_heeds_larger_reports():
    router, replicas = affinity_router(slack=0)
    a, b = (r.replica_id for r in replicas)
    assert choose(router, replicas, "1")[0] == "a"
    router.on_request_completed(b, "1")  # refused by another replica: not this assignment
    assert choose(router, replicas, "2")[0] == "b"
    assert choose(router, replicas, "3")[0] == "a"  # a and b carry one each; a holds the adapter
    router.on_request_completed(a, "1")
    router.on_request_completed(a, "3")
    assert router.load(replicas) == {a: 0, b: 1}
    _, abandoned = choose(router, replicas, "4")
    abandoned.future.cancel()  # the client left before the request was sent: never reported done
    assert router.load(replicas) == {a: 0, b: 1}
    router.on_new_queue_len_info(a, 5)  # a replica's own count includes other routers' requests
    assert router.load(replicas) == {a: 5, b: 1}
    assert choose(router, replicas, "5", adapter="")[0] == "b"


def test_the_router_passes_over_a_full_holder_however_large_the_slack():
    """Ray offered only the chosen replica: a full holder would hold the request in backoff while
    the other replica has room."""
    router, replicas = affinity_router(slack=100)
    a, b = (r.replica_id for r in replicas)
    router.on_new_queue_len_info(a, 32)  # max_ongoing_requests
    router.on_new_queue_len_info(b, 31)
    assert choose(router, replicas, "1")[0] == "b"
    router.on_new_queue_len_info(b, 32)  # it took that request
    assert choose(router, replicas, "2")[0] == "a"  # none has room: the holder, for Ray to probe


def test_a_burst_for_one_adapter_is_spread_over_both_replicas(url):
    """Ray's multiplexed routing alone sends an adapter's requests to the replica holding it until
    that one is full (here 5 x max_running = 80 requests): the whole burst of 24 would queue there
    while the other replica idles. Our router sends them to the other once the holder's queue is
    longer by more than affinity_slack. (Counting only what replicas reported, CI once split it
    3 / 21; counting its own assignments too, 11 / 13 or 12 / 12 in 12 bursts on 2 cores.)"""
    with deployed(url, "spread", replicas=2, max_running=16, affinity_slack=2) as spread:
        threads, replies = start_clients(spread, 24, max_tokens=32)
        for t in threads:
            t.join()
        assert [r.status_code for r in replies] == [200] * 24
        counts = sorted(collections.Counter(r.json()["system_fingerprint"] for r in replies).values())
        assert len(counts) == 2 and counts[0] >= 6, counts
