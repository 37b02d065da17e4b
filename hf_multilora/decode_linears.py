"""Decode-sized projections in a MultiLoraModel call through kernels/decode_linear.py: a layer's q, k
and v (and gate and up) in one launch, each output its own tensor (the kernel module says why).

How: for the length of a call (installed and removed with `fusion.Fusion`'s code) each `nn.Linear` named
like Llama's projections gets an instance forward. A group's first call computes every member's
output for its input and keeps the others' outputs; a member called next with the same input tensor,
unchanged since (its version counter), takes its output. Any other call computes its own, and a call
the kernel does not take (more rows than it was measured for, another dtype, shapes its tiles do not
divide, no Triton) runs the module's own forward. A LoRA forward (`layers.add_lora_to_forward`) stays:
the launch replaces its base part only, and where the members are one sibling group of the LoRA
runtime, their deltas come from the group's shrink and one expand into all the outputs
(`layers.apply_lora_stacked`; the kernel leaves them one after another in one buffer), not one
expand each. Modules whose forward is someone else's (accelerate's offloading hooks, quantized
linear classes) are left alone.

On by default; `HF_MULTILORA_DECODE_LINEARS=0` (read at each call) turns it off, e.g. to compare
against cuBLAS (`benchmarks/bench_graphs.py --cublas-projections`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from . import layers
from .kernels import decode_linear

_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))


class _Group:
    """Sibling projections of one module that read the same input."""

    def __init__(self, members: list[torch.nn.Linear]) -> None:
        self.members = members
        self.forwards: list[Callable] = []  # the members' own forwards, as of the last `install`
        # input, its version, the other members' outputs, whether their LoRA deltas are in them
        self.kept: tuple[torch.Tensor, int, dict[int, torch.Tensor], bool] | None = None

    def output(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
        """Member `index`'s output for x and whether its LoRA delta is in it already, or None where
        the kernel does not take the call."""
        kept, self.kept = self.kept, None
        if kept is not None and kept[0] is x and kept[1] == x._version and index in kept[2]:
            y = kept[2].pop(index)
            self.kept = kept if kept[2] else None
            return y, kept[3]
        if x.dim() < 2 or not 0 < x.numel() // max(x.shape[-1], 1) <= decode_linear.MAX_ROWS:
            return None  # a prefill: cuBLAS's (checked first, it is every prefill's path)
        if torch.is_grad_enabled():
            return None  # the kernel has no backward
        alone = [self.members[index]]
        for members in (self.members, alone) if len(self.members) > 1 else (alone,):
            tiles = _tiles(members, x)
            if tiles is not None:
                outs = decode_linear.decode_linear(x, [m.weight for m in members], [m.bias for m in members], tiles)
                if len(members) == 1:
                    return outs[0], False
                lora_added = layers.apply_lora_stacked(self.forwards, x, outs)  # one expand for all
                self.kept = (x, x._version, {i: y for i, y in enumerate(outs) if i != index}, lora_added)
                return outs[index], lora_added
        return None


def _tiles(members: list[torch.nn.Linear], x: torch.Tensor) -> decode_linear.DecodeLinearTiles | None:
    """The kernel's tiles for these members' weights and x, or None where it does not take them."""
    weights = [m.weight for m in members]
    biases = [m.bias for m in members]
    if (
        any(w.shape[1] != x.shape[-1] or w.dtype != x.dtype or w.device != x.device or not w.is_contiguous()
            for w in weights)
        or len({b is None for b in biases}) != 1
        or any(b is not None and (b.dtype != x.dtype or not b.is_contiguous()) for b in biases)
        or x.dtype not in (torch.float16, torch.bfloat16)  # fp32: tl.dot would round to tf32, F.linear does not
    ):
        return None
    return decode_linear.decode_linear_tiles([w.shape[0] for w in weights], x.shape[-1], x.numel() // x.shape[-1])


class DecodeLinears:
    """The projection groups of one model, installed for the length of its calls."""

    def __init__(self, model: torch.nn.Module, fusing: Callable[[torch.Tensor], bool]) -> None:
        self._fusing = fusing
        self._made: dict[torch.nn.Module, tuple[Any, Callable]] = {}  # member -> (its own forward, our wrapper)
        self._installed = False
        self.groups: list[_Group] = []
        for module in model.modules():
            for names in _GROUPS:
                members = [getattr(module, n, None) for n in names]
                if all(_takeable(m) for m in members):
                    self.groups.append(_Group(members))

    def install(self) -> None:
        """For a call: each member's forward through its group (its own forward kept as `original`).
        A member's wrapper is made again only when its own forward changed (adapters added or
        removed a LoRA forward): the serving engine installs these every step."""
        self._installed = os.environ.get("HF_MULTILORA_DECODE_LINEARS", "1") != "0"
        if not self._installed:
            return
        for group in self.groups:
            remade = False
            for index, module in enumerate(group.members):
                own = module.__dict__.get("forward")
                made = self._made.get(module)
                if made is None or made[0] is not own:
                    made = self._made[module] = (own, self._forward(group, index, module.forward))
                    remade = True
                module.forward = made[1]
            if remade:
                group.forwards = [self._made[m][1].original for m in group.members]

    def remove(self) -> None:
        if not self._installed:
            return
        self._installed = False
        for group in self.groups:
            group.kept = None
            for module in group.members:
                original = getattr(module.forward, "original", None)
                if original is None:
                    continue  # replaced during the call by someone else: theirs stays
                if getattr(original, "__func__", None) is torch.nn.Linear.forward:
                    del module.forward  # the class's forward again
                else:
                    module.forward = original  # the LoRA forward, or someone else's

    def _forward(self, group: _Group, index: int, original: Callable) -> Callable:
        lora_step = getattr(original, "lora_step", None)
        ours = _plain_linear(getattr(original, "base_forward", original))  # else someone else's since construction

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            got = group.output(index, x) if ours and not args and not kwargs and self._fusing(x) else None
            if got is None:
                return original(x, *args, **kwargs)
            y, lora_added = got
            if lora_step is not None and not lora_added:
                lora_step(x, y)
            return y

        forward.original = original
        return forward


def _takeable(module: Any) -> bool:
    """An exact nn.Linear running nn.Linear's forward, or a LoRA forward over it."""
    if type(module) is not torch.nn.Linear:
        return False
    own = module.__dict__.get("forward")
    return own is None or _plain_linear(getattr(own, "base_forward", None))


def _plain_linear(forward: Any) -> bool:
    return getattr(forward, "__func__", None) is torch.nn.Linear.forward
