"""Builders several test files share (conftest.py keeps the fixtures)."""

import socket

import torch
from conftest import VOCAB

from hf_multilora.graphs import _padded


def prompts(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids [rows, length] of the zoo's vocabulary, seeded."""
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_positions(mask):
    """The position id of each row's last token under a left-padded mask [batch, tokens], as HF's
    generate() gives a decode step: [batch, 1]."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]


def begun_step(base, cache, token, mask, rows=None, keyword="cache", before=None):
    """One decode step as DecodeGraphs runs it, eagerly: `cache.begin_step(mask)` (mask [batch, tokens
    so far + 1]), `before(key_mask)` if given, the forward with rows padded to `rows` (a batch
    bucket) reading the fixed key mask, then `end_step`. Returns the forward's output."""
    positions = last_positions(mask)
    key_mask = cache.begin_step(mask)
    if before is not None:
        before(key_mask)
    rows = rows or token.shape[0]
    try:
        return base(input_ids=_padded(token, rows), attention_mask=key_mask[:, : mask.shape[1]],
                    position_ids=_padded(positions, rows), **{keyword: cache})  # fmt: skip
    finally:
        cache.end_step()
