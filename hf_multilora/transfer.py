"""Copies between host and device that do not wait for the device.

Why: `torch.tensor(values, device="cuda")` copies from pageable memory and synchronises the stream,
so it waits for every kernel queued before it. The serving engine launches a decode step while the
one before it still runs (its host work overlaps that step), and generate()'s CUDA-graph steps fill
their inputs between replays; a copy that waits undoes both. A pinned source copies asynchronously,
in stream order; the pinned-memory allocator keeps the source until the copy is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def staged_for(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` ready for a non-blocking copy to `device` (pinned for CUDA; on the CPU the copy is
    synchronous, so the tensor itself)."""
    return host.pin_memory() if device.type == "cuda" else host


def to_device(values: Sequence | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a host tensor, or numbers as torch.tensor takes them) on `device`, queued in stream
    order without waiting for the device."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return staged_for(host, device).to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of the CUDA `tensor`, queued in stream order: read it once an event recorded
    after this call has completed."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
