"""The playground without its UI (hf_multilora.app.service): streaming from one batched generate()
gives what a direct generate() gives, adapters are read only from the allowed folder, and bad
requests fail cleanly and leave it working."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time

import pytest
import torch
from helpers import GREEDY, SAMPLED, direct_texts, make_playground
from hf_multilora.app import cli
from hf_multilora.app.demo import read_demo
from hf_multilora.app.diff import word_diff
from hf_multilora.app.service import BASE_CHOICE, Playground, PlaygroundError, Settings
from hf_multilora.app.streaming import BatchStreamer

from hf_multilora import AdapterLoadError, PoolExhaustedError


def run(playground: Playground, text: str, choices: list[str], settings: Settings = GREEDY) -> list:
    return list(playground.generate_stream(text, choices, settings))


@pytest.fixture(scope="module")
def playground(served_dir) -> Playground:
    return make_playground(served_dir, prompt_format="Q: {text}\nA:")


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_stream_ends_with_what_direct_generate_gives(playground, settings):
    choices = ["qv_r4", BASE_CHOICE, "attn_r8"]
    updates = run(playground, "hello there", choices, settings)
    final = updates[-1]
    assert final.done and not any(u.done for u in updates[:-1])
    assert [row.choice for row in final.rows] == choices
    assert [row.text for row in final.rows] == direct_texts(playground, "hello there", choices, settings)
    assert len({row.text for row in final.rows}) == 3  # three different rows, really
    # Streamed: every update extends the previous one, row by row.
    assert len(updates) > 1
    for before, after in itertools.pairwise(updates):
        for a, b in zip(before.rows, after.rows, strict=True):
            assert b.text.startswith(a.text) and b.tokens >= a.tokens
    for row in final.rows:
        assert row.finished and row.tokens == settings.max_new_tokens and not row.eos
        assert 0 < row.seconds <= final.seconds and row.tokens_per_s > 0


def test_prompt_format_wraps_the_text(playground):
    assert playground.prompt("hi") == "Q: hi\nA:"


def test_streamer_tracks_each_rows_eos():
    eos, pad = 2, 0
    steps = []
    streamer = BatchStreamer(3, {eos}, on_step=lambda: steps.append(1))
    streamer.put(torch.tensor([[5, 6], [5, 6], [5, 6]]))  # the prompt: skipped
    streamer.put(torch.tensor([7, eos, 8]))
    streamer.put(torch.tensor([9, pad, eos]))
    streamer.put(torch.tensor([10, pad, pad]))
    streamer.end()
    streamer.end()  # the caller's safety call is a no-op
    snapshots = list(streamer)
    last = snapshots[-1]
    assert last.done and last.tokens == [[7, 9, 10], [], [8]] and last.eos == [False, True, True]
    assert last.finished_at[1] <= last.finished_at[2] <= last.finished_at[0]
    assert len(steps) == 3


def test_streamer_raises_the_generating_threads_error():
    streamer = BatchStreamer(1, set())
    streamer.put(torch.tensor([[1]]))
    streamer.fail(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        list(streamer)


def test_closing_the_stream_stops_generation(served_dir):
    playground = make_playground(served_dir)
    stream = playground.generate_stream("hi", ["attn_r8"], Settings(max_new_tokens=10_000))
    first = next(stream)
    assert not first.done
    stream.close()  # what happens when the browser goes away
    assert not [t for t in threading.enumerate() if t.name == "playground-generate"]
    assert run(playground, "hi", ["attn_r8"], Settings(max_new_tokens=3))[-1].done


@pytest.mark.parametrize(
    ("text", "choices", "message"),
    [
        ("hi", [], "select at least one"),
        ("hi", ["attn_r8", "nope"], "unknown adapter"),
        ("  ", ["attn_r8"], "type a prompt"),
    ],
)
def test_bad_requests_are_refused(playground, text, choices, message):
    with pytest.raises(PlaygroundError, match=message):
        run(playground, text, choices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max new tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top-p"),
        (dict(top_p=1.5), "top-p"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(PlaygroundError, match=message):
        Settings(**kwargs)


def test_loads_adapters_only_from_the_allowed_folder(served_dir, tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "group").mkdir(parents=True)
    os.symlink(
        served_dir / "adapters" / "mlp_r16", allowed / "group" / "inside_link"
    )  # a real adapter, outside
    os.symlink(served_dir / "adapters", allowed / "escape")
    (allowed / "empty").mkdir()
    playground = make_playground(served_dir, adapters=(), adapter_dir=allowed)
    outside = str(served_dir / "adapters" / "mlp_r16")
    for folder in ["..", "../allowed/../..", outside, "escape/mlp_r16", "group/inside_link", "/"]:
        with pytest.raises(PlaygroundError, match="outside the adapter directory"):
            playground.load_adapter_from(folder, "x")
    with pytest.raises(PlaygroundError, match="not a folder"):
        playground.load_adapter_from("missing", "x")
    with pytest.raises(PlaygroundError, match="give a folder"):
        playground.load_adapter_from(" ", "x")
    with pytest.raises(AdapterLoadError):  # a folder, but no adapter in it
        playground.load_adapter_from("empty", "x")
    assert playground.adapter_folders() == []  # the links lead outside: not offered
    assert playground.choices == [BASE_CHOICE]

    # A copy inside is fine; the name defaults to the folder's.
    shutil.copytree(served_dir / "adapters" / "mlp_r16", allowed / "group" / "mlp")
    assert playground.adapter_folders() == ["group/mlp"]
    assert playground.load_adapter_from("group/mlp") == "mlp"
    assert playground.choices == [BASE_CHOICE, "mlp"]


def test_a_sibling_folder_named_like_the_allowed_one_is_outside(served_dir, tmp_path):
    allowed, evil = tmp_path / "allowed", tmp_path / "allowed_evil"
    allowed.mkdir()
    shutil.copytree(served_dir / "adapters" / "qv_r4", evil / "x")  # its path starts with allowed's
    playground = make_playground(served_dir, adapters=(), adapter_dir=allowed)
    for folder in ["../allowed_evil/x", str(evil / "x")]:
        with pytest.raises(PlaygroundError, match="outside the adapter directory"):
            playground.load_adapter_from(folder, "x")
    assert playground.choices == [BASE_CHOICE]


@pytest.mark.parametrize("linked", [["adapter_config.json"], ["adapter_model.safetensors"], None])
def test_files_linked_outside_the_allowed_folder_are_refused(served_dir, tmp_path, linked):
    """A real folder inside adapter_dir whose files are links to elsewhere (None: all of them)."""
    outside = served_dir / "adapters" / "mlp_r16"
    folder = tmp_path / "allowed" / "linked"
    shutil.copytree(outside, folder)
    for file in linked or [f.name for f in folder.iterdir()]:
        (folder / file).unlink()
        (folder / file).symlink_to(outside / file)
    playground = make_playground(served_dir, adapters=(), adapter_dir=tmp_path / "allowed")
    with pytest.raises(AdapterLoadError, match=r"linked/adapter_.*' resolves to .*, outside the allowed"):
        playground.load_adapter_from("linked")
    assert playground.choices == [BASE_CHOICE]


def test_weights_swapped_for_a_link_after_loading_are_refused(served_dir, tmp_path):
    """The weights are read at the first request using the adapter, which checks them again."""
    allowed = tmp_path / "allowed"
    shutil.copytree(served_dir / "adapters" / "qv_r4", allowed / "qv")
    playground = make_playground(served_dir, adapters=(), adapter_dir=allowed)
    assert playground.load_adapter_from("qv") == "qv"
    weights = allowed / "qv" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(served_dir / "adapters" / "qv_r4" / "adapter_model.safetensors")  # the same bytes
    with pytest.raises(
        AdapterLoadError, match=r"adapter 'qv': .*adapter_model\.safetensors' resolves to .*outside"
    ):
        run(playground, "hi", ["qv", BASE_CHOICE])
    assert run(playground, "hi", [BASE_CHOICE], Settings(max_new_tokens=2))[-1].done


def test_adapter_loading_errors_leave_the_playground_working(served_dir):
    playground = make_playground(served_dir, adapters=("attn_r8",))
    with pytest.raises(ValueError, match="already loaded"):
        playground.load_adapter_from("qv_r4", "attn_r8")
    with pytest.raises(PlaygroundError, match="names the base model"):
        playground.load_adapter_from("qv_r4", BASE_CHOICE)
    assert playground.choices == [BASE_CHOICE, "attn_r8"]
    assert playground.load_adapter_from("qv_r4", "new") == "new"
    choices = ["new", "attn_r8"]
    final = run(playground, "abc", choices, SAMPLED)[-1]
    assert [row.text for row in final.rows] == direct_texts(playground, "abc", choices, SAMPLED)
    assert [s["event"] for s in playground.memory()] == ["start", "load new", "generate"]


def test_loading_from_folders_is_off_without_an_adapter_dir(served_dir):
    playground = make_playground(served_dir, adapters=(), adapter_dir=None)
    assert playground.adapter_folders() == []
    with pytest.raises(PlaygroundError, match="--adapter-dir"):
        playground.load_adapter_from("qv_r4")


def test_an_exhausted_pool_fails_the_request_not_the_playground(served_dir):
    # 16 pages: a page holds one layer's KV for 16 tokens; 3 rows x 2 layers x 2 blocks do not fit.
    page_bytes = 2 * 16 * 64 * 4
    playground = make_playground(served_dir, pool_bytes=16 * page_bytes)
    with pytest.raises(PoolExhaustedError):
        run(playground, "a longer prompt", ["attn_r8", "qv_r4", BASE_CHOICE], Settings(max_new_tokens=20))
    assert playground.memory()[-1]["pages_kv"] == 0  # the failed request gave its pages back
    final = run(playground, "hi", ["attn_r8"], Settings(max_new_tokens=4))[-1]
    assert final.rows[0].text == direct_texts(playground, "hi", ["attn_r8"], Settings(max_new_tokens=4))[0]


def test_memory_history(served_dir):
    playground = make_playground(served_dir)
    start = playground.memory()
    assert len(start) == 1 and "pages_total" not in start[0]  # no pool before the first request
    run(playground, "hi", ["attn_r8", BASE_CHOICE], Settings(max_new_tokens=20))
    run(playground, "hi", ["qv_r4"], Settings(max_new_tokens=2))
    first, second = playground.memory()[1:]
    assert (first["step"], second["step"]) == (1, 2)
    assert first["pages_kv_peak"] > second["pages_kv_peak"] > 0  # longer and wider request, more KV
    assert first["pages_kv"] == second["pages_kv"] == 0  # given back when a request ends
    assert second["adapters_resident"] == ["attn_r8", "qv_r4"] and second["misses"] == 2


def test_with_an_engine_concurrent_users_share_decode_steps(served_dir):
    """Rows are requests of a continuous-batching engine: a user who asks while another's rows
    decode joins their steps, each greedy row is what a batched generate() gives, and a stream
    closed early frees its requests' pages."""
    from hf_multilora.serving import Engine

    plain = make_playground(served_dir, prompt_format="Q: {text}\nA:")
    engine = Engine(plain.model, plain.tokenizer, min_prefill_rows=1)
    playground = Playground(plain.model, plain.tokenizer, prompt_format="Q: {text}\nA:", engine=engine)
    try:
        first = playground.generate_stream("hello there", ["qv_r4", BASE_CHOICE], Settings(max_new_tokens=40))
        assert not next(first).done  # the first user's rows are decoding
        second = run(playground, "good morning", ["attn_r8"], GREEDY)[-1]
        rest = list(first)
        assert rest[-1].done and max(engine.batch_sizes) == 3  # a step ran both users' rows
        for final, text, choices, settings in [(rest[-1], "hello there", ["qv_r4", BASE_CHOICE], Settings(max_new_tokens=40)),
                                               (second, "good morning", ["attn_r8"], GREEDY)]:  # fmt: skip
            assert [row.text for row in final.rows] == direct_texts(plain, text, choices, settings)
            assert all(row.finished for row in final.rows)
        stream = playground.generate_stream("hi", ["attn_r8", "qv_r4"], Settings(max_new_tokens=10_000))
        assert not next(stream).done
        stream.close()  # the browser went away
        deadline = time.monotonic() + 30
        while engine.metrics()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.metrics()["running"] == 0 and plain.model.memory_stats()["pages_kv"] == 0
        assert playground.memory()[-1]["event"] == "generate"
    finally:
        engine.close()


def test_an_engine_of_another_model_is_refused(served_dir, playground):
    from hf_multilora.serving import Engine

    other = make_playground(served_dir)
    engine = Engine(other.model, other.tokenizer)
    try:
        with pytest.raises(PlaygroundError, match="another model"):
            Playground(playground.model, playground.tokenizer, engine=engine)
    finally:
        engine.close()


def test_word_diff():
    assert word_diff("the cat sat", "the dog sat") == [
        ("the ", None),
        ("cat", "-"),
        ("dog", "+"),
        (" sat", None),
    ]
    assert word_diff("same", "same") == [("same", None)]
    assert word_diff("", "new") == [("new", "+")]


def test_demo_assets(demo_dir, served_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="--assets"):
        read_demo(tmp_path)
    (tmp_path / "demo.json").write_text('{"base": "base"}')
    with pytest.raises(ValueError, match="expected layout"):
        read_demo(tmp_path)

    demo = read_demo(demo_dir)
    assert demo.tasks == {"attn_r8": "task attn_r8", "qv_r4": "task qv_r4"}
    assert [(e.choice, e.text, e.expected) for e in demo.examples] == [("qv_r4", "abc", "cba")]

    mlp = served_dir / "adapters" / "mlp_r16"
    playground = cli._playground(
        cli._parser().parse_args(["playground", "--assets", str(demo_dir), "--adapter", f"m={mlp}"])
    )
    assert playground.choices == [BASE_CHOICE, "attn_r8", "qv_r4", "m"]
    assert playground.prompt("x") == "in: x out:"
    assert playground.adapter_dir == (served_dir / "adapters").resolve()  # default: the demo's adapters


@pytest.mark.parametrize(
    "argv",
    [
        ["playground", "--adapter", "no-equals-sign"],
        ["playground", "--assets", "/nonexistent"],
        ["playground", "--base", "x", "--assets", "y"],
    ],
)
def test_cli_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
