"""Builders several test files share (conftest.py keeps the fixtures)."""

import socket

import pytest
import torch
from conftest import VOCAB
from hf_multilora.app.service import BASE_CHOICE, Playground, Settings

from hf_multilora.graphs import _padded


def prompts(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids [rows, length] of the zoo's vocabulary, seeded."""
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def interpreter_only(why: str) -> pytest.MarkDecorator:
    """Skip where CUDA is present: the test runs Triton kernels on CPU tensors, which only the
    interpreter does (conftest sets it where CUDA is absent)."""
    return pytest.mark.skipif(torch.cuda.is_available(), reason=f"interpreter test: {why}")


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


GREEDY = Settings(max_new_tokens=12)
SAMPLED = Settings(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=7)


def make_playground(served_dir, adapters=("attn_r8", "qv_r4"), **kwargs) -> Playground:
    kwargs.setdefault("adapter_dir", served_dir / "adapters")
    return Playground.load(
        served_dir / "base", {name: served_dir / "adapters" / name for name in adapters}, **kwargs
    )


def direct_texts(playground: Playground, text: str, choices: list[str], settings: Settings) -> list[str]:
    """The same request as one plain MultiLoraModel.generate() call, decoded row by row."""
    tokenizer = playground.tokenizer
    batch = tokenizer([playground.prompt(text)] * len(choices), return_tensors="pt", padding=True)
    torch.manual_seed(settings.seed)
    out = playground.model.generate(
        **batch,
        adapter_ids=[None if c == BASE_CHOICE else c for c in choices],
        pad_token_id=tokenizer.pad_token_id,
        **settings.generate_kwargs(),
    )
    new = out[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]
