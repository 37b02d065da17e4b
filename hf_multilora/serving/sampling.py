"""Next tokens for the rows of one step, each with its own sampling parameters, in a few launches
for the whole batch.

Why batched: sampling row by row cost each sampled row about ten launches and a device sync (48
rows: ~15 ms of host time a step on a CPU, more than a 7B decode step's GPU time).

OpenAI's presence and frequency penalties and logit bias come first, for the rows that ask for
them (greedy ones too, as vLLM applies them): each penalized request keeps the counts of its
output tokens on the device (`Request.output_counts`, added to after every draw), so an output
token the host has not read yet (the engine's async scheduling) counts as well.

Greedy rows take the argmax of the logits as they are (as HF's greedy search does). Sampled rows
follow HF's logits warpers in HF's order, temperature, then top-k, then top-p, each row with its own
values, over one sort of the batch's scores. The draw inverts each row's cumulative distribution
at one uniform number (as torch.multinomial draws one sample): one random number a row, where the
exponential race (vLLM) needs one per token, which on a CPU cost more than the rest together. A
seeded request draws from its own `torch.Generator`, so it gets the same tokens whatever shares its
batch; the others draw from one generator, all at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..transfer import to_device, to_host
from .requests import Request, SamplingParams, TokenLogprob


def next_tokens(
    logits: torch.Tensor, requests: Sequence[Request], generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits [rows, vocab] of the last position -> the next token id of each request, int64 [rows] on
    logits' device. `generator`: the draws of sampled requests without a generator of their own."""
    adjusted = [i for i, r in enumerate(requests) if r.params.penalized or r.params.logit_bias]
    if adjusted:
        logits = adjusted_logits(logits, requests, adjusted)
    tokens = _with_sampled_rows(logits, requests, generator, logits.argmax(dim=-1))
    for i in adjusted:
        if requests[i].params.penalized:
            requests[i].output_counts.index_add_(0, tokens[i : i + 1], torch.ones(1, device=logits.device))
    return tokens


def adjusted_logits(logits: torch.Tensor, requests: Sequence[Request], rows: Sequence[int]) -> torch.Tensor:
    """logits [rows, vocab] with OpenAI's logit bias and presence / frequency penalties of the
    listed rows applied (float32, a copy)."""
    device, vocab = logits.device, logits.shape[-1]
    logits = logits.to(torch.float32, copy=True)
    bias = [(i, token, value) for i in rows for token, value in requests[i].params.logit_bias]
    if bias:
        at_row, token, value = zip(*bias, strict=True)
        logits.index_put_((to_device(at_row, device), to_device(token, device)), to_device(value, device, torch.float32),
                          accumulate=True)  # fmt: skip
    penalized = [i for i in rows if requests[i].params.penalized]
    if penalized:
        for i in penalized:
            if requests[i].output_counts is None:
                requests[i].output_counts = torch.zeros(vocab, device=device)
        counts = torch.stack([requests[i].output_counts for i in penalized])
        frequency = to_device([requests[i].params.frequency_penalty for i in penalized], device, torch.float32)
        presence = to_device([requests[i].params.presence_penalty for i in penalized], device, torch.float32)
        index = to_device(penalized, device)
        logits[index] -= frequency[:, None] * counts + presence[:, None] * (counts > 0)
    return logits


def _with_sampled_rows(
    logits: torch.Tensor, requests: Sequence[Request], generator: torch.Generator | None, tokens: torch.Tensor
) -> torch.Tensor:
    """`tokens` with the rows of sampled requests drawn from their warped distributions."""
    sampled = [i for i, r in enumerate(requests) if r.params.temperature > 0]
    if not sampled:
        return tokens
    device = logits.device
    rows = to_device(sampled, device)
    probs, order = warped_probs(logits[rows], [requests[i].params for i in sampled])
    uniform = torch.rand(len(sampled), 1, device=device, generator=generator)
    for j, i in enumerate(sampled):
        own = requests[i].generator
        if own is not None:
            uniform[j].uniform_(generator=own)
    # the first token whose cumulative sum passes u * total: never one of probability 0 (it adds nothing to
    # the sum), and u * total is kept below the total, which the last token of probability > 0 reaches
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1:]
    target = torch.minimum(uniform * total, total.nextafter(torch.zeros_like(total)))
    pick = torch.searchsorted(cumulative, target, right=True)
    tokens[rows] = (pick if order is None else order.gather(1, pick)).squeeze(1)
    return tokens


def warped_probs(
    logits: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper on logits [rows, vocab],
    each row with its params', as (probabilities [rows, vocab] over each row's tokens sorted by
    score, ascending; that order, token ids [rows, vocab]). Sorted, because top-k and top-p both read
    the sorted scores, and top-k leaves the order as it is: it only sends the lowest scores to -inf.
    Where no row has top-k or top-p, nothing is sorted (the sort is most of the cost on a CPU):
    (probabilities, None)."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = to_device([p.temperature for p in params], device, torch.float32)
    scores = logits.float() / temperature[:, None]
    if not any(0 < p.top_k < vocab or p.top_p < 1 for p in params):
        return scores.softmax(dim=-1), None
    top_k = to_device([p.top_k for p in params], device)
    top_p = to_device([p.top_p for p in params], device, torch.float32)
    scores, order = scores.sort(dim=-1, stable=True)
    kth = torch.where(top_k > 0, vocab - top_k.clamp(max=vocab), 0)  # the k-th largest; 0 keeps all
    scores = scores.masked_fill(scores < scores.gather(1, kth[:, None]), float("-inf"))
    # top-p: drop the tokens outside the smallest set whose probability reaches top_p (the most likely stays)
    drop = (scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p[:, None]) & (top_p < 1)[:, None]
    drop[:, -1] = False
    return scores.masked_fill(drop, float("-inf")).softmax(dim=-1), order


@dataclass
class StepLogprobs:
    """The log-probabilities of one step's rows that asked for them, computed on the device where the
    logits are and read with the step's tokens."""

    rows: list[int]  # the step's rows that asked
    values: torch.Tensor  # float32 [len(rows), 1 + k]: the chosen token's, then the k most likely tokens'
    top_ids: torch.Tensor  # int64 [len(rows), k]: those k tokens, the most likely first

    def to_host(self) -> StepLogprobs:
        """Copies in pinned host memory, queued behind the step (complete once the step's event is)."""
        return StepLogprobs(self.rows, to_host(self.values), to_host(self.top_ids))

    def per_row(self, requests: Sequence[Request]) -> list[TokenLogprob | None]:
        """Each row's TokenLogprob with its request's number of top tokens (None: it did not ask)."""
        entries: list[TokenLogprob | None] = [None] * len(requests)
        values, top_ids = self.values.tolist(), self.top_ids.tolist()
        for j, i in enumerate(self.rows):
            k = requests[i].params.logprobs
            top = tuple(zip(top_ids[j][:k], values[j][1 : 1 + k], strict=True))
            entries[i] = TokenLogprob(values[j][0], top)
        return entries


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, requests: Sequence[Request]) -> StepLogprobs | None:
    """logits [rows, vocab] as the model gave them, tokens int64 [rows] drawn from them -> the
    log-probabilities of the rows whose requests asked for them (None: no row did)."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return None
    k = min(max(requests[i].params.logprobs for i in rows), logits.shape[-1])
    index = to_device(rows, logits.device)
    log_probs = logits[index].float().log_softmax(dim=-1)
    top = log_probs.topk(k, dim=-1)
    return StepLogprobs(rows, torch.cat([log_probs.gather(1, tokens[index][:, None]), top.values], dim=1), top.indices)
