"""PagedCache + the registered paged attention, checked against transformers' own DynamicCache (sdpa).

Tiny seeded models (Llama: MHA, Qwen2: GQA, Mistral: GQA + a sliding window shorter than the prompts),
ragged left-padded prompts crossing several blocks of BLOCK tokens.
"""

import copy
import gc

import pytest
import torch
from conftest import DEVICE, EndRowsAt, build_base
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from hf_multilora import PoolExhaustedError
from hf_multilora.cache import PAGED_ATTENTION, PagedCache, ReleaseFinishedRows, use_paged_attention
from hf_multilora.memory.page_pool import PagePool

VOCAB, PAD, EOS, BLOCK, LAYERS, HEAD_DIM, NEW = 128, 0, 1, 4, 2, 16, 9
PAGE_ELEMS = 2 * BLOCK * 4 * HEAD_DIM  # K and V of BLOCK tokens with up to 4 KV heads
# Mistral's window must be shorter than the prompts to be exercised.
OVERRIDES = {"llama": {}, "qwen2": {}, "mistral": dict(sliding_window=5)}
MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sample": dict(do_sample=True, top_k=0, num_return_sequences=2),
}


@pytest.fixture(scope="module")
def models():
    """kind -> (reference model on sdpa + DynamicCache, the same weights on PAGED_ATTENTION)."""
    built = {}

    def get(kind):
        if kind not in built:
            reference = build_base(kind, attn_implementation="sdpa", **OVERRIDES[kind]).to(DEVICE)
            paged = copy.deepcopy(reference)
            use_paged_attention(paged)
            assert paged.config._attn_implementation == PAGED_ATTENTION
            assert reference.config._attn_implementation == "sdpa"
            built[kind] = reference, paged
        return built[kind]

    return get


def make_pool(num_pages: int = 256) -> PagePool:
    return PagePool(num_pages, PAGE_ELEMS, torch.float32, DEVICE)


def used(pool: PagePool) -> int:
    return pool.num_pages - pool.num_free


def ragged_prompts(lengths=(13, 6, 10), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


def stored_pages(mask: torch.Tensor, length: int, copies: int = 1) -> int:
    """Pages a cache of `length` tokens per row holds for left-padded rows (each row `copies` times):
    blocks of padding alone share one discard page."""
    padding_blocks = ((mask == 0).sum(1) // BLOCK).sum().item()
    assert padding_blocks > 0, "the prompts should exercise padding blocks"
    return LAYERS * copies * (mask.shape[0] * blocks(length) - padding_blocks) + 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", OVERRIDES)
def test_generate_matches_dynamic_cache(models, kind, mode):
    check_generate(models, kind, mode)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test; on CUDA the tests above use the kernels"
)
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_triton_kernels_in_the_interpreter(models, monkeypatch, mode):
    """write_kv and paged_attention through Triton (interpreted on CPU) in generate: GQA + sliding window."""
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    check_generate(models, "mistral", mode)


def check_generate(models, kind: str, mode: str) -> None:
    """generate() with a PagedCache equals generate() with DynamicCache on sdpa: tokens, logits, pages."""
    reference, paged = models(kind)
    ids, mask = ragged_prompts()
    kwargs = dict(
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_logits=True,
        **MODES[mode],
    )
    torch.manual_seed(1)
    expected = reference.generate(ids, attention_mask=mask, **kwargs)
    pool = make_pool()
    cache = PagedCache(pool, paged.config, block_size=BLOCK)
    torch.manual_seed(1)
    got = paged.generate(ids, attention_mask=mask, past_key_values=cache, **kwargs)

    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits) == NEW
    for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"logits of step {step}")
    length = ids.shape[1] + NEW - 1  # the last token is never fed back
    assert cache.get_seq_length() == length
    copies = max(MODES[mode].get("num_beams", 1), MODES[mode].get("num_return_sequences", 1))
    stored = stored_pages(mask, length, copies)
    if mode == "beam":  # beams share their common blocks
        assert 0 < used(pool) <= stored
    else:
        assert used(pool) == stored
    cache.release()
    assert pool.num_free == pool.num_pages
    if (
        mode == "greedy"
    ):  # the paged attention without a PagedCache (DynamicCache) falls back to dense attention
        torch.testing.assert_close(
            paged.generate(ids, attention_mask=mask, **kwargs).sequences, expected.sequences
        )


class PagesInUse(StoppingCriteria):
    """Records the pool's used pages after every step; stops nothing."""

    def __init__(self, pool: PagePool) -> None:
        self.pool, self.seen = pool, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.seen.append(used(self.pool))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_finished_rows_give_their_pages_back(models, mode):
    """Rows that end on EOS early: same tokens as DynamicCache (and the same logits while they run),
    their pages back in the pool while the longest row goes on, nothing leaked."""
    reference, paged = models("qwen2")
    ids, mask = ragged_prompts()  # 13, 6 and 10 tokens
    ends = [2, 10, 5]
    kwargs = dict(
        max_new_tokens=14,
        eos_token_id=EOS,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_logits=True,
        do_sample=mode == "sample",
        logits_processor=LogitsProcessorList([EndRowsAt(ids.shape[1], ends, EOS)]),
    )
    torch.manual_seed(1)
    expected = reference.generate(ids, attention_mask=mask, **kwargs)
    pool = make_pool()
    cache = PagedCache(pool, paged.config, block_size=BLOCK)
    watch = PagesInUse(pool)
    criteria = StoppingCriteriaList([ReleaseFinishedRows(cache, EOS), watch])
    torch.manual_seed(1)
    got = paged.generate(ids, attention_mask=mask, past_key_values=cache, stopping_criteria=criteria, **kwargs)

    assert torch.equal(got.sequences, expected.sequences)
    assert got.sequences.shape[1] == ids.shape[1] + max(ends) + 1
    for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
        live = torch.tensor(ends) >= step
        torch.testing.assert_close(a[live], b[live], rtol=1e-4, atol=1e-4, msg=f"logits of step {step}")
    length = ids.shape[1] + max(ends)
    assert used(pool) == LAYERS * (blocks(length) - 7 // BLOCK) + 1  # row 1 (7 padding tokens) + discard
    assert any(later < earlier for earlier, later in zip(watch.seen, watch.seen[1:], strict=False))
    cache.release()
    assert pool.num_free == pool.num_pages


def scribble_on_free_pages(pool: PagePool, seed: int) -> None:
    """What another user of the pool may do at any time: take every free page and write to it."""
    pages = pool.allocate(pool.num_free, "kv")
    gen = torch.Generator().manual_seed(seed)
    storage = pool.storage.view(pool.num_pages, pool.page_elems)
    storage[pages] = torch.randn(len(pages), pool.page_elems, generator=gen).to(storage)
    pool.free(pages)


def test_a_finished_row_keeps_the_pages_it_shares_with_live_rows(models):
    """Rows repeated from one prompt share its full blocks; the release of one that finished (at the next
    block boundary) frees only its own pages: the live rows' logits stay those of a cacheless forward of
    their sequence, even with every free page overwritten after each step."""
    reference, paged = models("llama")
    pool = make_pool(64)
    cache = PagedCache(pool, paged.config, block_size=BLOCK)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, VOCAB, (1, 2 * BLOCK + 1), generator=gen).to(DEVICE)  # two full blocks
    following = torch.randint(3, VOCAB, (3, 2 * BLOCK), generator=gen).to(DEVICE)  # a token a row per step
    with torch.no_grad():
        paged(prompt, past_key_values=cache)
        cache.batch_repeat_interleave(3)
        for step in range(following.shape[1]):
            logits = paged(following[:, step : step + 1], past_key_values=cache).logits[:, -1]
            if step == 0:
                cache.mark_finished(torch.tensor([False, True, False]))
            scribble_on_free_pages(pool, seed=step)
            for row in (0, 2):
                ids = torch.cat([prompt, following[row : row + 1, : step + 1]], dim=1)
                expected = reference(ids).logits[0, -1]
                torch.testing.assert_close(
                    logits[row], expected, rtol=1e-4, atol=1e-4, msg=f"step {step} row {row}"
                )
    length = prompt.shape[1] + following.shape[1]
    assert used(pool) == LAYERS * (2 + 2 * (blocks(length) - 2)) + 1  # shared + the live rows' own + discard
    cache.release()
    assert pool.num_free == pool.num_pages


def test_finished_rows_are_refused_under_beam_search(models):
    _, paged = models("llama")
    ids, mask = ragged_prompts()
    cache = PagedCache(make_pool(), paged.config, block_size=BLOCK)
    with pytest.raises(RuntimeError, match="not beam search"):
        paged.generate(
            ids,
            attention_mask=mask,
            past_key_values=cache,
            num_beams=2,
            max_new_tokens=3,
            pad_token_id=PAD,
            stopping_criteria=StoppingCriteriaList([ReleaseFinishedRows(cache, EOS)]),
        )
    with pytest.raises(ValueError, match="token ids"):
        ReleaseFinishedRows(cache, [])
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        cache.note_attention_mask(mask[0])


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_crop_and_copy_on_write(models, kind):
    """Rows sharing pages, then cropped into a shared block, then appending different tokens."""
    reference, paged = models(kind)
    pool = make_pool()
    cache = PagedCache(pool, paged.config, block_size=BLOCK)
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        paged(prompt, past_key_values=cache)
        cache.batch_repeat_interleave(2)  # two rows, both full blocks shared
        assert used(pool) == LAYERS * 2
        for crop, kept, pages in [
            (-2, 6, LAYERS * 3),
            (3, 3, LAYERS * 2),
        ]:  # the partial last block is copied
            cache.crop(crop)
            assert cache.get_seq_length() == kept and used(pool) == pages
            following = torch.tensor([[5, 6], [7, 8]], device=DEVICE)
            logits = paged(following, past_key_values=cache).logits
            for row in range(2):
                ids = torch.cat([prompt[:, :kept], following[row : row + 1]], dim=1)
                expected = reference(ids).logits[0, -2:]
                torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4, msg=f"row {row}")
            cache.crop(-2)
        cache.crop(0)
        assert cache.get_seq_length() == 3
    cache.release()
    assert pool.num_free == pool.num_pages


def test_pool_exhaustion_leaves_cache_and_pool_consistent(models):
    reference, paged = models("qwen2")
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    kwargs = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=PAD)

    pool = make_pool(3)  # the prefill needs LAYERS * 2 rows * 2 blocks = 8 pages
    cache = PagedCache(pool, paged.config, block_size=BLOCK)
    with pytest.raises(PoolExhaustedError) as error:
        paged.generate(ids, past_key_values=cache, **kwargs)
    assert (error.value.needed, error.value.available) == (8, 3)
    assert pool.num_free == 3 and cache.get_seq_length() == 0

    pool = make_pool(10)  # the prefill fits, the first decode step needs a third block: 4 pages, 2 free
    cache = PagedCache(pool, paged.config, block_size=BLOCK)
    with pytest.raises(PoolExhaustedError) as error:
        paged.generate(ids, past_key_values=cache, **kwargs)
    assert (error.value.needed, error.value.available) == (4, 2)
    assert pool.num_free == 2 and [cache.get_seq_length(i) for i in range(LAYERS)] == [8] * LAYERS
    cache.release()
    assert pool.num_free == 10

    cache = PagedCache(pool, paged.config, block_size=BLOCK)  # the pool is usable again
    short = dict(kwargs, max_new_tokens=4, min_new_tokens=4)  # 4 + 3 tokens: 2 blocks, 8 pages
    got = paged.generate(ids[:, :4], past_key_values=cache, **short)
    assert torch.equal(got, reference.generate(ids[:, :4], **short))
    cache.release()
    assert pool.num_free == 10


def test_release_is_idempotent_and_runs_on_garbage_collection(models):
    _, paged = models("llama")
    pool = make_pool()
    cache = PagedCache(pool, paged.config, block_size=BLOCK)
    ids, mask = ragged_prompts()
    with torch.no_grad():
        paged(ids, attention_mask=mask, past_key_values=cache)
        assert used(pool) == stored_pages(mask, ids.shape[1])
        cache.release()
        cache.release()
        assert pool.num_free == pool.num_pages and cache.get_seq_length() == 0
        paged(ids, attention_mask=mask, past_key_values=cache)  # usable after release
        assert used(pool) > 0
    del cache
    gc.collect()
    assert pool.num_free == pool.num_pages


def test_misuse_is_reported(models):
    reference, paged = models("llama")
    pool = make_pool()
    ids = torch.randint(3, VOCAB, (1, 5)).to(DEVICE)
    with pytest.raises(RuntimeError, match="use_paged_attention"), torch.no_grad():
        reference(ids, past_key_values=PagedCache(pool, reference.config, block_size=BLOCK))  # model on sdpa
    gqa = models("qwen2")[1].config  # 2 KV heads of 16: 64 elements per token
    assert PagedCache(pool, gqa).block_size == 8  # default: the largest power of two fitting a page
    with pytest.raises(ValueError, match="fit in a page"):
        PagedCache(PagePool(4, 32, torch.float32, DEVICE), paged.config)
    gc.collect()
    assert pool.num_free == pool.num_pages
