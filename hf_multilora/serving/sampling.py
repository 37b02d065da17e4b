"""Next tokens for the rows of one step, each with its own sampling parameters and random stream.

Greedy rows take the argmax of the logits as they are (as HF's greedy search does). Sampled rows
follow HF's order of logits warpers: temperature, then top-k, then top-p; each draws from its own
`torch.Generator`, so a seeded request gets the same tokens whatever shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .requests import Request


def next_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
    """logits [rows, vocab] of the last position; one token id per request."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, request in enumerate(requests):
        params = request.params
        if params.temperature == 0:
            tokens.append(greedy[row])
            continue
        scores = logits[row].float() / params.temperature
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1:
            scores = _top_p(scores, params.top_p)
        probs = torch.softmax(scores, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=request.generator)))
    return tokens


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's TopPLogitsWarper: drop the tokens outside the smallest set whose probability reaches
    top_p (the most likely token always stays)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - top_p
    remove[-1] = False
    return scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
