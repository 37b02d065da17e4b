"""Host-side adapter weights: the single source of truth that device copies are made from.

Each adapter is ONE flat host tensor holding, for every module it targets, A ([rank, in], row-major)
followed by B transposed ([rank, out], row-major). Every rank row starts at a multiple of the
kernels' WEIGHT_ALIGN (rows are padded to it), so the rows can be scattered into pool pages and
still be read with vector loads. One flat tensor means one host->device copy per adapter,
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

    @property
    def a_stride(self) -> int:
        return align_up(self.in_features)

    @property
    def b_stride(self) -> int:
        return align_up(self.out_features)

    def row_starts(self) -> list[int]:
        """Offset in the flat tensor of every rank row: A's rows, then B's."""
        a = [self.a_offset + r * self.a_stride for r in range(self.rank)]
        return a + [self.b_offset + r * self.b_stride for r in range(self.rank)]


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
        rank, in_features, out_features = a.shape[0], a.shape[1], b.shape[0]
        a_offset = offset
        b_offset = a_offset + rank * align_up(in_features)
        modules[module_name] = ModuleLora(a_offset, b_offset, rank, scale, in_features, out_features)
        offset = b_offset + rank * align_up(out_features)
    # Not torch.zeros: filling the whole tensor first doubles the writes of the one pass that
    # copies the weights in (host loads sit on a call's critical path); only row padding is zeroed.
    flat = torch.empty(offset, dtype=dtype, device=device, pin_memory=pin_memory)
    for m, (a, b, _) in zip(modules.values(), loras.values(), strict=True):
        a_rows = flat[m.a_offset : m.b_offset].view(m.rank, m.a_stride)
        b_rows = flat[m.b_offset : m.b_offset + m.rank * m.b_stride].view(m.rank, m.b_stride)
        for rows, weight in ((a_rows, a), (b_rows, b.T)):
            rows[:, : weight.shape[1]].copy_(weight)
            rows[:, weight.shape[1] :].zero_()
    return HostAdapter(name=name, source=source, config=config, flat=flat, modules=modules)
