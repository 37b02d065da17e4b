"""The engine's batched sampler against HF's logits warpers, applied row by row (CPU)."""

from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hf_multilora.serving import RequestError, SamplingParams
from hf_multilora.serving.sampling import next_tokens, warped_probs

# temperature, top_k, top_p: every warper alone, combined, off, k past the vocabulary, k = 1
ROWS = [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.5, 3, 0.5), (1.0, 60, 0.9), (2.0, 1, 1.0), (1.0, 8, 0.95),
        (0.9, 0, 0.3)]  # fmt: skip


def hf_probs(logits_row, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits_row[None].clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)[0]


def request(temperature, top_k=0, top_p=1.0, seed=None):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SimpleNamespace(params=params, generator=generator)


def test_warped_probs_equal_hf_warpers_row_by_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ROWS), 50, generator=gen) * 3
    logits[:, 10:14] = logits[:, 9:10]  # ties at every row's tenth token
    probs, order = warped_probs(logits, [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in ROWS])
    unsorted = torch.empty_like(probs).scatter_(1, order, probs)
    plain, no_order = warped_probs(logits[:1], [SamplingParams(temperature=0.7)])  # no top-k or top-p: unsorted
    assert no_order is None and torch.allclose(plain[0], hf_probs(logits[0], 0.7, 0, 1.0))
    for row, (temperature, top_k, top_p) in enumerate(ROWS):
        expected = hf_probs(logits[row], temperature, top_k, top_p)
        torch.testing.assert_close(unsorted[row], expected, atol=1e-6, rtol=1e-5, msg=f"row {row}: {ROWS[row]}")
        assert torch.equal(unsorted[row] > 0, expected > 0), f"row {row}: a different set of tokens kept"


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 3, 1.0), (1.5, 0, 0.7)])
def test_draws_follow_the_warped_probabilities(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])
    draws = 20000
    generator = torch.Generator().manual_seed(1)
    tokens = next_tokens(logits.expand(draws, -1), [request(temperature, top_k, top_p)] * draws, generator)
    counts = torch.bincount(tokens, minlength=logits.numel()).double()
    p = hf_probs(logits, temperature, top_k, top_p).double()
    assert torch.all(counts[p == 0] == 0)
    sigma = (draws * p * (1 - p)).sqrt()
    assert torch.all((counts - draws * p).abs() <= 5 * sigma + 1), (counts.tolist(), (draws * p).tolist())


def test_greedy_rows_take_the_argmax_and_seeded_rows_ignore_their_neighbours():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 40, generator=gen)

    def seeded():
        return request(0.9, 20, 0.9, seed=7)

    row = seeded()
    alone = [next_tokens(logits[2:3], [row]).item() for _ in range(6)]
    row, shared = seeded(), torch.Generator().manual_seed(3)
    batch = [request(0), request(1.0), row, request(0), request(0.5, top_p=0.5)]
    crowded = [next_tokens(logits, batch, shared) for _ in range(6)]
    assert [tokens[2].item() for tokens in crowded] == alone
    greedy = logits.argmax(dim=-1)
    for tokens in crowded:
        assert tokens[0] == greedy[0] and tokens[3] == greedy[3]
    assert len({tuple(t.tolist()) for t in crowded}) > 1  # the sampled rows do draw


def penalized(presence=0.0, frequency=0.0, bias=(), temperature=0):
    params = SamplingParams(temperature=temperature, presence_penalty=presence, frequency_penalty=frequency,
                            logit_bias=dict(bias))  # fmt: skip
    return SimpleNamespace(params=params, generator=None, output_counts=None)


def test_penalties_and_logit_bias_count_every_token_drawn_so_far():
    """OpenAI's formula, row by row, over four steps of next_tokens: the counts the sampler keeps on the
    device are the row's outputs so far; rows without penalties keep none."""
    gen = torch.Generator().manual_seed(4)
    rows = [penalized(presence=0.7), penalized(frequency=1.5), penalized(0.3, -0.4, {3: 5.0, 7: -100.0}),
            penalized(bias={0: 2.5}), SimpleNamespace(params=SamplingParams(temperature=0), generator=None,
                                                      output_counts=None)]  # fmt: skip
    outputs = [[] for _ in rows]
    for _ in range(4):
        logits = torch.randn(len(rows), 12, generator=gen)
        logits[:, 5] += 3  # a favourite, so that outputs repeat it
        expected = logits.clone()
        for i, request in enumerate(rows):
            p = request.params
            counts = torch.bincount(torch.tensor(outputs[i], dtype=torch.long), minlength=12).float()
            expected[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            for token, bias in p.logit_bias:
                expected[i, token] += bias
        tokens = next_tokens(logits, rows).tolist()
        assert tokens == expected.argmax(dim=-1).tolist()
        for i, token in enumerate(tokens):
            outputs[i].append(token)
    for i, request in enumerate(rows):
        if request.params.penalized:
            assert request.output_counts.tolist() == torch.bincount(torch.tensor(outputs[i]), minlength=12).float().tolist()
        else:
            assert request.output_counts is None
    assert 7 not in outputs[2] and outputs[0].count(5) > 1  # a repeat that presence and frequency tell apart


def test_bad_penalties_and_logit_bias_are_refused():
    with pytest.raises(RequestError, match="presence_penalty=3"):
        SamplingParams(presence_penalty=3)
    with pytest.raises(RequestError, match=r"frequency_penalty=-2\.5"):
        SamplingParams(frequency_penalty=-2.5)
    for bad in ({-1: 1.0}, {5: 101}, {"5": 1.0}, 7):
        with pytest.raises(RequestError, match="logit_bias must map token ids"):
            SamplingParams(logit_bias=bad)
    assert SamplingParams(logit_bias={9: -1, 2: 3.5}).logit_bias == ((2, 3.5), (9, -1))
