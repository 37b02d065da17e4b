"""Host-side adapter weights: the single source of truth that device copies are made from.

Each adapter is ONE flat host tensor holding, for every module it targets, A ([rank, in], row-major)
followed by B ([out, rank], row-major). One flat tensor means one host->device copy per adapter,
and the per-module offsets below become the kernels' location table once a device base offset is
added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ModuleLora:
    """Where one targeted module's A and B live inside `HostAdapter.flat`, and how they scale."""

    a_offset: int
    b_offset: int
    rank: int
    scale: float
    in_features: int
    out_features: int


@dataclass
class HostAdapter:
    name: str
    source: str
    config: dict
    flat: torch.Tensor
    modules: dict[str, ModuleLora] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)
