"""The LoRA step of one targeted linear layer: y = base(x), then y += SGMV delta, in place.

One `LoraRuntime` is shared by every LoRA layer of a model. It holds the device weights and the
plan of the current forward (built once by routing, reused by every layer), and picks Triton on
CUDA and the plain-PyTorch reference elsewhere. Projections that read the same input (q/k/v,
gate/up) are siblings: the first one's shrink covers all of them in one multi-slice launch and the
others reuse it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kernels import sgmv
from .memory.device_store import DeviceAdapterStore

_SIBLING_SETS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"})


@dataclass(frozen=True)
class _Group:
    first: int  # module index of the group's first member
    size: int


def sibling_groups(module_names: Sequence[str]) -> list[_Group]:
    """For each module index, the run of consecutive sibling projections it belongs to."""
    groups: list[_Group] = []
    i = 0
    while i < len(module_names):
        parent, leaf = _split(module_names[i])
        family = next((s for s in _SIBLING_SETS if leaf in s), None)
        j = i + 1
        while family and j < len(module_names) and _split(module_names[j])[0] == parent:
            if _split(module_names[j])[1] not in family:
                break
            j += 1
        groups += [_Group(i, j - i)] * (j - i)
        i = j
    return groups


def _split(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def _use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA; HF_MULTILORA_KERNELS=triton forces it elsewhere (the interpreter, in tests)."""
    return t.is_cuda or os.environ.get("HF_MULTILORA_KERNELS") == "triton"


class LoraRuntime:
    def __init__(self, module_names: Sequence[str], device: torch.device, dtype: torch.dtype, **store_kwargs):
        self.module_names = list(module_names)
        self.store = DeviceAdapterStore(self.module_names, device, dtype, **store_kwargs)
        self.groups = sibling_groups(self.module_names)
        self.plan: sgmv.SgmvPlan | None = None
        self.module_mask = 0
        self._plan_key: tuple | None = None
        self._shrunk: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (input, group first, v)

    def set_rows(self, row_slots: Sequence[int] | None, tokens_per_row: int) -> None:
        """Plan the coming forward. `row_slots[i]` is the device slot of row i's adapter (-1: none).

        Decode steps repeat the same rows with one token each, so the plan is reused across them.
        """
        if row_slots is None or all(s < 0 for s in row_slots):
            self.plan, self.module_mask, self._plan_key = None, 0, None
            return
        key = (tuple(row_slots), tokens_per_row, self.store.locations.data_ptr())
        if key == self._plan_key:
            return
        residents = {r.slot: r for r in (self.store.resident(n) for n in self.store.resident_names)}
        used = [residents[s] for s in set(row_slots) if s >= 0]
        max_rank = max(r.max_rank for r in used)
        self.module_mask = 0
        for r in used:
            self.module_mask |= r.module_mask
        self.plan = sgmv.plan_sgmv(row_slots, tokens_per_row, max_rank, self.store.device)
        self._plan_key = key

    def clear(self) -> None:
        self.plan, self.module_mask, self._plan_key, self._shrunk = None, 0, None, None

    def targets(self, module: int) -> bool:
        return self.plan is not None and bool(self.module_mask >> module & 1)

    def apply(self, module: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the LoRA delta of module `module` to y (the base layer's output for input x)."""
        plan = self.plan
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] != plan.num_tokens:
            raise RuntimeError(
                f"layer {self.module_names[module]} got {x2.shape[0]} tokens but the batch was planned "
                f"for {plan.num_tokens}; pass adapter_ids with the call that runs this forward"
            )
        if x2.dtype != self.store.dtype:
            x2 = x2.to(self.store.dtype)
        out = y if y.is_contiguous() and y.dtype == self.store.dtype else y.contiguous().to(self.store.dtype)
        out2 = out.view(-1, out.shape[-1])

        triton = _use_triton(x2)
        shrink = sgmv.sgmv_shrink if triton else sgmv.sgmv_shrink_reference
        expand = sgmv.sgmv_expand if triton else sgmv.sgmv_expand_reference
        store = self.store
        group = self.groups[module]
        if (
            group.size > 1
            and self._shrunk is not None
            and self._shrunk[0] is x
            and self._shrunk[1] == group.first
        ):
            v = self._shrunk[2]
        else:
            v = shrink(x2, store.weights, store.locations[group.first : group.first + group.size], plan)
            self._shrunk = (x, group.first, v) if group.size > 1 else None
        position = module - group.first
        m = slice(module, module + 1)
        expand(out2, v[:, position : position + 1], store.weights, store.locations[m], store.scales[m], plan)
        if out is not y:
            y.copy_(out)
        return y
