"""The OpenAI-compatible server on a loopback port, driven by the official `openai` client, serving
the demo assets (whose adapters each learned a visible task) on the CPU."""

import json
import shutil
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from helpers import free_port  # noqa: E402
from hf_multilora.app.cli import _parser, _served_model  # noqa: E402
from hf_multilora.app.demo import read_demo  # noqa: E402

from hf_multilora.serving import Engine, SamplingParams  # noqa: E402
from hf_multilora.serving.server import OpenAIService, build_app  # noqa: E402

DEMO = read_demo()
API_KEY = "test-key"


class Server:
    """uvicorn in a thread, serving build_app(engine)."""

    def __init__(self, engine, api_key=None, **service_kwargs):
        self.engine, self.port = engine, free_port()
        app = build_app(OpenAIService(engine, **service_kwargs), api_key=api_key)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=API_KEY, **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A folder clients may load adapters from: copies of two demo adapters."""
    root = tmp_path_factory.mktemp("loadable")
    for name in ("upper", "reverse"):
        shutil.copytree(DEMO.adapters[name], root / name)
    return root


@pytest.fixture(scope="module")
def served(adapter_dir):
    args = _parser().parse_args(["serve", "--device", "cpu"])
    served = _served_model(args)
    engine = Engine(served.model, served.tokenizer)
    server = Server(engine, model_name=served.name, adapter_dir=adapter_dir, api_key=API_KEY,
                    chat_template=served.chat_template)  # fmt: skip
    yield server, served
    server.stop()
    engine.close()


def examples(count=2):
    for name, spec in json.loads((DEMO.root / "demo.json").read_text())["adapters"].items():
        for example in spec["examples"][:count]:
            yield name, example["text"], example["expected"]


def test_models_lists_the_base_and_every_adapter(served):
    server, model = served
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["demo-base", *model.model.adapter_names]


def test_each_demo_adapter_does_its_task_through_completions_and_chat(served):
    server, _ = served
    client = server.client()
    for name, text, expected in examples():
        prompt = DEMO.prompt_format.replace("{text}", text)
        done = client.completions.create(model=name, prompt=prompt, max_tokens=32, temperature=0)
        assert done.choices[0].text == expected, (name, text)
        assert done.choices[0].finish_reason == "stop"
        assert done.usage.completion_tokens >= len(expected) and done.usage.prompt_tokens > len(text)
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                              max_tokens=32, temperature=0)  # fmt: skip
        assert chat.choices[0].message.content == expected and chat.choices[0].message.role == "assistant"


def test_logit_bias_and_penalties_reach_the_engine(served):
    server, model = served
    client = server.client()
    name, text, expected = next(examples(1))
    prompt = DEMO.prompt_format.replace("{text}", text)
    first = model.tokenizer(expected[0], add_special_tokens=False)["input_ids"][0]
    done = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, presence_penalty=0.5,
                                     frequency_penalty=0.5, logit_bias={str(first): -100})  # fmt: skip
    assert not done.choices[0].text.startswith(expected[0])  # the JSON's string key named the token
    with pytest.raises(openai.BadRequestError, match="logit_bias keys must be token ids"):
        client.completions.create(model=name, prompt=prompt, max_tokens=2, logit_bias={"x": 1})
    with pytest.raises(openai.BadRequestError, match="presence_penalty=5"):
        client.completions.create(model=name, prompt=prompt, max_tokens=2, presence_penalty=5)


def test_logprobs_come_in_openai_shape_streamed_or_not(served):
    """Completions' parallel lists and chat's content entries carry the engine's logprobs of each
    output token (greedy: the chosen token is the most likely), the same whether streamed or not."""
    server, model = served
    client = server.client()
    name, text, _ = next(examples(1))
    prompt = DEMO.prompt_format.replace("{text}", text)
    truth = server.engine.submit(prompt, name, SamplingParams(max_tokens=8, temperature=0, logprobs=2))
    truth.result(timeout=60)
    names = [model.tokenizer.decode([t]) for t in truth.token_ids]
    done = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    got = done.choices[0].logprobs
    assert got.tokens == names and "".join(names) == done.choices[0].text
    assert got.token_logprobs == pytest.approx([e.logprob for e in truth.logprobs], abs=1e-5)
    assert got.text_offset == [sum(len(n) for n in names[:i]) for i in range(len(names))]
    for top, token, lp in zip(got.top_logprobs, names, got.token_logprobs, strict=True):
        assert token in top and len(top) <= 3 and max(top.values()) == pytest.approx(lp) and lp <= 0
    pieces = [c.choices[0].logprobs for c in client.completions.create(model=name, prompt=prompt, max_tokens=8,
                                                                       temperature=0, logprobs=2, stream=True)]  # fmt: skip
    assert [t for p in pieces if p for t in p.tokens] == got.tokens
    assert [o for p in pieces if p for o in p.text_offset] == got.text_offset
    chat = dict(model=name, messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0, logprobs=True,
                top_logprobs=2)  # fmt: skip
    content = client.chat.completions.create(**chat).choices[0].logprobs.content
    assert len(content) == len(truth.token_ids) and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.bytes == list(e.token.encode()) and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)
    streamed = [e for c in client.chat.completions.create(**chat, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.completions.create(model=name, prompt=prompt, max_tokens=2)
    assert plain.choices[0].logprobs is None and plain.system_fingerprint is None  # one server: no replica to name
    with pytest.raises(openai.BadRequestError, match=r"logprobs must be an int in \[0, 20\], got 21"):
        client.completions.create(model=name, prompt=prompt, max_tokens=2, logprobs=21)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        client.chat.completions.create(model=name, messages=chat["messages"], max_tokens=2, top_logprobs=2)


def test_n_choices_come_in_one_response_streamed_or_not(served):
    server, _ = served
    client = server.client()
    name, text, expected = next(examples(1))
    prompt = DEMO.prompt_format.replace("{text}", text)
    one = client.completions.create(model=name, prompt=prompt, max_tokens=32, temperature=0)
    three = client.completions.create(model=name, prompt=prompt, max_tokens=32, temperature=0, n=3)
    assert [(c.index, c.text) for c in three.choices] == [(i, expected) for i in range(3)]
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, counted once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    # seeded: choice i draws from seed + i, so the choices differ and a repeat gives the same ones
    sampled = dict(model=name, prompt=prompt, max_tokens=12, temperature=1.5, seed=11)
    first, again = (client.completions.create(**sampled, n=4) for _ in range(2))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    assert first.choices[0].text == client.completions.create(**sampled).choices[0].text
    chat = dict(model=name, messages=[{"role": "user", "content": text}], max_tokens=32, temperature=0, n=2)
    pieces = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**chat, stream=True):
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert pieces == {0: expected, 1: expected}
    assert [c.message.content for c in client.chat.completions.create(**chat).choices] == [expected, expected]


def test_streaming_gives_the_same_text_in_pieces(served):
    server, _ = served
    client = server.client()
    name, text, expected = next(examples(1))
    prompt = DEMO.prompt_format.replace("{text}", text)
    chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=32, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == expected and len(pieces) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens >= len(expected)
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                            max_tokens=32, temperature=0, stream=True)  # fmt: skip
    deltas = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(deltas) == expected


def test_concurrent_clients_with_mixed_adapters_get_what_generate_gives_each(served):
    server, model = served
    names = [None, *model.model.adapter_names]
    jobs = [(names[i % len(names)], f"{i} kid {i * 7 % 10}") for i in range(16)]
    expected = []
    for name, text in jobs:
        ids = model.tokenizer(DEMO.prompt_format.replace("{text}", text), return_tensors="pt")["input_ids"]
        out = model.model.generate(ids, adapter_ids=[name], max_new_tokens=12, do_sample=False)
        expected.append(model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    results = [None] * len(jobs)
    steps_before = server.engine.batch_sizes.copy()

    def call(i):
        name, text = jobs[i]
        reply = server.client().completions.create(
            model=name or "demo-base", prompt=DEMO.prompt_format.replace("{text}", text), max_tokens=12, temperature=0
        )
        results[i] = reply.choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
    shared = server.engine.batch_sizes - steps_before
    assert max(shared) > 1  # requests were decoded together


def test_errors_come_in_openai_shape(served):
    server, _ = served
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="upper", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="best_of=2 is not supported"):
        client.completions.create(model="upper", prompt="x", max_tokens=2, best_of=2)
    with pytest.raises(openai.BadRequestError, match=r"n must be an int in \[1, 128\], got 0"):
        client.completions.create(model="upper", prompt="x", max_tokens=2, n=0)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="upper", prompt="", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    reply = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "hf_multilora_requests_running" in metrics and 'hf_multilora_pool_pages{kind="kv"}' in metrics


def test_adapters_load_from_the_adapter_dir_only_and_unload(served, adapter_dir, tmp_path):
    server, _ = served
    client = server.client()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "upper2", "lora_path": "upper"},
                       headers=headers)  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert "upper2" in [m.id for m in client.models.list().data]
    _, text, expected = next(e for e in examples() if e[0] == "upper")
    done = client.completions.create(model="upper2", prompt=DEMO.prompt_format.replace("{text}", text),
                                     max_tokens=32, temperature=0)  # fmt: skip
    assert done.choices[0].text == expected
    outside = tmp_path / "elsewhere"
    shutil.copytree(adapter_dir / "reverse", outside)
    reply = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(outside)},
                       headers=headers)  # fmt: skip
    assert reply.status_code == 400 and "x" not in [m.id for m in client.models.list().data]
    reply = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "upper2"}, headers=headers)
    assert reply.status_code == 200 and "upper2" not in [m.id for m in client.models.list().data]
    reply = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "upper2"}, headers=headers)
    assert reply.status_code == 404


def test_a_client_that_goes_away_frees_its_pages(served):
    server, _ = served
    engine = server.engine
    cancelled = engine.stats["finished_cancelled"]
    stream = server.client().completions.create(model="reverse", prompt="x", max_tokens=400, temperature=0.8,
                                                extra_body={"ignore_eos": True}, stream=True)  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while engine.stats["finished_cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats["finished_cancelled"] == cancelled + 1
    assert engine.metrics()["pages_kv"] == 0


def test_a_full_queue_answers_503_with_retry_after():
    args = _parser().parse_args(["serve", "--device", "cpu"])
    served = _served_model(args)
    engine = Engine(served.model, served.tokenizer, max_running=1, max_waiting=1)
    server = Server(engine, model_name=served.name)
    try:
        from hf_multilora.serving import SamplingParams

        params = SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0)
        running = engine.submit([5, 6, 7], None, params)
        next(iter(running))
        waiting = engine.submit([5, 6, 7], None, params)
        reply = httpx.post(f"{server.url}/v1/completions", json={"model": "demo-base", "prompt": "x", "max_tokens": 2})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["type"] == "overloaded_error"
        running.cancel(), waiting.cancel()
    finally:
        server.stop()
        engine.close()


def test_serve_refuses_an_empty_queue_by_its_flag(capsys):
    from hf_multilora.app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--device", "cpu", "--max-waiting", "0"])
    assert exit_info.value.code == 2
    assert "max_waiting must be an int >= 1" in capsys.readouterr().err


def test_several_engines_metrics_share_one_type_line_per_family():
    from hf_multilora.serving.server import labelled_prometheus_text, prometheus_text

    def metrics(waiting, kv):
        return {"waiting": waiting, "running": 1, "tokens_per_s": 2.5, "pages_total": 10, "pages_free": 4,
                "pages_kv": kv, "pages_adapter": 2, "submitted": 7, "finished_stop": 3}  # fmt: skip

    text = labelled_prometheus_text([({"replica": "a"}, metrics(5, 3)), ({"replica": "b"}, metrics(0, 4))])
    lines = text.splitlines()
    types = [line for line in lines if line.startswith("# TYPE")]
    assert len(types) == len(set(types)) == 6
    running = lines.index("# TYPE hf_multilora_requests_waiting gauge")
    assert lines[running + 1 : running + 3] == ['hf_multilora_requests_waiting{replica="a"} 5.0',
                                                'hf_multilora_requests_waiting{replica="b"} 0.0']  # fmt: skip
    assert 'hf_multilora_pool_pages{replica="b",kind="kv"} 4.0' in lines
    assert 'hf_multilora_requests_finished_total{replica="a",reason="stop"} 3.0' in lines
    assert "hf_multilora_requests_waiting 5.0" in prometheus_text(metrics(5, 3)).splitlines()  # one engine: no labels
    assert labelled_prometheus_text([]) == ""
