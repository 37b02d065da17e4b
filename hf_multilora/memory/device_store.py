"""Device copies of the adapters a call needs, in one flat tensor the SGMV kernels index.

The host store is the source of truth; this is a cache of it. Each resident adapter takes a slot
(a column of the location and scale tables, [modules, slots]) and one contiguous range of the flat
weight tensor sized to its real ranks. Ranges come from a first-fit free list; the tensor grows
when no range fits, and when `max_bytes` caps it, least-recently-used adapters that the current
call does not need are evicted first. (The unified page pool of a later issue replaces this
allocator; the kernels' contract -- flat storage + location table -- stays.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..adapters.host_store import HostAdapter
from ..kernels.sgmv import LOCATION_FIELDS, align_up


class DeviceMemoryError(RuntimeError):
    """The adapters one call needs do not fit in the device budget."""


@dataclass
class _Resident:
    slot: int
    offset: int
    length: int
    max_rank: int
    module_mask: int  # bit m set when the adapter targets module m


class DeviceAdapterStore:
    def __init__(
        self,
        module_names: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
        max_bytes: int | None = None,
    ) -> None:
        self.module_index = {name: i for i, name in enumerate(module_names)}
        self.device, self.dtype, self.max_bytes = torch.device(device), dtype, max_bytes
        self.weights = torch.empty(0, dtype=dtype, device=self.device)
        self.locations = torch.zeros(
            len(module_names), 0, LOCATION_FIELDS, dtype=torch.int64, device=self.device
        )
        self.scales = torch.zeros(len(module_names), 0, dtype=torch.float32, device=self.device)
        self._free_ranges: list[tuple[int, int]] = []  # (offset, length), sorted, coalesced
        self._end = 0  # first element never handed out
        self._free_slots: list[int] = []
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order, oldest first
        self.evictions = 0
        self.bytes_copied = 0

    # ------------------------------------------------------------------ public

    def resident(self, name: str) -> _Resident | None:
        return self._resident.get(name)

    def ensure(self, adapters: Sequence[HostAdapter]) -> list[_Resident]:
        """Make every adapter resident (copying the missing ones) and mark them most recently used.

        Raises DeviceMemoryError before copying anything if they cannot all fit.
        """
        needed = {a.name for a in adapters}
        missing = [a for a in {a.name: a for a in adapters}.values() if a.name not in self._resident]
        if self.max_bytes is not None:
            want = sum(align_up(a.flat.numel()) for a in missing) * self.weights.element_size()
            budget = self.max_bytes - self._used_elements() * self.weights.element_size()
            evictable = sum(r.length for n, r in self._resident.items() if n not in needed)
            if want > budget + evictable * self.weights.element_size():
                raise DeviceMemoryError(
                    f"the adapters of this call need {want} bytes on {self.device}, but only "
                    f"{budget + evictable * self.weights.element_size()} of the {self.max_bytes}-byte budget can be freed"
                )
        for adapter in missing:
            self._place(adapter, protect=needed)
        for name in needed:
            self._resident.move_to_end(name)
        return [self._resident[a.name] for a in adapters]

    def drop(self, name: str) -> None:
        resident = self._resident.pop(name, None)
        if resident is None:
            return
        self.locations[:, resident.slot, 2] = 0
        self._free_slots.append(resident.slot)
        self._release(resident.offset, resident.length)

    def drop_all(self) -> None:
        for name in list(self._resident):
            self.drop(name)

    @property
    def resident_names(self) -> list[str]:
        return list(self._resident)

    # ------------------------------------------------------------------ internals

    def _used_elements(self) -> int:
        return sum(r.length for r in self._resident.values())

    def _place(self, adapter: HostAdapter, protect: Iterable[str]) -> None:
        length = align_up(adapter.flat.numel())  # keeps every range, so every offset, aligned
        if self.max_bytes is not None:
            protect = set(protect)
            while (self._used_elements() + length) * self.weights.element_size() > self.max_bytes:
                victim = next(n for n in self._resident if n not in protect)
                self.drop(victim)
                self.evictions += 1
        offset = self._allocate(length)
        slot = self._take_slot()
        self.weights[offset : offset + adapter.flat.numel()].copy_(adapter.flat, non_blocking=True)
        self.bytes_copied += adapter.nbytes

        column = torch.zeros(len(self.module_index), LOCATION_FIELDS, dtype=torch.int64)
        scales = torch.zeros(len(self.module_index), dtype=torch.float32)
        mask = 0
        for module_name, m in adapter.modules.items():
            i = self.module_index[module_name]
            column[i] = torch.tensor([offset + m.a_offset, offset + m.b_offset, m.rank])
            scales[i] = m.scale
            mask |= 1 << i
        self.locations[:, slot] = column.to(self.device)
        self.scales[:, slot] = scales.to(self.device)
        self._resident[adapter.name] = _Resident(slot, offset, length, adapter.max_rank, mask)

    def _take_slot(self) -> int:
        if not self._free_slots:
            old = self.locations.shape[1]
            new = max(8, 2 * old)
            grown = torch.zeros(
                self.locations.shape[0], new, LOCATION_FIELDS, dtype=torch.int64, device=self.device
            )
            grown[:, :old] = self.locations
            scales = torch.zeros(self.scales.shape[0], new, dtype=torch.float32, device=self.device)
            scales[:, :old] = self.scales
            self.locations, self.scales = grown, scales
            self._free_slots = list(range(new - 1, old - 1, -1))
        return self._free_slots.pop()

    def _allocate(self, length: int) -> int:
        for i, (offset, free) in enumerate(self._free_ranges):
            if free >= length:
                if free == length:
                    del self._free_ranges[i]
                else:
                    self._free_ranges[i] = (offset + length, free - length)
                return offset
        offset = self._end
        self._end += length
        if self._end > self.weights.numel():
            grown = torch.empty(
                max(self._end, 2 * self.weights.numel()), dtype=self.dtype, device=self.device
            )
            grown[: self.weights.numel()] = self.weights
            self.weights = grown
        return offset

    def _release(self, offset: int, length: int) -> None:
        ranges = sorted([*self._free_ranges, (offset, length)])
        merged: list[tuple[int, int]] = []
        for start, size in ranges:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        if merged and merged[-1][0] + merged[-1][1] == self._end:
            self._end = merged.pop()[0]
        self._free_ranges = merged
