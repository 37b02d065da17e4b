"""MultiLoraModel against PEFT: every row of a mixed batch must equal PEFT with only that row's
adapter active (logits and greedy tokens), whatever the mix of adapters, ranks and target sets."""

import pytest
import torch
from conftest import EndRowsAt
from helpers import interpreter_only, prompts
from transformers import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from hf_multilora import MultiLoraModel
from hf_multilora.cache import PAGED_ATTENTION
from hf_multilora.model import KV_BLOCK_SIZE

ZOOS = ["llama_zoo", "qwen2_zoo", "mistral_zoo", "gpt2_zoo"]


def multi(zoo, **kwargs) -> MultiLoraModel:
    return MultiLoraModel.from_pretrained(zoo.fresh_base(), adapters=zoo.paths, **kwargs)


def mixed_rows(zoo) -> list:
    """Base rows, every adapter, and repeats, in an order that is not grouped by adapter."""
    names = list(zoo.paths)
    return [names[0], None, *names[1:], names[0], None, names[-1]]


def reference_logits(zoo, name, input_ids):
    model = zoo.base if name is None else zoo.peft(name)
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("zoo_name", ZOOS)
def test_mixed_batch_logits_match_peft_per_row(zoo_name, request):
    zoo = request.getfixturevalue(zoo_name)
    model = multi(zoo)
    rows = mixed_rows(zoo)
    input_ids = prompts(len(rows), 9)
    logits = model(input_ids, adapter_ids=rows).logits
    base_logits = reference_logits(zoo, None, input_ids)
    for i, name in enumerate(rows):
        expected = reference_logits(zoo, name, input_ids[i : i + 1])[0]
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-5, msg=f"row {i} ({name})")
        if name is not None:  # the adapter really changes this row
            assert (expected - base_logits[i]).abs().max() > 1e-3


@pytest.mark.parametrize("zoo_name", ZOOS)
def test_greedy_generate_matches_peft_per_row(zoo_name, request):
    zoo = request.getfixturevalue(zoo_name)
    model = multi(zoo)
    rows = mixed_rows(zoo)
    input_ids = prompts(len(rows), 6, seed=1)
    out = model.generate(input_ids, adapter_ids=rows, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, name in enumerate(rows):
        ref_model = zoo.base if name is None else zoo.peft(name)
        expected = ref_model.generate(
            input_ids=input_ids[i : i + 1], max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        assert out[i].tolist() == expected[0].tolist(), f"row {i} ({name})"


def test_left_padded_ragged_prompts(llama_zoo):
    model = multi(llama_zoo)
    input_ids = prompts(3, 7, seed=2)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    input_ids[mask == 0] = 0
    rows = ["attn_r8", None, "mlp_r16"]
    out = model.generate(
        input_ids, attention_mask=mask, adapter_ids=rows, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    for i, name in enumerate(rows):
        keep = mask[i].bool()
        ref_model = llama_zoo.base if name is None else llama_zoo.peft(name)
        expected = ref_model.generate(
            input_ids=input_ids[i : i + 1, keep], max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert out[i, -6:].tolist() == expected[0, -6:].tolist(), f"row {i} ({name})"


def test_beam_search_rows_keep_their_adapter(llama_zoo):
    model = multi(llama_zoo)
    rows = ["qv_r4", None, "rslora"]
    input_ids = prompts(3, 5, seed=3)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids, adapter_ids=rows, **kwargs)
    assert out.shape[0] == 6
    for i, name in enumerate(rows):
        ref_model = llama_zoo.base if name is None else llama_zoo.peft(name)
        expected = ref_model.generate(input_ids=input_ids[i : i + 1], **kwargs)
        assert out[2 * i : 2 * i + 2].tolist() == expected.tolist(), f"row {i} ({name})"


def test_seeded_sampling_matches_peft_and_return_sequences_follow_rows(llama_zoo):
    model = multi(llama_zoo)
    input_ids = prompts(2, 5, seed=4)
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0)
    reference = llama_zoo.peft("patterns")  # built before seeding: building it draws random numbers
    torch.manual_seed(123)
    ours = model.generate(input_ids, adapter_ids=["patterns", "patterns"], **kwargs)
    torch.manual_seed(123)
    expected = reference.generate(input_ids=input_ids, **kwargs)
    assert ours.tolist() == expected.tolist()

    # top_k=1 sampling is deterministic: each returned sequence equals its row's greedy output.
    out = model.generate(
        input_ids, adapter_ids=["qv_r4", None], num_return_sequences=3, **{**kwargs, "top_k": 1}
    )
    for i, name in enumerate(["qv_r4", None]):
        ref_model = llama_zoo.base if name is None else llama_zoo.peft(name)
        greedy = ref_model.generate(
            input_ids=input_ids[i : i + 1], max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert out[3 * i : 3 * i + 3].tolist() == greedy.tolist() * 3


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append("end")


def test_streamer_sees_the_generated_tokens(llama_zoo):
    model = multi(llama_zoo)
    input_ids = prompts(1, 4, seed=5)
    streamer = _Collect()
    out = model.generate(
        input_ids,
        adapter_ids=["mlp_r16"],
        max_new_tokens=5,
        do_sample=False,
        streamer=streamer,
        pad_token_id=0,
    )
    assert streamer.chunks[-1] == "end"
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]])
    assert streamed.tolist() == out[0, 4:].tolist()


def test_peft_keyword_int_ids_and_base_calls(llama_zoo):
    model = multi(llama_zoo)
    input_ids = prompts(3, 5, seed=6)
    by_name = model(input_ids, adapter_ids=["attn_r8", None, "rslora"]).logits
    by_peft_kw = model(input_ids, adapter_names=["attn_r8", "__base__", "rslora"]).logits
    names = model.adapter_names
    by_index = model(input_ids, adapter_ids=[names.index("attn_r8"), None, names.index("rslora")]).logits
    torch.testing.assert_close(by_peft_kw, by_name, rtol=0, atol=0)
    torch.testing.assert_close(by_index, by_name, rtol=0, atol=0)
    # No adapter_ids at all: exactly the base model, and the hooks leave no state behind.
    torch.testing.assert_close(
        model(input_ids).logits, reference_logits(llama_zoo, None, input_ids), rtol=0, atol=0
    )


@interpreter_only("on CUDA test_gpu.py covers it")
def test_triton_kernels_in_the_model_match_the_reference_path(llama_zoo, monkeypatch):
    """The full model through the Triton kernels (interpreted on CPU) equals the torch path."""
    model = multi(llama_zoo)
    rows = mixed_rows(llama_zoo)
    input_ids = prompts(len(rows), 5, seed=7)
    reference = model(input_ids, adapter_ids=rows).logits
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    kernels = model(input_ids, adapter_ids=rows).logits
    torch.testing.assert_close(kernels, reference, rtol=1e-4, atol=1e-5)


def test_concurrent_generate_calls_from_threads_are_safe(llama_zoo):
    """Calls on one model are serialised (each holds the routing for its whole generate)."""
    import threading

    model = multi(llama_zoo)
    names = list(llama_zoo.paths)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    jobs = [
        ([names[i % len(names)], None, names[(i + 2) % len(names)]], prompts(3, 5, seed=20 + i))
        for i in range(6)
    ]
    expected = [model.generate(ids, adapter_ids=rows, **kwargs) for rows, ids in jobs]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        rows, ids = jobs[i]
        results[i] = model.generate(ids, adapter_ids=rows, **kwargs)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, out in enumerate(expected):
        assert results[i].tolist() == out.tolist(), f"job {i}"


@pytest.fixture
def kv_pages_at_release(monkeypatch) -> list[int]:
    """The pool's KV pages in use each time a PagedCache is released (before it gives them back)."""
    from hf_multilora.cache import PagedCache

    seen = []
    release = PagedCache.release

    def spy(self):
        seen.append(self.pool.num_kv)
        release(self)

    monkeypatch.setattr(PagedCache, "release", spy)
    return seen


def test_generate_runs_on_a_paged_cache_and_gives_its_pages_back(llama_zoo, kv_pages_at_release):
    model = multi(llama_zoo)
    implementation = model.base_model.config._attn_implementation
    rows = mixed_rows(llama_zoo)
    input_ids = prompts(len(rows), 7, seed=21)
    paged = model.generate(input_ids, adapter_ids=rows, max_new_tokens=6, do_sample=False)
    assert kv_pages_at_release and kv_pages_at_release[0] > 0
    assert model.memory_stats()["pages_kv"] == 0
    assert model.base_model.config._attn_implementation == implementation
    dense = model.generate(input_ids, adapter_ids=rows, max_new_tokens=6, do_sample=False, paged_cache=False)
    assert torch.equal(paged, dense) and not any(kv_pages_at_release[1:])  # later: idempotent re-releases


def test_paged_calls_switch_the_attention_through_transformers_once(llama_zoo, monkeypatch):
    """Only a model's first paged call goes through set_attn_implementation (a walk of every module,
    ms at 7B, and the engine switches at every step); each call after it still attends through the
    paged implementation and gives the model back its own, whatever it was set to meanwhile."""
    model = multi(llama_zoo)
    base = model.base_model
    switches, seen = [], []
    real_switch = type(base).set_attn_implementation
    monkeypatch.setattr(base, "set_attn_implementation", lambda impl, **kw: (switches.append(impl), real_switch(base, impl, **kw))[1])
    attention = type(base.model.layers[0].self_attn).forward
    monkeypatch.setattr(type(base.model.layers[0].self_attn), "forward",
                        lambda self, *a, **kw: (seen.append(self.config._attn_implementation), attention(self, *a, **kw))[1])  # fmt: skip
    input_ids = prompts(2, 5, seed=3)
    for own in ("sdpa", "eager", "sdpa"):
        real_switch(base, own)
        model.generate(input_ids, adapter_ids=mixed_rows(llama_zoo)[:2], max_new_tokens=3, do_sample=False)
        assert base.config._attn_implementation == own
    assert switches == [PAGED_ATTENTION] and set(seen) == {PAGED_ATTENTION}


def test_rows_that_end_on_eos_give_their_pages_back_during_generate(llama_zoo, kv_pages_at_release):
    """generate() adds ReleaseFinishedRows for greedy search: same tokens as transformers' own cache,
    fewer KV pages held at the end; not when every step's logits are asked for."""
    model = multi(llama_zoo)
    rows = mixed_rows(llama_zoo)
    input_ids = prompts(len(rows), 7, seed=22)
    ends = [1 + row % 4 for row in range(len(rows) - 1)] + [25]  # one long row
    kwargs = dict(
        max_new_tokens=30,
        eos_token_id=1,
        pad_token_id=0,
        do_sample=False,
        logits_processor=LogitsProcessorList([EndRowsAt(input_ids.shape[1], ends, eos=1)]),
    )
    released = model.generate(input_ids, adapter_ids=rows, **kwargs)
    dense = model.generate(input_ids, adapter_ids=rows, paged_cache=False, **kwargs)
    kept = model.generate(input_ids, adapter_ids=rows, return_dict_in_generate=True, output_logits=True, **kwargs)
    assert torch.equal(released, dense) and torch.equal(kept.sequences, dense)
    assert released.shape[1] == input_ids.shape[1] + max(ends) + 1
    layers = model.base_model.config.num_hidden_layers
    blocks = -(-(input_ids.shape[1] + max(ends)) // KV_BLOCK_SIZE)  # the last token is never fed back
    assert kv_pages_at_release[0] == layers * blocks + 1  # the long row's blocks + the discard page
    assert kv_pages_at_release[-1] == layers * blocks * len(rows)


def test_a_plain_base_call_from_another_thread_gets_no_adapters(llama_zoo):
    """While a routed generate() runs in one thread, the shared base model called from another
    thread is the plain base model, and the routed call is not disturbed by it."""
    import threading

    from transformers import StoppingCriteria

    model = multi(llama_zoo)
    names = list(llama_zoo.paths)
    rows = [names[0], names[1], names[2]]
    input_ids = prompts(3, 5, seed=30)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected_generate = model.generate(input_ids, adapter_ids=rows, **kwargs)
    with torch.no_grad():
        expected_base = llama_zoo.fresh_base()(input_ids).logits
    inside, resume = threading.Event(), threading.Event()

    class PauseOnce(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            if not inside.is_set():
                inside.set()
                assert resume.wait(60)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            out=model.generate(input_ids, adapter_ids=rows, stopping_criteria=[PauseOnce()], **kwargs)
        )
    )
    worker.start()
    try:
        assert inside.wait(60)
        with torch.no_grad():
            plain = model.base_model(input_ids).logits
    finally:
        resume.set()
        worker.join()
    torch.testing.assert_close(plain, expected_base, rtol=1e-5, atol=1e-5)
    assert result["out"].tolist() == expected_generate.tolist()


def test_generate_hands_over_the_cache_without_deprecation_warnings(llama_zoo):
    """transformers 5.24 renamed generate's `past_key_values` to `cache` (a FutureWarning per call)."""
    import warnings

    model = multi(llama_zoo)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.generate(prompts(2, 4, seed=31), adapter_ids=["qv_r4", None], max_new_tokens=3)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_dropped_model_frees_its_page_pool_without_the_cyclic_collector(llama_zoo, kernels, monkeypatch):
    """`del model` must give back its pool (tens of GB on a GPU) at once, as for any PyTorch model: the
    base model's planning hook, its LoRA forwards, the pool's reclaimer and the decode graphs' epoch
    read held the model, or its adapter residency, strongly, and those cycles kept it until Python's cyclic collector ran (never,
    where an engine froze the heap)."""
    import gc
    import weakref

    from hf_multilora.serving import Engine, SamplingParams

    monkeypatch.setenv("HF_MULTILORA_KERNELS", kernels)
    adapter = next(iter(llama_zoo.paths))
    gc.collect()
    gc.disable()
    try:
        model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
        model.generate(torch.tensor([[5, 6, 7, 8]]), adapter_ids=[adapter], max_new_tokens=3, do_sample=False,
                       pad_token_id=0)  # fmt: skip
        with Engine(model) as engine:
            engine.submit([5, 6, 7], adapter, SamplingParams(max_tokens=3, temperature=0)).result(timeout=60)
        model._graphs_of_runtime()  # what a CUDA-graphs call makes (CPU has none): its epoch read held the model
        gone = [weakref.ref(model), weakref.ref(model.base_model), weakref.ref(model.page_pool().storage)]
        del model, engine
        assert [ref() is None for ref in gone] == [True, True, True]
    finally:
        gc.enable()
