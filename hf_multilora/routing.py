"""From what the user passes per row (`adapter_ids` / PEFT's `adapter_names`) to per-row adapters.

Everything here runs before any model work, so bad input fails fast and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


def resolve_adapter_ids(
    adapter_ids: Sequence[Any] | None,
    adapter_names: Sequence[Any] | None,
    known: Sequence[str],
    rows: int | None,
) -> list[str | None] | None:
    """One adapter name (or None for the base model) per row.

    Entries may be a registered name, its index in `known`, None or "__base__".
    """
    if adapter_ids is not None and adapter_names is not None:
        raise ValueError("pass adapter_ids or adapter_names, not both")
    ids = adapter_ids if adapter_ids is not None else adapter_names
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        # A set or dict would be accepted by list() in an order unrelated to the rows (a set's
        # order of strings changes with the hash seed), so only ordered sequences are.
        raise TypeError(
            f"adapter_ids must be a list or tuple with one entry per row, got {type(ids).__name__}"
        )
    ids = list(ids)
    if rows is not None and len(ids) != rows:
        raise ValueError(f"adapter_ids has {len(ids)} entries but the batch has {rows} rows")
    return [_resolve_one(i, entry, known) for i, entry in enumerate(ids)]


def _resolve_one(row: int, entry: Any, known: Sequence[str]) -> str | None:
    if entry is None or entry == BASE_ADAPTER:
        return None
    if isinstance(entry, bool) or not isinstance(entry, (str, int)):
        raise TypeError(f"adapter_ids[{row}] must be a name, an int or None, got {entry!r}")
    if isinstance(entry, int):
        if not 0 <= entry < len(known):
            raise KeyError(
                f"adapter index {entry} (row {row}) is out of range; known adapters: {list(known)}"
            )
        return known[entry]
    if entry not in known:
        raise KeyError(f"unknown adapter {entry!r} (row {row}); known adapters: {list(known)}")
    return entry


def _batch_tensor(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The [rows, tokens, ...] tensor a generate()/forward() call was given: the first positional
    argument, `input_ids`, generate's `inputs`, or `inputs_embeds`."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value
    return None


def batch_rows(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """Rows of the batch a generate()/forward() call was given, or None when it cannot be told."""
    batch = _batch_tensor(args, kwargs)
    return None if batch is None else batch.shape[0]


def forward_shape(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """(rows, tokens per row) of one model forward."""
    batch = _batch_tensor(args, kwargs)
    if batch is None:
        raise ValueError("cannot route adapters: the forward got neither input_ids nor inputs_embeds")
    return batch.shape[0], batch.shape[1]


def expand_rows(row_slots: Sequence[int], rows: int) -> list[int]:
    """Follow generate()'s batch expansion (beams, num_return_sequences): each row repeated in place."""
    if rows == len(row_slots):
        return list(row_slots)
    if rows % len(row_slots):
        raise ValueError(
            f"the forward has {rows} rows, not a multiple of the {len(row_slots)} adapter_ids given"
        )
    repeat = rows // len(row_slots)
    return [slot for slot in row_slots for _ in range(repeat)]
