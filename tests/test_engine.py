"""The serving engine without HTTP: continuous batching on the tiny Llama with its adapters (CPU)."""

import threading
import time

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_multilora import MultiLoraModel
from hf_multilora.kernels import paged_attention as paged_attention_kernels
from hf_multilora.serving import Engine, RequestError, SamplingParams
from hf_multilora.serving.requests import stop_at

VOCAB = 128


def prompt(length, seed):
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, ids, adapter, new_tokens, kv_cache_dtype=None):
    """What one greedy generate() gives this request by itself, with `greedy`'s ignore_eos: EOS is a
    token like any other (no eos_token_id), not suppressed as min_new_tokens would (the tiny model's
    EOS, 2, is the top token of some steps: with min_new_tokens the reference took the runner-up)."""
    device = model.base_model.device
    out = model.generate(torch.tensor([ids], device=device), adapter_ids=[adapter], max_new_tokens=new_tokens,
                         eos_token_id=None, do_sample=False, pad_token_id=0, kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.fixture
def model(llama_zoo):
    return MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_concurrent_requests_get_what_each_gets_alone(model, llama_zoo):
    names = [*llama_zoo.paths, None]
    jobs = [(prompt(3 + (i * 5) % 11, seed=i), names[i % len(names)], 4 + i % 6) for i in range(16)]
    expected = [alone(model, ids, adapter, n) for ids, adapter, n in jobs]
    with Engine(model) as engine:
        results = [None] * len(jobs)

        def client(i):
            ids, adapter, n = jobs[i]
            stream = engine.submit(ids, adapter, greedy(n))
            stream.result(timeout=120)
            results[i] = stream

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, stream in enumerate(results):
            assert stream.token_ids == expected[i], f"request {i} ({jobs[i][1]})"
            assert stream.finish_reason == "length" and stream.usage.completion_tokens == jobs[i][2]
        assert max(engine.batch_sizes) > 1  # requests shared decode steps
        assert engine.metrics()["pages_kv"] == 0


def test_decode_steps_padded_to_batch_buckets_give_what_each_gets_alone(model, llama_zoo):
    """The CUDA-graph decode path on the CPU: the capture fails there, so each step runs the padded
    forward a replay would (rows padded to a batch bucket, padding rows on the discard page, their
    LoRA rows empty, their logits dropped); 7 rows ending one by one cover buckets 8, 4, 2 and 1."""
    names = [*llama_zoo.paths, None]
    jobs = [(prompt(4 + i % 3, seed=40 + i), names[i % len(names)], 3 + 2 * i) for i in range(7)]
    expected = [alone(model, ids, adapter, n) for ids, adapter, n in jobs]
    with Engine(model) as engine:
        engine.cuda_graphs = True
        with engine._cond:
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=120)
        assert [s.token_ids for s in streams] == expected
        assert set(engine.batch_sizes) == set(range(1, 8)), engine.batch_sizes
        stats = model.graph_stats()
        assert stats["eager: capture failed"] == engine.stats["decode_steps"]  # every step went the padded way
        assert engine.metrics()["pages_kv"] == 0  # the padding rows' page went back with the last request


@pytest.mark.parametrize(("zoo_name", "kernels"), [("llama_zoo", "torch"), ("mistral_zoo", "torch"),
                                                   ("llama_zoo", "triton")])  # fmt: skip
def test_quantized_kv_requests_get_what_each_gets_alone(zoo_name, kernels, request, monkeypatch):
    """int4 KV pages in the engine: rows of different lengths decode together (each writes and reads
    from its own length) and each gets what generate(kv_cache_dtype="int4") gives it alone. MHA and
    GQA with a sliding window of 8; the Triton kernels (interpreter here) store each row's tokens at
    that row's length."""
    monkeypatch.setenv("HF_MULTILORA_KERNELS", kernels)
    zoo = request.getfixturevalue(zoo_name)
    model = MultiLoraModel.from_pretrained(zoo.fresh_base(), adapters=zoo.paths)
    names = [*zoo.paths, None]
    # short and long prompts: prefill groups of different widths, then decode steps over rows of
    # different lengths
    jobs = [(prompt(3 + (i % 2) * 20 + i % 3, seed=60 + i), names[i % len(names)], 3 + i % 5) for i in range(8)]
    expected = [alone(model, ids, adapter, n, kv_cache_dtype="int4") for ids, adapter, n in jobs]
    with Engine(model, kv_cache_dtype="int4", min_prefill_rows=1) as engine:
        assert engine._cache.block_size > 3.7 * 16  # tokens per page: 16 in the model's dtype
        with engine._cond:  # all queued before the first step: prefilled in groups, then decoded together
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=120)
        assert [s.token_ids for s in streams] == expected
        assert max(engine.batch_sizes) > 1 and engine.metrics()["pages_kv"] == 0
    with pytest.raises(ValueError, match="kv_cache_dtype must be None or one of"):
        Engine(model, kv_cache_dtype="int8")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_a_left_padded_prefill_stores_no_padding(llama_zoo, monkeypatch, kernels, kv_dtype):
    """A 5-token prompt prefilled with a 130-token one: the forward pads it to 130, but its row stores
    its own 5 tokens from position 0 (pages for 5, no key mask in its steps), and both requests get
    what each gets alone."""
    monkeypatch.setenv("HF_MULTILORA_KERNELS", kernels)
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    jobs = [(prompt(130, seed=100), "attn_r8", 4), (prompt(5, seed=101), "qv_r4", 4)]
    expected = [alone(model, ids, adapter, n, kv_cache_dtype=kv_dtype) for ids, adapter, n in jobs]
    with Engine(model, kv_cache_dtype=kv_dtype) as engine:
        after_prefill = []
        prefill = engine._prefill

        def counted(requests):
            prefill(requests)
            after_prefill.append(engine.metrics()["pages_kv"])

        engine._prefill = counted
        with engine._cond:
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=120)
        block, layers = engine._cache.block_size, engine._cache.num_layers
        assert engine.stats["prefills"] == 1 and engine.stats["prefill_padding"] == 125
        assert after_prefill == [layers * (-(-130 // block) + -(-5 // block))]  # not 2 x 130 tokens' pages
        assert -(-5 // block) < -(-130 // block)
    assert [s.token_ids for s in streams] == expected


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_engines_decode_steps_follow_the_package_kernel_rule(model, monkeypatch, kernels):
    """Decode attention takes Triton on CUDA or where HF_MULTILORA_KERNELS=triton, as every other
    kernel of the package. The engine's steps went through PagedDecode, which chose Triton wherever
    TRITON_INTERPRET=1 (these tests' conftest), so on a CPU they ran the interpreter while generate()
    took the torch path (and Ray replicas that inherited the variable took minutes per request)."""
    torch_calls = []
    reference = paged_attention_kernels.paged_attention_torch

    def counted(*args, **kwargs):
        torch_calls.append(args[0].shape)
        return reference(*args, **kwargs)

    monkeypatch.setattr(paged_attention_kernels, "paged_attention_torch", counted)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", kernels)
    ids = prompt(5, seed=90)
    with Engine(model) as engine:
        stream = engine.submit(ids, "attn_r8", greedy(4))
        stream.result(timeout=60)
    assert stream.token_ids == alone(model, ids, "attn_r8", 4)
    layers = model.base_model.config.num_hidden_layers
    assert len(torch_calls) == (3 * layers if kernels == "torch" else 0)  # 3 decode steps after the prefill


def test_a_request_joins_a_running_batch(model):
    with Engine(model) as engine:
        long = engine.submit(prompt(5, seed=1), "attn_r8", greedy(60))
        first = next(iter(long))  # the long request is decoding
        assert first.token_id is not None
        short = engine.submit(prompt(4, seed=2), "qv_r4", greedy(5))
        assert short.result(timeout=60) == "" and len(short.token_ids) == 5
        assert not long.finished  # it joined while the long one ran, and left before it
        long.result(timeout=60)
        assert engine.batch_sizes[2] >= 4
    assert long.token_ids == alone(model, prompt(5, seed=1), "attn_r8", 60)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_tokens_read_a_step_late_end_rows_without_their_extra_token(model, async_scheduling):
    """Each decode step is launched before the step before it is read: a row that reached EOS ran one
    step more (its token dropped), a row that reaches max_tokens is not launched again. Without
    async scheduling, no step more."""
    ids = prompt(6, seed=5)
    reference = alone(model, ids, "attn_r8", 12)
    end = next(i for i in range(3, 12) if reference[i] not in reference[:i])
    with Engine(model, eos_token_id=reference[end], async_scheduling=async_scheduling) as engine:
        stream = engine.submit(ids, "attn_r8", SamplingParams(max_tokens=12, temperature=0))
        stream.result(timeout=60)
        # the prefill gave token 0, the decode steps tokens 1..end (the EOS), and one step more ran
        assert stream.token_ids == reference[:end] and stream.finish_reason == "stop"
        assert engine.stats["decode_steps"] == end + async_scheduling and engine.metrics()["pages_kv"] == 0
        engine.stats.clear()
        capped = engine.submit(ids, "attn_r8", greedy(4))
        capped.result(timeout=60)
        assert capped.token_ids == reference[:4] and capped.finish_reason == "length"
        assert engine.stats["decode_steps"] == 3


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence / frequency penalties and logit bias over the output tokens, for generate()."""

    def __init__(self, prompt_length, params):
        self.prompt_length, self.params = prompt_length, params

    def __call__(self, input_ids, scores):
        output = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        scores = scores - self.params.frequency_penalty * counts - self.params.presence_penalty * (counts > 0)
        for token, bias in self.params.logit_bias:
            scores[:, token] += bias
        return scores


def test_penalties_and_logit_bias_equal_generate_with_openai_processor(model):
    """Greedy rows with penalties (their counts include the token the host has not read yet, under
    async scheduling) beside plain ones: each gets what generate() with OpenAI's formula gives it."""
    names = ["attn_r8", "qv_r4", None, "mlp_r16"]
    ids = [prompt(5 + i, seed=120 + i) for i in range(4)]
    first = alone(model, ids[2], None, 16)
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, frequency_penalty=1.5),
              SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, presence_penalty=2, frequency_penalty=-0.5),
              SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logit_bias={first[0]: -100, first[3]: 8}),
              greedy(16)]  # fmt: skip
    expected = []
    for row, p in zip(ids, params, strict=True):
        device = model.base_model.device
        out = model.generate(torch.tensor([row], device=device), adapter_ids=[names[len(expected)]], max_new_tokens=16,
                             min_new_tokens=16, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([OpenAIPenalties(len(row), p)]))  # fmt: skip
        expected.append(out[0, len(row) :].tolist())
    assert expected[2] != first and first[0] not in expected[2]
    assert expected[0] != alone(model, ids[0], "attn_r8", 16)  # the penalty changed the output
    with Engine(model) as engine:
        with engine._cond:
            streams = [engine.submit(row, name, p) for row, name, p in zip(ids, names, params, strict=True)]
        for stream in streams:
            stream.result(timeout=60)
        assert [s.token_ids for s in streams] == expected
        with pytest.raises(RequestError, match="logit_bias names token ids outside the vocabulary"):
            engine.submit([5], None, SamplingParams(logit_bias={VOCAB: 1.0}))


def step_log_probs(model, ids, adapter, tokens):
    """generate()'s log-softmax of the raw logits before each of `tokens`, the output given so far."""
    device, rows = model.base_model.device, []
    for t in range(len(tokens)):
        out = model.generate(torch.tensor([ids + tokens[:t]], device=device), adapter_ids=[adapter], max_new_tokens=1,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
        rows.append(out.logits[0][0].float().log_softmax(dim=-1))
    return torch.stack(rows)


def test_logprobs_are_the_log_softmax_of_the_models_logits_for_each_output_token(model):
    """A greedy row with 3 top tokens and a sampled, penalized row with none, beside a row without
    logprobs: each token's logprob and top tokens are the log-softmax of the raw logits at that step
    (what generate() gives for the output so far; temperature, top-k and penalties do not change them)."""
    ids = [prompt(6 + i, seed=140 + i) for i in range(3)]
    names = ["attn_r8", "qv_r4", None]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=8, temperature=0.8, top_k=5, seed=3, ignore_eos=True, frequency_penalty=1.0,
                             logprobs=0),
              greedy(8)]  # fmt: skip
    with Engine(model) as engine:
        with engine._cond:
            streams = [engine.submit(row, name, p) for row, name, p in zip(ids, names, params, strict=True)]
        for stream in streams:
            stream.result(timeout=60)
    assert streams[2].logprobs == []
    for row, name, p, stream in zip(ids[:2], names[:2], params[:2], streams[:2], strict=True):
        assert len(stream.logprobs) == len(stream.token_ids) == 8
        expected = step_log_probs(model, row, name, stream.token_ids)
        chosen = expected.gather(1, torch.tensor(stream.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor([e.logprob for e in stream.logprobs]), chosen, atol=1e-4, rtol=0)
        top = expected.topk(p.logprobs, dim=-1)
        assert [[t for t, _ in e.top] for e in stream.logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in e.top] for e in stream.logprobs]).reshape(top.values.shape),
                                   top.values, atol=1e-4, rtol=0)  # fmt: skip
    assert all(e.top[0][1] == max(v for _, v in e.top) and e.logprob <= 0 for e in streams[0].logprobs)
    with pytest.raises(RequestError, match="logprobs=21"):
        SamplingParams(logprobs=21)


def test_cancelling_frees_the_pages_and_the_others_go_on(model):
    with Engine(model) as engine:
        victim = engine.submit(prompt(20, seed=3), "mlp_r16", greedy(500))
        other = engine.submit(prompt(6, seed=4), None, greedy(30))
        for count, _ in enumerate(victim, start=1):
            if count == 3:
                victim.cancel()
        assert victim.finish_reason == "cancelled" and len(victim.token_ids) < 500
        assert other.result(timeout=60) == "" and other.finish_reason == "length"
        assert other.token_ids == alone(model, prompt(6, seed=4), None, 30)
        assert engine.metrics()["pages_kv"] == 0


def test_short_of_pages_the_youngest_waits_and_recomputes(llama_zoo):
    # 8 KiB pages of 16 tokens: a 2-layer request of 8 + 32 tokens needs 2 x 3 pages at its end, 6
    # of them 36; the pool has 30 pages, some of them taken by the three adapters
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths, pool_bytes=30 * 2**13)
    jobs = [(prompt(8, seed=10 + i), ["attn_r8", "qv_r4", None, "rslora"][i % 4], 32) for i in range(6)]
    expected = [alone(model, ids, adapter, n) for ids, adapter, n in jobs]
    with Engine(model) as engine:
        streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=120)
        assert [s.token_ids for s in streams] == expected
        assert engine.stats["preemptions"] > 0 and max(engine.batch_sizes) < len(jobs)
        assert engine.metrics()["pages_kv"] == 0
    assert not model._runtime.residency._in_use  # every adapter pin of the engine was let go


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    with Engine(model) as engine:
        alone_tokens = engine.submit(prompt(5, seed=5), "qv_r4", params)
        alone_tokens.result(timeout=60)
        crowd = [engine.submit(prompt(4 + i, seed=20 + i), None, greedy(12)) for i in range(4)]
        together = engine.submit(prompt(5, seed=5), "qv_r4", params)
        together.result(timeout=60)
        for stream in crowd:
            stream.result(timeout=60)
    assert alone_tokens.token_ids == together.token_ids


def test_bad_requests_are_refused_before_queueing(model):
    with Engine(model) as engine:
        with pytest.raises(KeyError, match="unknown adapter 'nope'"):
            engine.submit([5, 6], "nope")
        with pytest.raises(RequestError, match="temperature=-1"):
            engine.submit([5, 6], None, SamplingParams(temperature=-1))
        with pytest.raises(RequestError, match="token ids in"):
            engine.submit([5, VOCAB], None)
        with pytest.raises(RequestError, match="text prompt needs the engine's tokenizer"):
            engine.submit("hello", None)
        with pytest.raises(RequestError, match="stop strings need"):
            engine.submit([5], None, SamplingParams(stop=("x",)))
        with pytest.raises(RequestError, match="KV pages for"):
            engine.submit([5], None, SamplingParams(max_tokens=10**7))
        assert engine.stats["submitted"] == 0
    for bad in (dict(max_tokens=0), dict(top_p=0), dict(top_k=-1), dict(seed=-1), dict(stop="x"), dict(max_tokens=True)):
        with pytest.raises(RequestError):
            SamplingParams(**bad)


def test_stop_strings_hold_back_what_could_start_one():
    assert stop_at("hello wor", ("world",)) == (None, 6)
    assert stop_at("hello world!", ("world",)) == (6, 6)
    assert stop_at("abc", ("x", "cd")) == (None, 2)
    assert stop_at("abc", ()) == (None, 3)


def test_capturing_graphs_needs_an_engine_with_graphs_and_known_adapters(model):
    with Engine(model, cuda_graphs=False) as engine:
        with pytest.raises(ValueError, match="max_context must be an int >= 1"):
            engine.capture_decode_graphs(0, adapters=[None])
        with pytest.raises(KeyError, match="unknown: \\['nope'\\]"):
            engine.capture_decode_graphs(64, adapters=["nope", None])
        with pytest.raises(KeyError, match="one or more"):
            engine.capture_decode_graphs(64, adapters=[])
        with pytest.raises(ValueError, match="decodes eagerly"):  # the default adapters are known ones
            engine.capture_decode_graphs(64)
    with pytest.raises(ValueError, match="capture_graphs must be None or an int >= 1"):
        Engine(model, capture_graphs=0)
    with Engine(model, cuda_graphs=False, capture_graphs=64) as engine:  # nothing to capture: ignored
        stream = engine.submit(prompt(4, seed=1), "attn_r8", greedy(2))
        stream.result(timeout=60)
        assert len(stream.token_ids) == 2
        with pytest.raises(ValueError, match="decodes eagerly"):
            engine.capture_decode_graphs(64, adapters=[None])
    if torch.cuda.is_available():
        return
    with Engine(model) as engine, pytest.raises(ValueError, match="decodes eagerly"):  # on the CPU: no graphs
        engine.capture_decode_graphs(64, adapters=[None])


def test_one_adapter_per_rank_capacity_stands_for_the_others_in_graph_captures(model):
    """The zoo's ranks (8, 4, 16, 12 at most with its rank pattern, 16) all round up to the fixed
    decode plans' 16: the first registered adapter stands for all."""
    from hf_multilora.layers import rank_capacity

    assert [rank_capacity(r) for r in (1, 4, 16, 17, 64)] == [16, 16, 16, 32, 64]
    assert [model._registry[n].max_rank for n in model.adapter_names] == [8, 4, 16, 12, 16]
    assert model._rank_classes() == [model.adapter_names[0]]


def test_close_ends_what_still_runs(model):
    engine = Engine(model)
    stream = engine.submit(prompt(5, seed=9), None, greedy(10**4 // 4))
    next(iter(stream))
    engine.close()
    assert stream.finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([5], None)


def test_prompts_of_similar_lengths_are_prefilled_together(model):
    jobs = [(prompt(n, seed=40 + i), ["attn_r8", None, "qv_r4"][i % 3], 6) for i, n in enumerate([10, 12, 11, 9, 12, 30])]
    expected = [alone(model, ids, adapter, n) for ids, adapter, n in jobs]
    with Engine(model) as engine:
        with engine._cond:  # the engine thread waits for the lock: all six are queued before its first step
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=60)
        # 9..12 tokens together (padding under a quarter), the 30-token prompt alone
        assert engine.stats["prefills"] == 2
        assert engine.metrics()["pages_kv"] == 0
    assert [s.token_ids for s in streams] == expected


@pytest.mark.parametrize("lookahead, padding", [(64, 12), (4, 24)])
def test_prefill_groups_are_chosen_by_length_among_the_lookahead(model, lookahead, padding):
    """Eight queued prompts alternate short and long; four go in a forward. Among all eight, the
    oldest's group is the four nearest its length (10, 11, 9, 12: padding 6), then the longer four
    (14, 15, 16, 13: 6). A lookahead of four groups them as they arrived (padding 10 + 14)."""
    lengths = [10, 14, 11, 15, 12, 16, 9, 13]
    jobs = [(prompt(n, seed=90 + i), ["attn_r8", None, "qv_r4"][i % 3], 3) for i, n in enumerate(lengths)]
    expected = [alone(model, ids, adapter, n) for ids, adapter, n in jobs]
    with Engine(model, max_prefill_rows=4, prefill_lookahead=lookahead) as engine:
        with engine._cond:
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=60)
        assert engine.stats["prefills"] == 2 and engine.stats["prefill_tokens"] == sum(lengths)
        assert engine.stats["prefill_padding"] == padding
        assert engine.stats["prefill_seconds"] > 0 and engine.stats["decode_seconds"] > 0
        assert engine.stats["reserve_seconds"] > 0 and engine.stats["prefetch_seconds"] > 0
    assert [s.token_ids for s in streams] == expected
    with pytest.raises(ValueError, match="prefill_lookahead must be an int >= 1"):
        Engine(model, prefill_lookahead=0)


def test_while_rows_decode_a_small_prefill_waits_a_bounded_number_of_steps(model):
    """Two 6-token prompts and a 60-token one queue behind a running request: the long one cannot
    join the short ones' forward (padding would more than double it), and three wait, so the pair
    waits for more rows, max_prefill_wait steps, then goes; the long one, now the only one
    waiting, goes at once."""
    jobs = [(prompt(8, seed=70), "attn_r8", 30), (prompt(6, seed=71), "qv_r4", 5), (prompt(6, seed=72), None, 5),
            (prompt(60, seed=73), "attn_r8", 5)]  # fmt: skip
    expected = [alone(model, ids, adapter, n) for ids, adapter, n in jobs]
    with Engine(model, min_prefill_rows=4, max_prefill_wait=3) as engine:
        first = engine.submit(*jobs[0][:2], greedy(jobs[0][2]))
        next(iter(first))  # it decodes
        with engine._cond:
            streams = [first] + [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs[1:]]
        for stream in streams:
            stream.result(timeout=60)
        assert engine.stats["prefill_waits"] == 3 and engine.stats["prefills"] == 3
    assert [s.token_ids for s in streams] == expected
    with pytest.raises(ValueError, match="max_prefill_wait must be an int >= 0"):
        Engine(model, max_prefill_wait=-1)
    with pytest.raises(ValueError, match="cuda_graphs=True, but the base model is on cpu"):
        Engine(model, cuda_graphs=True)
    with pytest.raises(TypeError, match="cuda_graphs must be None, True or False"):
        Engine(model, cuda_graphs="yes")
    with pytest.raises(TypeError, match="async_scheduling must be True or False, got 1"):
        Engine(model, async_scheduling=1)
    with pytest.raises(TypeError, match="freeze_gc must be True or False, got 'yes'"):
        Engine(model, freeze_gc="yes")


def test_an_engine_that_freezes_the_gc_takes_its_start_up_heap_out_of_full_collections(model, llama_zoo):
    """A full collection walks every tracked object (350 ms at 7B on the H200 host, inside a prefill:
    the TTFT outlier of a fresh serving process); freeze_gc moves the model and the engine out of its
    reach, and the engine serves as before."""
    import gc

    gc.unfreeze()
    try:
        with Engine(model) as engine:
            assert gc.get_freeze_count() == 0  # not by default: a process that drops models would leak cycles
        with Engine(model, freeze_gc=True) as engine:
            frozen = gc.get_freeze_count()
            assert frozen > 1000
            assert not any(o is engine for o in gc.get_objects())  # out of the collector's generations
            ids = prompt(5, seed=90)
            stream = engine.submit(ids, "attn_r8", greedy(4))
            stream.result(timeout=60)
        assert stream.token_ids == alone(model, ids, "attn_r8", 4)
    finally:
        gc.unfreeze()


def test_a_full_batch_waits_for_more_rows_to_end_before_a_prefill(model):
    """Three rows fill the batch and two requests wait: when the first row ends, one row is free,
    but two wait, so their prefill waits (at most max_prefill_wait steps) for the second row to end
    and both go in one forward. A freed row was prefilled alone before (3 prefills), which at
    saturation spent more time in prefills than in decode steps."""
    jobs = [(prompt(6, seed=80 + i), adapter, n) for i, (adapter, n) in
            enumerate([("attn_r8", 4), ("qv_r4", 9), (None, 30), ("attn_r8", 5), ("qv_r4", 5)])]  # fmt: skip
    expected = [alone(model, ids, adapter, n) for ids, adapter, n in jobs]
    with Engine(model, max_running=3, min_prefill_rows=2, max_prefill_wait=50) as engine:
        with engine._cond:
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=60)
        assert engine.stats["prefills"] == 2, engine.stats
        assert 3 <= engine.stats["prefill_waits"] <= 8, engine.stats  # rows 1 and 2 end 5 tokens apart
    assert [s.token_ids for s in streams] == expected


def test_a_waiting_requests_adapter_is_read_into_host_memory_once_not_every_step(model, monkeypatch):
    """Requests queued behind a one-row batch wait many decode steps; their adapters are asked for
    once, when they arrive (before: every step, for every waiting request: ~7.5 us a name)."""
    asked = []
    prefetch = model.prefetch_adapters
    monkeypatch.setattr(model, "prefetch_adapters", lambda names, **kw: (asked.extend(names), prefetch(names, **kw)))
    jobs = [(prompt(5, seed=90 + i), adapter, 6) for i, adapter in enumerate(["attn_r8", "qv_r4", None, "attn_r8"])]
    with Engine(model, max_running=1) as engine:
        with engine._cond:
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        late = engine.submit(prompt(5, seed=99), "qv_r4", greedy(3))  # arrives while the first decodes
        for stream in [*streams, late]:
            stream.result(timeout=60)
        assert engine.stats["decode_steps"] >= 20, engine.stats
    assert sorted(asked) == ["attn_r8", "qv_r4", "qv_r4"] or sorted(asked) == ["attn_r8", "qv_r4"], asked


@pytest.mark.parametrize("how", ["adapter files gone", "prefill raises"])
def test_a_failing_request_does_not_disturb_the_others(llama_zoo, tmp_path, monkeypatch, how):
    import shutil

    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    broken = shutil.copytree(llama_zoo.paths["qv_r4"], tmp_path / "broken")
    model.load_adapter(broken, "broken")  # checked now, weights read at first use
    if how == "adapter files gone":  # its admission fails
        (broken / "adapter_model.safetensors").unlink()
    else:  # the group's prefill fails, and again for the broken request alone
        step = model._logits_of_step

        def failing(input_ids, position_ids, cache, adapter_ids, attention_mask=None, **kwargs):
            if "broken" in adapter_ids and input_ids.shape[1] > 1:
                raise RuntimeError("simulated prefill failure")
            return step(input_ids, position_ids, cache, adapter_ids, attention_mask, **kwargs)

        monkeypatch.setattr(model, "_logits_of_step", failing)
    jobs = [(prompt(10, seed=60 + i), adapter, 5) for i, adapter in enumerate(["attn_r8", "broken", None, "qv_r4"])]
    with Engine(model) as engine:
        with engine._cond:  # queued together: one prefill group
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=60) if stream is not streams[1] else None
        with pytest.raises(RuntimeError, match="failed"):
            streams[1].result(timeout=60)
        assert streams[1].finish_reason == "error"
        assert engine.metrics()["pages_kv"] == 0
        assert engine.stats["prefills"] == (1 if how == "adapter files gone" else 5)  # 1 group, or 1 + 4 alone
    monkeypatch.undo()
    for i in (0, 2, 3):
        assert streams[i].token_ids == alone(model, *jobs[i]), f"request {i}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_on_cuda_concurrent_requests_get_what_each_gets_alone(llama_zoo, kv_dtype):
    """The engine on the Triton path (grouped prefill with padding, ragged decode, fused glue), with
    KV pages in the model's dtype and in int4. fp32: a row's GEMMs in a batch of 12 and alone may
    round differently, which bf16 greedy tokens of a random tiny model would show."""
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base().cuda(), adapters=llama_zoo.paths, pool_bytes=2**28)
    names = [*llama_zoo.paths, None]
    jobs = [(prompt(5 + i % 4, seed=80 + i), names[i % len(names)], 20 + i) for i in range(12)]
    expected = [alone(model, ids, adapter, n, kv_cache_dtype=kv_dtype) for ids, adapter, n in jobs]
    before = model.graph_stats()
    with Engine(model, kv_cache_dtype=kv_dtype) as engine:
        with engine._cond:
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=120)
        assert engine.stats["prefills"] < len(jobs) and max(engine.batch_sizes) > 1
        assert engine.metrics()["pages_kv"] == 0
        # decode steps replayed graphs: the first step of a (batch bucket, table width) captures (and
        # keeps its eager result)
        captures, replays = (model.graph_stats().get(k, 0) - before.get(k, 0) for k in ("captures", "replays"))
        assert 0 < captures < replays and captures + replays == engine.stats["decode_steps"]
        assert "eager: capture failed" not in model.graph_stats()
    assert [s.token_ids for s in streams] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_graphs_captured_before_serving_leave_none_to_capture_while_serving(llama_zoo):
    """capture_decode_graphs() takes every (batch bucket, table width) the requests reach, for
    adapters of one rank class and for rows without adapters, takes no KV page, and the requests
    then replay those graphs only and get what each gets alone."""
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base().cuda(), adapters=llama_zoo.paths, pool_bytes=2**28)
    names = [*llama_zoo.paths, None]
    jobs = [(prompt(5 + i % 4, seed=90 + i), names[i % len(names)], 6 + i) for i in range(10)]
    longest = max(len(ids) + n for ids, _, n in jobs)
    with Engine(model, max_running=8) as engine:
        captured = engine.capture_decode_graphs(longest, adapters=[names[0], None])
        widths = (-(-longest // engine._cache.block_size) - 1).bit_length() + 1
        assert captured == 2 * 4 * widths  # buckets 8, 4, 2, 1
        pages = engine.metrics()
        assert pages["pages_kv"] == 0 and pages["pages_free"] + pages["pages_adapter"] == pages["pages_total"]
        assert engine.capture_decode_graphs(longest, adapters=[names[1]]) == 0  # its rank class has them
        before = model.graph_stats()
        with engine._cond:
            streams = [engine.submit(ids, adapter, greedy(n)) for ids, adapter, n in jobs]
        for stream in streams:
            stream.result(timeout=120)
        captures, replays = (model.graph_stats().get(k, 0) - before.get(k, 0) for k in ("captures", "replays"))
        assert captures == 0 and replays == engine.stats["decode_steps"] > 0
    assert [s.token_ids for s in streams] == [alone(model, ids, adapter, n) for ids, adapter, n in jobs]


def strict_engine(method: str) -> type[Engine]:
    """An Engine whose `method` runs under torch's sync debug mode "error": a call in it that
    synchronises with the device raises."""

    def run(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return getattr(Engine, method)(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return type(f"Strict{method}", (Engine,), {method: run})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_decode_step_is_launched_without_waiting_for_the_device(llama_zoo):
    """The host's work for a step overlaps the step before only if launching it never synchronises:
    the second run of the same requests (graphs captured by the first) launches every decode step
    under torch's sync debug mode "error", and gives the same tokens, sampled ones (seeded) included,
    and the same logprobs where asked (read with the tokens)."""
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base().cuda(), adapters=llama_zoo.paths, pool_bytes=2**28)
    names = [*llama_zoo.paths, None]
    sampled = dict(temperature=0.8, top_p=0.9, top_k=20, ignore_eos=True)
    jobs = [(prompt(5 + i % 4, seed=80 + i), names[i % len(names)],
             SamplingParams(max_tokens=20 + i, seed=i, logprobs=i % 3 or None, **sampled) if i % 2 else greedy(20 + i))
            for i in range(10)]  # fmt: skip

    runs = []
    for kind in (Engine, strict_engine("_launch")):
        with kind(model) as engine:
            with engine._cond:
                streams = [engine.submit(ids, adapter, params) for ids, adapter, params in jobs]
            for stream in streams:
                stream.result(timeout=120)
            assert engine.stats["decode_steps"] > 0 and engine.metrics()["pages_kv"] == 0
        runs.append(streams)
    assert [s.token_ids for s in runs[0]] == [s.token_ids for s in runs[1]]
    assert sum(bool(s.logprobs) for s in runs[0]) == 3
    for first, second in zip(*runs, strict=True):
        assert [[t for t, _ in e.top] for e in first.logprobs] == [[t for t, _ in e.top] for e in second.logprobs]
        assert [e.logprob for e in first.logprobs] == pytest.approx([e.logprob for e in second.logprobs], abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_admitting_a_request_whose_adapter_is_not_resident_does_not_wait_for_the_device(llama_zoo):
    """Placing an adapter in the pool (its rank-row addresses, location and scale tables) happens
    while the launched decode step still runs; the tables' pageable host-to-device copies waited
    for it (most of a miss's ~9 ms at 7B was Python, see test_residency's page layout test). Every
    admission here runs under torch's sync debug mode "error" (a sync fails the request), each
    adapter arrives while rows decode, and the tokens equal those of an engine without the check."""
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base().cuda(), adapters=llama_zoo.paths, pool_bytes=2**28)
    names = list(llama_zoo.paths)
    jobs = [(prompt(6 + i, seed=120 + i), names[i % len(names)], greedy(12 + 4 * i)) for i in range(len(names) + 2)]

    runs = []
    for kind in (Engine, strict_engine("_reserve")):
        if runs:  # the second run places every adapter again
            for name in names:
                model._runtime.residency.drop(name)
        with kind(model) as engine:
            streams = []
            for ids, adapter, params in jobs:  # one by one: each arrives while the ones before decode
                streams.append(engine.submit(ids, adapter, params))
                while len(streams[-1].token_ids) < 2 and not streams[-1].finished:
                    time.sleep(0.001)
            for stream in streams:
                stream.result(timeout=120)
            assert engine.stats["finished_length"] == len(jobs), engine.stats
        runs.append([s.token_ids for s in streams])
        assert model.memory_stats()["misses"] >= len(names) * len(runs)
    assert runs[0] == runs[1]


def test_incremental_text_equals_decoding_everything_each_step():
    from hf_multilora.app.demo import read_demo
    from transformers import AutoTokenizer

    from hf_multilora.serving.detokenize import IncrementalText

    tokenizer = AutoTokenizer.from_pretrained(read_demo().base)
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        tokens = torch.randint(0, tokenizer.vocab_size, (60,), generator=gen).tolist()
        text = IncrementalText(tokenizer)
        pieces = []
        for n in range(1, len(tokens) + 1):
            pieces.append(text.extend(tokens[:n], final=n == len(tokens)))
            full = tokenizer.decode(tokens[:n], skip_special_tokens=True)
            assert full.startswith(text.text), (trial, n)  # never ahead of, never different from, the whole
        assert "".join(pieces) == text.text == tokenizer.decode(tokens, skip_special_tokens=True)
