"""Host-side adapter weights: the single source of truth that device copies are made from.

Each adapter is ONE flat host tensor holding, for every module it targets, A ([rank, in], row-major)
followed by B transposed ([rank, out], row-major), each at an offset aligned for the kernels. One flat tensor means one host->device copy per adapter,
and the per-module offsets below become the kernels' location table once a device base offset is
added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..kernels.sgmv import align_up


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


def pack_adapter(
    name: str,
    source: str,
    config: dict,
    loras: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    pin_memory: bool = False,
) -> HostAdapter:
    """Lay out `loras` (module name -> (A [rank, in], B [out, rank], scale)), in the given order,
    as one flat tensor in the kernels' layout."""
    modules, offset = {}, 0
    for module_name, (a, b, scale) in loras.items():
        a_offset = align_up(offset)
        b_offset = align_up(a_offset + a.numel())
        modules[module_name] = ModuleLora(a_offset, b_offset, a.shape[0], scale, a.shape[1], b.shape[0])
        offset = b_offset + b.numel()
    flat = torch.zeros(align_up(offset), dtype=dtype, device=device, pin_memory=pin_memory)
    for m, (a, b, _) in zip(modules.values(), loras.values(), strict=True):
        flat[m.a_offset : m.a_offset + a.numel()].copy_(a.reshape(-1))
        flat[m.b_offset : m.b_offset + b.numel()].view(m.rank, m.out_features).copy_(b.T)
    return HostAdapter(name=name, source=source, config=config, flat=flat, modules=modules)
