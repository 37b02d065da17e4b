"""The playground app served on a free loopback port and driven through its API with gradio_client:
the same outputs as a direct generate() with the same seed, streaming, errors shown without
breaking the app, and two users at once."""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import GREEDY, SAMPLED, direct_texts, free_port, make_playground
from hf_multilora.app import ui
from hf_multilora.app.service import BASE_CHOICE, Settings

PAGE_BYTES = 2 * 16 * 64 * 4  # one layer's K+V for 16 tokens of the tiny Llama, fp32
CHOICES = ["qv_r4", BASE_CHOICE, "attn_r8"]


@pytest.fixture(scope="module")
def served(served_dir, tmp_path_factory):
    """(playground, url): the app on 127.0.0.1, with an adapter folder holding one good adapter
    and one broken one, and a pool of 32 pages: enough for these tests' requests, too small for
    3 rows of 200 tokens."""
    adapter_dir = tmp_path_factory.mktemp("uploads")
    shutil.copytree(served_dir / "adapters" / "mlp_r16", adapter_dir / "good")
    (adapter_dir / "broken").mkdir()
    (adapter_dir / "broken" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    playground = make_playground(served_dir, adapter_dir=adapter_dir, pool_bytes=32 * PAGE_BYTES)
    blocks = ui.build(playground)
    url = ui.launch(blocks, "127.0.0.1", free_port(), block=False)
    yield playground, url
    blocks.close()


def generate(client: Client, text: str, choices: list[str], settings: Settings) -> tuple:
    s = settings
    return client.predict(
        text, choices, s.max_new_tokens, s.temperature, s.top_p, s.seed, api_name="/generate"
    )


def texts(result: tuple, rows: int) -> list[str]:
    assert all(box == "" for box in result[rows : ui.MAX_ROWS])  # unused boxes stay empty
    return list(result[:rows])


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_outputs_equal_direct_generate(served, settings):
    playground, url = served
    result = generate(Client(url, verbose=False), "hello", CHOICES, settings)
    assert texts(result, 3) == direct_texts(playground, "hello", CHOICES, settings)
    table, latency = result[ui.MAX_ROWS], result[ui.MAX_ROWS + 1]
    assert table["headers"] == ui.STATS_HEADERS
    assert [row[0] for row in table["data"]] == CHOICES
    assert all(row[1] == settings.max_new_tokens and row[3] > 0 for row in table["data"])
    assert latency.startswith("**Done**") and "total latency" in latency


def test_streams_token_by_token(served):
    _, url = served
    job = Client(url, verbose=False).submit(
        "stream me", ["attn_r8", BASE_CHOICE], 16, 0, 1, 0, api_name="/generate"
    )
    updates = [texts(update, 2) for update in job]
    final = texts(job.result(), 2)
    assert len(updates) > 2 and updates[-1] == final
    for before, after in itertools.pairwise(updates):
        assert all(b.startswith(a) for a, b in zip(before, after, strict=True))


def test_errors_are_shown_and_the_app_keeps_working(served):
    playground, url = served
    client = Client(url, verbose=False)
    errors = {
        "outside the adapter directory": ("../", "x"),
        "not a folder": ("nothing-here", "x"),
        "no adapter_model": ("broken", "x"),  # a config, but no weights
        "already loaded": ("good", "attn_r8"),  # a good adapter, under a name in use
    }
    for message, args in errors.items():
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/load_adapter")
    with pytest.raises(AppError, match="nope"):
        generate(client, "hi", ["nope"], GREEDY)
    with pytest.raises(AppError, match="page pool exhausted"):
        generate(client, "hi", CHOICES, Settings(max_new_tokens=200))
    assert "x" not in playground.choices
    assert texts(generate(client, "hi", CHOICES, GREEDY), 3) == direct_texts(
        playground, "hi", CHOICES, GREEDY
    )


def test_load_an_adapter_then_use_it(served):
    playground, url = served
    assert Client(url, verbose=False).predict("good", "", api_name="/load_adapter") == "good"
    assert playground.choices[-1] == "good"  # registered under its folder's name
    client = Client(url, verbose=False)  # another user: the new adapter is a row for everyone
    rows = ["good", "attn_r8"]
    good, attn = texts(generate(client, "hi", rows, SAMPLED), 2)
    assert [good, attn] == direct_texts(playground, "hi", rows, SAMPLED)
    assert good != attn  # two adapters, two outputs: the diff below has something to show
    diff = client.predict("good", "attn_r8", api_name="/diff")  # the session's last outputs
    changed = {segment["class_or_confidence"] for segment in diff} - {None}
    assert changed and changed <= {"-", "+"}
    # The segments spell both texts: "from" without the added ones, "to" without the removed ones.
    assert "".join(s["token"] for s in diff if s["class_or_confidence"] != "+") == good
    assert "".join(s["token"] for s in diff if s["class_or_confidence"] != "-") == attn
    table, pages, swaps = client.predict(api_name="/memory")
    now = dict(table["data"])
    stats = playground.model.memory_stats()
    assert now["pool pages"] == f"{stats['pages_total']} pages of {stats['page_bytes']} bytes each"
    assert {"good", "attn_r8"} <= set(now["resident adapters (LRU first)"].split(", "))
    assert {row[2] for row in pages["data"]} == {"KV (peak of the request)", "adapters"}
    assert {row[2] for row in swaps["data"]} == {"copies into the pool", "evictions"}
    assert max(row[0] for row in pages["data"]) == 0  # steps counted back from the latest


def test_two_users_at_once(served):
    playground, url = served
    requests = [("one", CHOICES, GREEDY), ("two", ["attn_r8", BASE_CHOICE], SAMPLED)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: generate(Client(url, verbose=False), *r), requests))
    for (text, choices, settings), result in zip(requests, results, strict=True):
        assert texts(result, len(choices)) == direct_texts(playground, text, choices, settings)


def test_the_console_command_serves_the_demo(demo_dir, served_dir, tmp_path):
    """`hf-multilora playground --assets DIR` (the console script's main) serves on 127.0.0.1,
    with the demo's prompt format applied."""
    port = free_port()
    command = [sys.executable, "-c", "from hf_multilora.app.cli import main; main()"]
    args = ["playground", "--assets", str(demo_dir), "--port", str(port)]
    log = tmp_path / "log"
    with log.open("w") as out:
        server = subprocess.Popen(command + args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the playground is not serving:\n{log.read_text()}")
            time.sleep(0.2)
        result = generate(Client(url, verbose=False), "abc", ["qv_r4"], GREEDY)
    finally:
        server.terminate()
        server.wait(timeout=30)
    reference = make_playground(served_dir, prompt_format="in: {text} out:")
    assert texts(result, 1) == direct_texts(reference, "abc", ["qv_r4"], GREEDY)
    assert " in 1 row of one batched generate()" in result[ui.MAX_ROWS + 1]
    # The console names the URL, and suggests no share link: sharing is off.
    console = log.read_text()
    assert f"playground on {url}" in console and "no public share link" in console
    assert "share=True" not in console, console


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
