"""Decode steps replayed from CUDA graphs (generate(cuda_graphs=...)): the same tokens as eager, and
the cache bookkeeping a replay relies on."""

import pytest
import torch
from conftest import VOCAB, EndRowsAt
from helpers import begun_step, interpreter_only, last_positions
from transformers import LogitsProcessorList

from hf_multilora import MultiLoraModel
from hf_multilora.cache import PagedCache
from hf_multilora.graphs import _padded

POOL_BYTES = 2**28
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

cpu_model_on_triton = interpreter_only("the model on the CPU with Triton kernels; -m gpu has the CUDA graphs tests")


def prompts(rows, length, seed=0, device="cpu"):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(device)


def cuda_model(zoo, dtype=torch.float32):
    return MultiLoraModel.from_pretrained(zoo.fresh_base().to("cuda", dtype), adapters=zoo.paths, pool_bytes=POOL_BYTES)


def left_padded(rows, length, seed, device):
    """Ragged prompts, left-padded: row i has i % 4 padding tokens."""
    ids = prompts(rows, length, seed, device)
    mask = torch.ones_like(ids)
    for i in range(rows):
        mask[i, : i % 4] = 0
        ids[i, : i % 4] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------ CPU


def test_cuda_graphs_true_needs_cuda(llama_zoo):
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    ids = prompts(2, 4)
    with pytest.raises(ValueError, match="cuda_graphs=True, but the base model is on cpu, not on a CUDA device"):
        model.generate(ids, adapter_ids=["qv_r4", None], max_new_tokens=2, cuda_graphs=True)
    with pytest.raises(TypeError, match="cuda_graphs must be None, True or False"):
        model.generate(ids, adapter_ids=["qv_r4", None], max_new_tokens=2, cuda_graphs="yes")
    eager = model.generate(ids, adapter_ids=["qv_r4", None], max_new_tokens=3, cuda_graphs=False)
    default = model.generate(ids, adapter_ids=["qv_r4", None], max_new_tokens=3)
    assert torch.equal(eager, default) and model.graph_stats() == {"graph_pool_bytes": 0}
    assert "forward" not in model.base_model.__dict__


@cpu_model_on_triton
def test_reserved_table_keeps_its_address_across_blocks(llama_zoo, monkeypatch):
    """begin_step's bookkeeping (what a replay relies on) gives the eager step's logits, with the
    table, lengths and key mask at fixed addresses across block boundaries."""
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")  # begin_step needs the fused decode store
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    base = model.base_model
    ids, mask = left_padded(3, 6, seed=3, device="cpu")
    rows = ["qv_r4", None, "attn_r8"]
    from hf_multilora.cache import use_paged_attention

    with model._routed((ids,), {}, rows, None):
        use_paged_attention(base)
        stepped = PagedCache(model._runtime.residency.pool, base.config, block_size=4)
        eager = PagedCache(model._runtime.residency.pool, base.config, block_size=4)
        stepped.reserve(6 + 8)
        with torch.no_grad():
            out_s = base(input_ids=ids, attention_mask=mask, cache=stepped)
            out_e = base(input_ids=ids, attention_mask=mask, cache=eager)
            torch.testing.assert_close(out_s.logits, out_e.logits, rtol=0, atol=0)
            addresses = None
            for step in range(8):
                token = out_e.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out_s = begun_step(base, stepped, token, mask)
                out_e = base(input_ids=token, attention_mask=mask, position_ids=last_positions(mask), cache=eager)
                torch.testing.assert_close(out_s.logits, out_e.logits, rtol=1e-5, atol=1e-5, msg=f"step {step}")
                now = [t.data_ptr() for t in stepped.step_buffers()]
                assert addresses is None or now == addresses, f"step {step}: buffers moved"
                addresses = now
            assert stepped.get_seq_length() == eager.get_seq_length() == 14
        stepped.release()
        eager.release()
    with pytest.raises(RuntimeError, match=r"needs reserve\(\) and a filled cache"):
        PagedCache(model._runtime.residency.pool, base.config).begin_step(mask)


@cpu_model_on_triton
@pytest.mark.parametrize("padded", [False, True])
def test_steps_of_unpadded_prompts_do_not_read_the_key_mask(llama_zoo, monkeypatch, padded):
    """A call whose mask has no padding (decided at its first begun step, one sync) attends without
    the key mask in its steps (the mask's loads cost the int4 kernel ~15% on the H200): a key mask
    buffer cleared after begin_step leaves the eager logits. With padding, the mask is read."""
    from hf_multilora.cache import use_paged_attention

    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    base = model.base_model
    ids, mask = left_padded(3, 6, seed=3, device="cpu")
    if not padded:
        mask = torch.ones_like(mask)
    with model._routed((ids,), {}, ["qv_r4", None, "attn_r8"], None):
        use_paged_attention(base)
        pool = model._runtime.residency.pool
        stepped, eager = PagedCache(pool, base.config, block_size=4), PagedCache(pool, base.config, block_size=4)
        stepped.reserve(6 + 2)
        with torch.no_grad():
            base(input_ids=ids, attention_mask=mask, cache=stepped)
            out_e = base(input_ids=ids, attention_mask=mask, cache=eager)
            for step in range(2):
                token = out_e.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                # a cleared key mask: what a step that reads it attends to is nothing
                out_s = begun_step(base, stepped, token, mask, before=lambda key_mask: key_mask.fill_(False))
                assert stepped.step_masked() == padded
                out_e = base(input_ids=token, attention_mask=mask, position_ids=last_positions(mask), cache=eager)
                same = torch.allclose(out_s.logits, out_e.logits, rtol=1e-5, atol=1e-5)
                assert same != padded, f"step {step}"
        stepped.release()
        eager.release()


@cpu_model_on_triton
@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_steps_padded_to_a_batch_bucket_give_the_eager_logits(llama_zoo, monkeypatch, kv_dtype):
    """Decode steps padded to a batch bucket (what calls of several batch sizes replay one graph
    with): the real rows' logits are the eager step's, the padding rows write only into the
    cache's discard page, and a cache of another batch size in the bucket adopts the buffers.
    Quantized pages too: a step stores its K/V at the positions the fixed lengths give."""
    from hf_multilora.cache import use_paged_attention
    from hf_multilora.graphs import batch_bucket

    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33)] == [1, 2, 4, 8, 8, 16, 16, 24, 40]
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    base, names, lent = model.base_model, list(llama_zoo.paths), None
    for batch, rows, seed in [(3, ["qv_r4", None, "attn_r8"], 3), (4, [names[4], names[1], None, names[4]], 5)]:
        ids, mask = left_padded(batch, 6, seed=seed, device="cpu")
        with model._routed((ids,), {}, rows, None):
            use_paged_attention(base)
            runtime = model._runtime
            pool = runtime.residency.pool
            layout = {"kv_dtype": kv_dtype} if kv_dtype else {"block_size": 4}
            stepped, eager = PagedCache(pool, base.config, **layout), PagedCache(pool, base.config, **layout)
            stepped.reserve(6 + 6)
            with torch.no_grad():
                base(input_ids=ids, attention_mask=mask, cache=stepped)
                out_e = base(input_ids=ids, attention_mask=mask, cache=eager)
                stepped.adopt(lent, rows=4)
                lent = stepped.step_state()
                slots = model._routing.row_slots + [-1] * (4 - batch)
                for _ in range(6 if kv_dtype is None else 3):  # the interpreter is slow on quantized pages
                    token = out_e.logits[:, -1].argmax(-1, keepdim=True)
                    mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                    positions = last_positions(mask)
                    key_mask = stepped.begin_step(mask)
                    runtime.fixed_decode = True
                    try:
                        runtime.set_rows(slots, 1)
                        out_s = base.forward(input_ids=_padded(token, 4), attention_mask=key_mask[:, : mask.shape[1]],
                                             position_ids=_padded(positions, 4), cache=stepped)  # fmt: skip
                    finally:
                        stepped.end_step()
                        runtime.fixed_decode = False
                    out_e = base(input_ids=token, attention_mask=mask, position_ids=positions, cache=eager)
                    torch.testing.assert_close(out_s.logits[:batch], out_e.logits, rtol=1e-5, atol=1e-5)
                    table, lengths, _ = stepped.step_buffers()
                    assert [t.data_ptr() for t in stepped.step_buffers()] == [t.data_ptr() for t in lent[:3]]
                    if batch < 4:
                        assert (table[:, batch:, 0] == stepped._discard).all() and (lengths[batch:] == 1).all()
                    assert lengths[:batch].tolist() == [mask.shape[1]] * batch
            stepped.release()
            eager.release()
    assert model.memory_stats()["pages_kv"] == 0


@cpu_model_on_triton
def test_fixed_decode_tables_compute_what_the_per_call_plan_does(llama_zoo, monkeypatch):
    """The decode plan graphs replay (a tile per row, the rows' adapter tables rewritten in place for
    each mix of adapters) gives the per-call plan's logits, for mixed ranks and targets and base
    rows, with the same tables and launches for every mix."""
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    names = list(llama_zoo.paths)
    mixes = [[names[0], None, names[3], names[4]], [names[2], names[2], None, names[1]], [None, None, None, names[3]]]
    ids = prompts(4, 1, seed=10)
    seen = set()
    for rows in mixes:
        expected = model(ids, adapter_ids=rows).logits
        model._runtime.fixed_decode = True
        try:
            got = model(ids, adapter_ids=rows).logits
        finally:
            model._runtime.fixed_decode = False
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got[0], model(ids[:1]).logits[0]) or rows[0] is None  # adapters did act
        seen.update(id(f) for f in model._runtime._fixed.values())
    assert len(seen) == 1  # one set of fixed tables (ranks 4-16 share the capacity 16)


def test_which_forwards_a_graph_replays(llama_zoo):
    """Only one-token forwards on the call's filled cache, with the inputs a replay copies in."""
    from hf_multilora.graphs import eager_reason

    base = llama_zoo.fresh_base()
    from hf_multilora.memory.page_pool import PagePool

    pool = PagePool(64, 2048, torch.float32, "cpu")
    cache, other = PagedCache(pool, base.config), PagedCache(pool, base.config)
    ids, mask, positions = prompts(2, 1), torch.ones(2, 5, dtype=torch.long), torch.full((2, 1), 4)
    step = dict(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                return_dict=True, logits_to_keep=1)  # fmt: skip
    assert eager_reason(cache, (), step) == "prefill"  # the cache is empty
    k = torch.randn(2, cache.kv_heads, 4, cache.head_dim)
    for layer in range(cache.num_layers):
        cache.update(k, k, layer)
        cache._pending = None
    assert eager_reason(cache, (), step) is None
    older = {k: v for k, v in step.items() if k != "cache"}
    assert eager_reason(cache, (), {**older, "past_key_values": cache}) is None  # transformers 5.17's keyword
    cases = {
        "positional arguments": ((ids,), step),
        "not a step on the call's cache": ((), {**step, "cache": other}),
        "prefill": ((), {**step, "input_ids": prompts(2, 3)}),
        "attentions or hidden states asked for": ((), {**step, "output_hidden_states": True}),
        "inputs a replay does not take (inputs_embeds)": ((), {**step, "inputs_embeds": torch.zeros(2, 1, 64)}),
        "no 2-D attention mask or position ids": ((), {**step, "position_ids": None}),
        "use_cache=False": ((), {**step, "use_cache": False}),
    }
    for reason, (args, kwargs) in cases.items():
        assert eager_reason(cache, args, kwargs) == reason
    assert eager_reason(None, (), step) == "not a step on the call's cache"  # outside a call
    cache.release()


# ------------------------------------------------------------------------------------------ GPU


def graph_and_eager(model, input_ids, **kwargs):
    before = model.graph_stats()
    graphs = model.generate(input_ids, cuda_graphs=True, **kwargs)
    after = model.graph_stats()
    eager = model.generate(input_ids, cuda_graphs=False, **kwargs)
    return graphs, eager, {k: after.get(k, 0) - before.get(k, 0) for k in after}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kv_dtype", ["fp8", "int4"])
def test_graph_decode_over_quantized_pages_gives_the_eager_tokens(llama_zoo, kv_dtype):
    """Quantized KV pages in replayed steps; a call of the same shape with the model's own KV dtype
    afterwards gets step buffers and a graph of its own (a graph reads pages of one layout)."""
    model = cuda_model(llama_zoo, torch.bfloat16)
    names = list(llama_zoo.paths)
    rows = [names[0], None, names[1], names[4], names[2]]
    ids, mask = left_padded(len(rows), 9, seed=8, device="cuda")
    kwargs = dict(adapter_ids=rows, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    graphs, eager, stats = graph_and_eager(model, ids, kv_cache_dtype=kv_dtype, **kwargs)
    assert graphs.tolist() == eager.tolist()
    assert stats["captures"] == 1 and stats["replays"] == 28, stats  # the capturing step keeps its eager result
    graphs_own, eager_own, stats_own = graph_and_eager(model, ids, **kwargs)
    assert graphs_own.tolist() == eager_own.tolist() and stats_own["captures"] == 1, stats_own
    assert model.memory_stats()["pages_kv"] == 0


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_graph_decode_with_eviction_gives_the_eager_evicting_tokens(llama_zoo, kv_dtype):
    """Heavy-hitter eviction in replayed steps (compactions between replays, the scores added inside
    the graph): the tokens of eager eviction, which differ from those without eviction."""
    model = cuda_model(llama_zoo, torch.bfloat16)
    with torch.no_grad():  # sharper attention: the random model otherwise attends almost uniformly
        for layer in model.base_model.model.layers:
            layer.self_attn.q_proj.weight *= 4
            layer.self_attn.k_proj.weight *= 4
    names = list(llama_zoo.paths)
    rows = [names[0], None, names[1], names[4], names[2]]
    ids, mask = left_padded(len(rows), 40, seed=9, device="cuda")
    kwargs = dict(adapter_ids=rows, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                  kv_cache_dtype=kv_dtype)  # fmt: skip
    graphs, eager, stats = graph_and_eager(model, ids, kv_budget=0.2, kv_recent=4, **kwargs)
    assert graphs.tolist() == eager.tolist()
    assert stats["captures"] >= 1 and stats["captures"] + stats["replays"] == 39, stats
    assert graphs.tolist() != model.generate(ids, **kwargs).tolist()
    assert model.memory_stats()["pages_kv"] == 0


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_gives_the_eager_tokens(llama_zoo, dtype):
    model = cuda_model(llama_zoo, dtype)
    names = list(llama_zoo.paths)
    rows = [names[0], None, names[1], names[2], names[3], None, names[4], names[0]]
    ids, mask = left_padded(len(rows), 9, seed=4, device="cuda")
    kwargs = dict(adapter_ids=rows, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    graphs, eager, stats = graph_and_eager(model, ids, **kwargs)
    assert graphs.tolist() == eager.tolist()
    assert stats["captures"] == 1 and stats["replays"] == 38, stats  # the capturing step keeps its eager result
    assert model.graph_stats()["graph_pool_bytes"] > 0
    # Other mixes of adapters (other ranks, targets, base rows), other batch sizes of the same bucket
    # (5-8 rows) and a length in the same bucket: the graph captured above is replayed, no new capture.
    for seed, mix in enumerate([[names[4]] * 5, [None, names[3], names[3], None, names[1], names[2], None]]):
        ids_m, mask_m = left_padded(len(mix), 7, seed=20 + seed, device="cuda")
        kwargs_m = {**kwargs, "adapter_ids": mix, "attention_mask": mask_m, "max_new_tokens": 35}
        graphs_m, eager_m, stats_m = graph_and_eager(model, ids_m, **kwargs_m)
        assert graphs_m.tolist() == eager_m.tolist(), f"mix {seed}"
        assert stats_m.get("captures", 0) == 0 and stats_m["replays"] == 34, stats_m
    # a batch of another size: one more capture, still exact
    rows2 = [None, names[3], names[3]]
    ids2, mask2 = left_padded(3, 5, seed=5, device="cuda")
    kwargs2 = dict(adapter_ids=rows2, attention_mask=mask2, max_new_tokens=20, do_sample=False, pad_token_id=0)
    graphs2, eager2, stats2 = graph_and_eager(model, ids2, **kwargs2)
    assert graphs2.tolist() == eager2.tolist() and stats2["captures"] == 1
    assert model.memory_stats()["pages_kv"] == 0
    assert "forward" not in model.base_model.__dict__


@pytest.mark.gpu
@cuda
def test_graph_decode_with_beams_sampling_finished_rows_and_a_streamer(llama_zoo):
    from transformers.generation.streamers import BaseStreamer

    model = cuda_model(llama_zoo)
    names = list(llama_zoo.paths)
    rows = [names[1], None, names[2], names[0]]
    ids, mask = left_padded(len(rows), 7, seed=6, device="cuda")
    common = dict(adapter_ids=rows, attention_mask=mask, pad_token_id=0)

    beams, beams_eager, _ = graph_and_eager(model, ids, num_beams=3, max_new_tokens=20, do_sample=False, **common)
    assert beams.tolist() == beams_eager.tolist()

    torch.manual_seed(7)
    sampled = model.generate(ids, do_sample=True, top_k=0, num_return_sequences=2, max_new_tokens=20,
                             cuda_graphs=True, **common)  # fmt: skip
    torch.manual_seed(7)
    sampled_eager = model.generate(ids, do_sample=True, top_k=0, num_return_sequences=2, max_new_tokens=20,
                                   cuda_graphs=False, **common)  # fmt: skip
    assert sampled.tolist() == sampled_eager.tolist()

    ends = [2, 19, 5, 11]
    finish = dict(eos_token_id=1, max_new_tokens=24, do_sample=False,
                  logits_processor=LogitsProcessorList([EndRowsAt(ids.shape[1], ends, eos=1)]))  # fmt: skip
    finished, finished_eager, _ = graph_and_eager(model, ids, **finish, **common)
    assert finished.tolist() == finished_eager.tolist()

    class Collect(BaseStreamer):
        def __init__(self):
            self.steps = []

        def put(self, value):
            self.steps.append(value.tolist())

        def end(self):
            pass

    streamed = Collect()
    out = model.generate(ids, streamer=streamed, max_new_tokens=6, do_sample=False, cuda_graphs=True, **common)
    assert [row[ids.shape[1] :] for row in out.tolist()] == [list(t) for t in zip(*streamed.steps[1:], strict=True)]


@pytest.mark.gpu
@cuda
def test_graph_decode_ignores_what_freed_memory_holds(llama_zoo):
    """Memory freed between calls and overwritten must not reach a later call's results."""
    model = cuda_model(llama_zoo)
    names = list(llama_zoo.paths)
    ids, mask = left_padded(4, 8, seed=8, device="cuda")
    kwargs = dict(adapter_ids=[names[0], names[3], None, names[2]], attention_mask=mask, max_new_tokens=30,
                  do_sample=False, pad_token_id=0)  # fmt: skip
    first = model.generate(ids, cuda_graphs=True, **kwargs)
    junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]
    del junk
    again = model.generate(ids, cuda_graphs=True, **kwargs)
    eager = model.generate(ids, cuda_graphs=False, **kwargs)
    assert first.tolist() == again.tolist() == eager.tolist()


@pytest.mark.gpu
@cuda
def test_a_dropped_model_frees_its_pool_and_graphs_without_the_cyclic_collector(llama_zoo):
    """After calls that captured graphs (fused glue and decode projections installed and removed),
    `del model` gives back the pool and the graphs' memory at once. The graphs' epoch read held the
    model: `pytest -m gpu tests/` in one process ran out of GPU memory, each dropped model keeping the
    half of free memory its default pool had taken."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base().cuda(), adapters=llama_zoo.paths)
        model.generate(prompts(3, 6, device="cuda"), adapter_ids=list(llama_zoo.paths)[:3], max_new_tokens=4,
                       do_sample=False, pad_token_id=0, cuda_graphs=True)  # fmt: skip
        assert model.graph_stats()["replays"] > 0
        before = torch.cuda.memory_allocated()
        gone = [weakref.ref(model), weakref.ref(model.page_pool().storage)]
        del model
        assert [ref() is None for ref in gone] == [True, True]
        assert torch.cuda.memory_allocated() < before
    finally:
        gc.enable()


@pytest.mark.gpu
@cuda
def test_graphs_are_not_used_where_a_call_asks_for_hidden_states(llama_zoo):
    model = cuda_model(llama_zoo)
    ids = prompts(2, 5, device="cuda")
    with pytest.raises(ValueError, match="asks for attentions or hidden states"):
        model.generate(ids, adapter_ids=["qv_r4", None], max_new_tokens=3, output_hidden_states=True,
                       return_dict_in_generate=True, cuda_graphs=True)  # fmt: skip
    with pytest.raises(ValueError, match="does not use the paged cache"):
        model.generate(ids, adapter_ids=["qv_r4", None], max_new_tokens=3, paged_cache=False, cuda_graphs=True)
    out = model.generate(ids, adapter_ids=["qv_r4", None], max_new_tokens=3, output_hidden_states=True,
                         return_dict_in_generate=True)  # fmt: skip
    assert out.hidden_states is not None and not model.graph_stats().get("replays")


@pytest.mark.gpu
@cuda
def test_a_failed_capture_runs_the_call_eager_unless_graphs_are_required(llama_zoo, monkeypatch):
    model = cuda_model(llama_zoo)
    ids, mask = left_padded(3, 6, seed=9, device="cuda")
    kwargs = dict(adapter_ids=["qv_r4", None, "attn_r8"], attention_mask=mask, max_new_tokens=12,
                  do_sample=False, pad_token_id=0)  # fmt: skip
    eager = model.generate(ids, cuda_graphs=False, **kwargs)

    def refuse(self, *args, **kw):
        raise RuntimeError("simulated: capture not supported")

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", refuse)
    fallback = model.generate(ids, **kwargs)
    assert fallback.tolist() == eager.tolist()
    assert model.graph_stats()["eager: capture failed"] == 11 and not model.graph_stats().get("replays")
    with pytest.raises(RuntimeError, match="simulated"):
        model.generate(ids, cuda_graphs=True, **kwargs)
    assert model.memory_stats()["pages_kv"] == 0 and "forward" not in model.base_model.__dict__


@pytest.mark.gpu
@cuda
def test_an_adapter_on_modules_no_adapter_targeted_before_recaptures_once(llama_zoo):
    model = MultiLoraModel.from_pretrained(
        llama_zoo.fresh_base().cuda(), adapters={n: llama_zoo.paths[n] for n in ("qv_r4", "attn_r8")},
        pool_bytes=POOL_BYTES,
    )  # fmt: skip
    ids, mask = left_padded(4, 7, seed=11, device="cuda")
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    _, _, first = graph_and_eager(model, ids, adapter_ids=["qv_r4", None, "attn_r8", "qv_r4"], **kwargs)
    assert first["captures"] == 1
    model.load_adapter(llama_zoo.paths["mlp_r16"], "mlp_r16")  # the MLP projections gain LoRA forwards
    rows = ["mlp_r16", "qv_r4", None, "mlp_r16"]
    graphs, eager, second = graph_and_eager(model, ids, adapter_ids=rows, **kwargs)
    assert graphs.tolist() == eager.tolist() and second["captures"] == 1
    _, _, third = graph_and_eager(model, ids, adapter_ids=rows[::-1], **kwargs)
    assert third.get("captures", 0) == 0
