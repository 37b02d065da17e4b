"""Heavy-hitter eviction (hf_multilora/eviction.py): what a budget keeps, that the cache then attends to
exactly those tokens (against dense attention with the evicted ones masked), that pages go back, and
the inputs it refuses."""

import math
from typing import NamedTuple

import pytest
import torch
from conftest import DEVICE
from helpers import begun_step, interpreter_only, last_positions
from transformers import AttentionInterface

from hf_multilora import MultiLoraModel
from hf_multilora.cache import PagedCache, paged_attention_in, set_attention
from hf_multilora.eviction import SNAP_POOL, SNAP_WINDOW, HeavyHitters, KvBudget
from hf_multilora.kernels.kv_quant import dequantize, quantize
from hf_multilora.memory.page_pool import PagePool
from hf_multilora.model import _cache_keyword


def test_budget_arithmetic_and_bad_budgets():
    budget = KvBudget.of(0.25, 4)
    assert [budget.kept(n) for n in (3, 16, 40, 100)] == [3, 4, 10, 25]
    assert KvBudget.of(None, 64) is None and KvBudget.of(1.0, 64) is None  # nothing is ever evicted
    for bad in (0, -0.5, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match="kv_budget must be a fraction"):
            KvBudget.of(bad, 4)
    for bad in (-1, 2.5, None):
        with pytest.raises(ValueError, match="kv_recent must be a count"):
            KvBudget.of(0.5, bad)


def test_keep_takes_the_recent_tokens_and_the_best_scored_others_padding_first():
    hitters = HeavyHitters(KvBudget(0.5, 2), layers=1, kv_heads=2)
    key = torch.zeros(2, 2, 1, 4)
    real = torch.ones(2, 13, dtype=torch.bool)
    real[1, :5] = False  # row 1: 5 slots of left padding, 8 real tokens
    hitters.slot_mask(key, real, 12, 13)  # 12 slots
    hitters.real[:, :12] = real[:, :12]
    scores = torch.rand(2, 2, 12, generator=torch.Generator().manual_seed(0))
    hitters.scores[0][..., :12] = scores
    keep = hitters.keep(12, 12)[0]  # keeps 6: the 2 newest + the 4 best of the 10 older
    for b in range(2):
        for h in range(2):
            older = [j for j in range(10) if real[b, j]]
            best = sorted(older, key=lambda j: -scores[b, h, j].item())[:4]
            assert sorted(keep[b, h].tolist()) == [*sorted(best), 10, 11]
    # too few real tokens: padding fills the budget, its lowest slots in every head (one slot mask for all)
    hitters.real[1, :9] = False
    keep = hitters.keep(12, 12)[0]
    assert sorted(keep[1, 0].tolist()) == sorted(keep[1, 1].tolist()) == [0, 1, 2, 9, 10, 11]


@pytest.mark.parametrize("slots, kept", [(12, 5), (12, 9), (40, 30), (7, 7), (50, 10)])
def test_in_place_moves_fill_the_evicted_slots_below_the_new_length(slots, kept):
    """After the moves, slots 0..kept-1 hold exactly the kept slots (those already there stay put,
    the others fill the evicted ones in order), `source` says which old slot each holds, and no slot
    is written twice."""
    from hf_multilora.eviction import in_place_moves

    g = torch.Generator().manual_seed(slots + kept)
    keep = torch.stack([torch.randperm(slots, generator=g)[:kept] for _ in range(6)]).view(2, 3, kept)
    source, move_from, to = in_place_moves(keep, slots)
    assert to.shape[-1] == move_from.shape[-1] == min(kept, slots - kept)  # a prompt's 80% evicted: kept pairs
    data = torch.arange(slots).expand(2, 3, slots).clone()
    for row in range(2):
        for head in range(3):
            assert len(set(to[row, head].tolist())) == to.shape[-1]  # no slot written twice
    data.scatter_(-1, to, data.gather(-1, move_from))
    assert torch.equal(data[..., :kept], source)
    assert torch.equal(source.sort(-1).values, keep.sort(-1).values)
    for row in range(2):
        for head in range(3):
            for j in keep[row, head][keep[row, head] < kept].tolist():
                assert source[row, head, j] == j  # a kept slot below the new length does not move


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3)])
def test_probabilities_kernel_adds_what_the_reference_adds(heads, kv_heads):
    """add_attention_probs (one launch per decode step and layer) against its torch reference: random
    logits past 1024 slots (two tiles), masked keys, a fully masked row, rows of other lengths, and
    nothing read or written past a row's length (NaN there, scores past it unchanged)."""
    from hf_multilora.kernels.attention_scores import add_attention_probs, add_attention_probs_torch

    g = torch.Generator().manual_seed(11)
    rows, width = 4, 1100
    logits = torch.randn(rows, heads, width, generator=g) * 3
    logits[torch.rand(rows, heads, width, generator=g) < 0.2] = float("-inf")
    logits[2] = float("-inf")  # a row attending to nothing
    kv_lens = torch.tensor([1100, 7, 1030, 0], dtype=torch.int32)
    for r, n in enumerate(kv_lens.tolist()):
        logits[r, :, n:] = float("nan")  # never written by the attention
    scores = torch.rand(rows + 2, kv_heads, width + 5, generator=g)  # a lent buffer: more rows and slots
    expected = scores.clone()
    add_attention_probs_torch(expected, logits, kv_lens)
    got = scores.to(DEVICE)
    add_attention_probs(got, logits.to(DEVICE), kv_lens.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(expected[0], scores[0]) and torch.equal(expected[2], scores[2])


def kept_mask_attention(masks, kv_dtype, prompt, stored):
    """An attention function for the reference: each (layer, KV head, query) sees the keys masks[layer]
    [batch, kv_heads, queries, keys] allows. With a quantized cache, a decode query (position >=
    prompt) reads earlier keys and values as dequant(quant(x)) and its own exactly, as the paged
    cache does; the prompt's queries read the prompt exactly (it is attended in flight). x is what
    the tested cache was given (`stored[layer]`), not the reference's own K/V: those differ by
    rounding (other kernels, other GEMM shapes), and a value next to a quantization step then lands
    on the other side of it (2.3e-4 off on the H200 when the reference quantized its own)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group, device = query.shape[1] // key.shape[1], query.device
        allowed = masks[module.layer_idx].to(device).repeat_interleave(group, 1)
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        n = key.shape[2]
        exact = torch.ones(n, n, dtype=torch.bool, device=device)
        if kv_dtype is not None:  # from the pages: earlier keys of decode queries
            exact = (torch.arange(n, device=device)[:, None] < prompt) | torch.eye(n, dtype=torch.bool, device=device)
            stored_key, stored_value = (
                dequantize(*quantize(x.to(device), kv_dtype), kv_dtype).repeat_interleave(group, 1)
                for x in stored[module.layer_idx]
            )
        else:
            stored_key, stored_value = key, value
        scores = torch.where(exact, query @ key.transpose(-1, -2), query @ stored_key.transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        out = torch.where(exact, probs, 0) @ value + torch.where(exact, 0, probs) @ stored_value
        return out.transpose(1, 2).contiguous(), None

    return attention


def sharp(base):
    """The zoo's model with sharper attention (q and k scaled up): its random weights otherwise attend
    almost uniformly, and every layer and head would keep the same tokens."""
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight *= 4
            layer.self_attn.k_proj.weight *= 4
    return base


class Decoded(NamedTuple):
    logits: torch.Tensor  # [batch, steps, vocab]
    tokens: torch.Tensor  # [batch, prompt + steps]
    seen: list[torch.Tensor]  # per layer: bool [batch, kv_heads, queries, keys], what each query attended to
    evicted: int  # tokens per row (0 without eviction)
    pages: int  # the cache's pages before its release
    stored: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: the K/V the cache was given [batch, kv_heads, n, dim]


def decode_with_eviction(base, ids, mask, steps, **cache_kwargs) -> Decoded:
    """Greedy decode through a PagedCache with eviction."""
    pool = PagePool(600, 512, base.dtype, base.device)  # small pages: blocks of 4 to ~20 tokens, many compactions
    cache = PagedCache(pool, base.config, **cache_kwargs)
    batch, prompt = ids.shape
    total = prompt + steps
    layers = base.config.num_hidden_layers
    given = [([], []) for _ in range(layers)]
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        given[layer_idx][0].append(key_states.clone())
        given[layer_idx][1].append(value_states.clone())
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = recording_update
    kv_heads = base.config.num_key_value_heads
    seen = [torch.zeros(batch, kv_heads, total, total, dtype=torch.bool) for _ in range(layers)]
    for layer in range(layers):  # the prompt attends causally
        seen[layer][:, :, :prompt, :prompt] = torch.ones(prompt, prompt, dtype=torch.bool).tril()
    logits, tokens = [], ids
    with torch.no_grad(), paged_attention_in(base):
        out = base(input_ids=ids, attention_mask=mask, **{_cache_keyword(base): cache}, use_cache=True).logits[:, -1]
        for t in range(prompt, total):
            logits.append(out)
            tokens = torch.cat([tokens, out.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], 1)
            if t == total - 1:
                break
            out = base(input_ids=tokens[:, -1:], attention_mask=mask, **{_cache_keyword(base): cache}, use_cache=True,
                       cache_position=torch.tensor([t], device=ids.device)).logits[:, -1]  # fmt: skip
            for layer in range(layers if cache.eviction is not None else 0):
                positions = cache.kept_positions(layer)  # [batch, kv_heads, slots], this token's included
                seen[layer][:, :, t].scatter_(-1, positions.cpu(), True)
    evicted = cache._evicted if cache.eviction is not None else 0
    pages = len(cache._pages_of(cache._host))
    cache.release()
    stored = [(torch.cat(keys, 2), torch.cat(values, 2)) for keys, values in given]
    return Decoded(torch.stack(logits, 1), tokens, seen, evicted, pages, stored)


@pytest.mark.parametrize("kernels, kv_dtype", [("torch", None), ("triton", None), ("torch", "int4"),
                                              ("triton", "int4"), ("torch", "fp8")])  # fmt: skip
def test_eviction_equals_dense_attention_with_the_evicted_tokens_masked(llama_zoo, monkeypatch, kernels, kv_dtype):
    """Each decode step attends (per layer and KV head) to what the cache kept: its logits are a dense
    model's whose attention masks every other token, including the left padding (and, with quantized
    pages, reads the past dequantized); tokens really were evicted, by more than one compaction, and
    layers and heads kept different ones. (FP8 on the interpreter does not round as a GPU does: its
    Triton path runs under -m gpu.)"""
    monkeypatch.setenv("HF_MULTILORA_KERNELS", kernels)
    base = sharp(llama_zoo.fresh_base()).to(DEVICE if kernels == "triton" else "cpu")
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    run = decode_with_eviction(base, ids.to(base.device), mask.to(base.device), 40, kv_budget=0.3, kv_recent=4,
                               kv_dtype=kv_dtype)  # fmt: skip
    got, tokens, seen = run.logits.cpu(), run.tokens.cpu(), run.seen
    assert run.evicted > 20
    last = [layer_seen[:, :, -2] for layer_seen in seen]  # what each layer and head kept at the last step
    assert not torch.equal(last[0], last[1]) and not torch.equal(last[0][:, 0], last[0][:, 1])
    real = torch.cat([mask, torch.ones(2, 40, dtype=mask.dtype)], 1).bool()
    masks = []
    for layer_seen in seen:
        allowed = layer_seen & real[:, None, None, :]
        # padding queries (not compared) see themselves: no all-masked rows
        allowed |= (~real)[:, None, :, None] & torch.eye(real.shape[1], dtype=torch.bool)
        masks.append(allowed[:, :, :-1, :-1])  # the last token is not fed back
    assert not all(m[:, :, -1].all(-1).all() for m in masks)  # something is masked at the last step
    AttentionInterface.register("kept_mask_reference", kept_mask_attention(masks, kv_dtype, ids.shape[1], run.stored))
    reference_model = sharp(llama_zoo.fresh_base()).to(base.device)  # the same device: the kernels are compared
    set_attention(reference_model, "kept_mask_reference")
    with torch.no_grad():
        reference = reference_model(input_ids=tokens[:, :-1].to(base.device), use_cache=False).logits[:, 19:].cpu()
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_the_first_decode_step_evicts_to_the_budget_off_a_block_boundary(llama_zoo, kv_dtype):
    """SnapKV compresses the prompt at once. Waiting for a block boundary let a row attend to its whole
    prompt for up to a block of steps (59 with Llama's int4 pages): a passkey read in 6 tokens then
    never met eviction. A 23-token prompt ends on no block boundary here (blocks of 4 to ~20)."""
    base = llama_zoo.fresh_base()
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(6))
    run = decode_with_eviction(base, ids, torch.ones_like(ids), 2, kv_budget=0.3, kv_recent=4, kv_dtype=kv_dtype)
    assert run.evicted == 23 - math.ceil(0.3 * 23)


def test_budget_one_is_the_unevicted_cache_and_a_budget_frees_pages(llama_zoo):
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    ids = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(5))
    kwargs = dict(adapter_ids=["attn_r8", None, "qv_r4"], max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, kv_budget=1.0, **kwargs), model.generate(ids, **kwargs))
    free = model.page_pool().num_free
    evicting = model.generate(ids, kv_budget=0.25, kv_recent=4, **kwargs)
    assert model.page_pool().num_free == free and not torch.equal(evicting, model.generate(ids, **kwargs))
    base = llama_zoo.fresh_base()
    pages_all = decode_with_eviction(base, ids, torch.ones_like(ids), 41).pages
    pages_kept = decode_with_eviction(base, ids, torch.ones_like(ids), 41, kv_budget=0.25, kv_recent=4).pages
    assert pages_kept < pages_all


def test_a_prompt_is_scored_from_its_last_queries_max_pooled():
    """SnapKV: a prompt slot's score is the attention the last SNAP_WINDOW queries paid it, summed over
    the KV head's query heads, then the largest over SNAP_POOL neighbouring slots."""
    batch, heads, kv_heads, n, dim, scale = 2, 4, 2, SNAP_WINDOW + 9, 8, 0.3
    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(batch, heads, n, dim, generator=g), torch.randn(batch, kv_heads, n, dim, generator=g)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, :6] = False  # row 1: left padding
    hitters = HeavyHitters(KvBudget(0.5, 2), layers=1, kv_heads=kv_heads)
    hitters.slot_mask(key, mask, n, n)
    hitters.add_prefill(0, query, key, mask, scale)
    group, half = heads // kv_heads, SNAP_POOL // 2
    for b in range(batch):
        for kv in range(kv_heads):
            mass = torch.zeros(n)
            for h in range(kv * group, (kv + 1) * group):
                for q in range(n - SNAP_WINDOW, n):
                    allowed = [j for j in range(q + 1) if mask[b, j]]
                    logits = torch.stack([query[b, h, q] @ key[b, kv, j] * scale for j in allowed])
                    mass[allowed] += torch.softmax(logits, 0)
            pooled = torch.stack([mass[max(0, j - half) : j + half + 1].max() for j in range(n)])
            torch.testing.assert_close(hitters.scores[0][b, kv, :n], pooled)


def test_a_kept_prompt_token_keeps_its_neighbours():
    """The window's attention finds an answer's first token; pooling keeps the tokens around it too
    (a passkey's later digits), where the raw scores keep that token alone."""
    n, dim, needle = 48, 8, 8
    query = torch.zeros(1, 1, n, dim)
    query[..., 0] = 1.0
    key = 0.1 * torch.randn(1, 1, n, dim, generator=torch.Generator().manual_seed(4))
    key[0, 0, needle, 0] = 20.0  # every window query attends to the needle
    hitters = HeavyHitters(KvBudget(0.25, 2), layers=1, kv_heads=1)  # keeps 12 of 48: 2 recent + 10
    hitters.slot_mask(key, None, n, n)
    hitters.add_prefill(0, query, key, None, 1.0)
    kept = set(hitters.keep(n, n)[0, 0, 0].tolist())
    assert set(range(needle - SNAP_POOL // 2, needle + SNAP_POOL // 2 + 1)) <= kept


def test_a_prefill_scores_the_prompt(llama_zoo):
    base = llama_zoo.fresh_base()
    ids = torch.randint(3, 128, (1, SNAP_WINDOW + 8), generator=torch.Generator().manual_seed(6))
    cache = PagedCache(MultiLoraModel(base).page_pool(), base.config, kv_budget=0.5)
    with torch.no_grad(), paged_attention_in(base):
        base(input_ids=ids, **{_cache_keyword(base): cache}, use_cache=True)
    for scores in cache.eviction.scores:
        assert scores[0, :, : ids.shape[1]].min() > 0 and scores[0, :, ids.shape[1] :].abs().max() == 0
    cache.release()


def test_what_eviction_refuses(llama_zoo, mistral_zoo):
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base(), adapters=llama_zoo.paths)
    ids = torch.randint(3, 128, (1, 8))
    free = model.page_pool().num_free
    cases = [
        (dict(kv_budget=0.0), "kv_budget must be a fraction"),
        (dict(kv_budget=0.5, kv_recent=-2), "kv_recent must be a count"),
        (dict(kv_budget=0.5, paged_cache=False), "applies to the paged cache"),
        (dict(kv_budget=0.5, num_beams=2), "beam search"),
        (dict(kv_budget=0.5, prompt_lookup_num_tokens=3), "assisted decoding"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(ids, max_new_tokens=4, pad_token_id=0, **kwargs)
    mistral = MultiLoraModel.from_pretrained(mistral_zoo.fresh_base(), adapters=mistral_zoo.paths)
    with pytest.raises(ValueError, match="sliding-window"):
        mistral.generate(ids, max_new_tokens=4, pad_token_id=0, kv_budget=0.5)
    assert model.page_pool().num_free == free  # refused before any page was taken
    cache = PagedCache(model.page_pool(), model.base_model.config, kv_budget=0.5)
    with torch.no_grad(), paged_attention_in(model.base_model):
        model.base_model(input_ids=ids, **{_cache_keyword(model.base_model): cache}, use_cache=True)
        with pytest.raises(NotImplementedError, match="one token per row"):
            model.base_model(input_ids=ids[:, :2], **{_cache_keyword(model.base_model): cache}, use_cache=True)
    for call in (lambda: cache.batch_select_indices([0]), lambda: cache.crop(-1)):
        with pytest.raises(NotImplementedError, match="heavy-hitter eviction"):
            call()
    cache.release()
    assert model.page_pool().num_free == free


@interpreter_only("the model on the CPU with Triton kernels")
@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_begun_steps_evict_as_eager_steps_do(llama_zoo, monkeypatch, kv_dtype):
    """Decode steps begun ahead of their forward, as a CUDA graph replays them (a compaction due runs in
    begin_step; positions and the slot mask are noted there; the step's scores go into a lent buffer
    of the step's rows, padding rows included): every step's logits, scores and kept positions are
    the eager evicting cache's, across compactions, with the step buffers at fixed addresses; a second
    cache adopts the first's buffers."""
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")  # begun steps store K/V through the Triton kernels
    base = sharp(llama_zoo.fresh_base())
    pool = PagePool(600, 512, base.dtype, base.device)  # small pages: blocks of 4 tokens in the model's dtype
    keyword, steps, lent = _cache_keyword(base), 9 if kv_dtype is None else 4, None
    for batch, seed in [(3, 7), (4, 8)]:
        ids = torch.randint(3, 128, (batch, 14), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        mask[1, :3], ids[1, :3] = 0, 0
        kwargs = dict(kv_dtype=kv_dtype, kv_budget=0.3, kv_recent=4)
        stepped, eager = PagedCache(pool, base.config, **kwargs), PagedCache(pool, base.config, **kwargs)
        stepped.reserve(ids.shape[1] + steps)
        compactions = set()
        with torch.no_grad(), paged_attention_in(base):
            base(input_ids=ids, attention_mask=mask, **{keyword: stepped})
            out_e = base(input_ids=ids, attention_mask=mask, **{keyword: eager})
            stepped.adopt(lent, rows=4)
            lent = stepped.step_state()
            addresses = [t.data_ptr() for t in stepped.step_buffers()]
            assert len(addresses) == 4 and addresses == [t.data_ptr() for t in (*lent[:3], lent.scores)]
            for step in range(steps):
                token = out_e.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                evicted = stepped._evicted
                out_s = begun_step(base, stepped, token, mask, rows=4, keyword=keyword)
                out_e = base(input_ids=token, attention_mask=mask, position_ids=last_positions(mask), **{keyword: eager})
                if stepped._evicted != evicted:
                    compactions.add(step)
                torch.testing.assert_close(out_s.logits[:batch], out_e.logits, rtol=1e-5, atol=1e-5, msg=f"step {step}")
                assert stepped._evicted == eager._evicted and stepped._lens == eager._lens
                slots = eager._lens[0]
                torch.testing.assert_close(stepped.eviction.scores[..., :slots], eager.eviction.scores[..., :slots])
                for layer in range(base.config.num_hidden_layers):
                    assert torch.equal(stepped.kept_positions(layer), eager.kept_positions(layer)), f"step {step}"
                assert [t.data_ptr() for t in stepped.step_buffers()] == addresses, f"step {step}: buffers moved"
        assert compactions and (kv_dtype is not None or len(compactions) > 1), compactions
        stepped.release()
        eager.release()
    assert pool.num_free == pool.num_pages
