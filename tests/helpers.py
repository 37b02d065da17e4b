"""Builders several test files share (conftest.py keeps the fixtures)."""

import socket

import torch
from conftest import VOCAB


def prompts(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids [rows, length] of the zoo's vocabulary, seeded."""
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
