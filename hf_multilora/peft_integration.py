"""hf_multilora.enable(peft_model): PEFT's own mixed-batch API, computed by the SGMV kernels.

PEFT hands `adapter_names` to every LoRA layer through forward pre-hooks and then loops over the
adapters of the batch in Python. `enable` replaces the forward of each PEFT LoRA `Linear` by one
that runs the base layer and one SGMV shrink/expand for all rows. Calls without `adapter_names`,
merged or disabled adapters, and layers holding an adapter we cannot compute exactly (DoRA and
other LoRA variants, `lora_bias`) keep PEFT's own forward, so results are always PEFT's.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from .adapters.host_store import HostAdapter, pack_adapter
from .kernels.sgmv import align_up
from .layers import LoraRuntime
from .memory.page_pool import PagePool
from .routing import BASE_ADAPTER

logger = logging.getLogger(__name__)
_STATE = "_hf_multilora_state"
_MIN_PAGE_ELEMS = 32768  # the drop-in's pool holds adapter rows only: pages of 64 KiB (bf16) or more
_SPARE_PAGES = 64


def enable(peft_model: torch.nn.Module, *, pool_bytes: int | None = None) -> torch.nn.Module:
    """Route `peft_model.generate(..., adapter_names=[...])` and forward through the kernels.

    Call it after loading the adapters; adapters added later are picked up at their first use.
    Device copies of the adapters live in a page pool of `pool_bytes` (default: twice the bytes of
    the adapters loaded now, plus some pages); when a forward needs more than it holds, the least
    recently used adapters are evicted and re-copied from PEFT's weights at their next use.
    Returns the same model.
    """
    if getattr(peft_model, _STATE, None) is not None:
        disable(peft_model)
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, PeftLoraLinear)}
    if not layers:
        raise ValueError("enable() found no PEFT LoRA Linear layer in this model; is it a PEFT LoRA model?")
    supported = {name: m for name, m in layers.items() if not _unsupported_adapters(m)}
    skipped = sorted(set(layers) - set(supported))
    if skipped:
        logger.warning(
            "hf_multilora: %d LoRA layers keep PEFT's own forward (adapters there use DoRA, lora_bias or "
            "another LoRA variant), e.g. %s",
            len(skipped),
            skipped[0],
        )
    if not supported:
        raise ValueError(
            "every LoRA layer of this model uses a feature the kernels do not compute (DoRA, lora_bias)"
        )
    state = _PeftState(supported, pool_bytes)
    for layer in supported.values():
        layer.forward = types.MethodType(_make_forward(state), layer)
    state.forward_hook = _transformer(peft_model).register_forward_pre_hook(state.new_forward)
    setattr(peft_model, _STATE, state)
    return peft_model


def disable(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Give every patched layer its PEFT forward back."""
    state = getattr(peft_model, _STATE, None)
    if state is None:
        return peft_model
    for layer in state.layers:
        del layer.forward
    state.forward_hook.remove()
    delattr(peft_model, _STATE)
    return peft_model


def _transformer(peft_model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside: generate() calls its forward once per step."""
    get_base = getattr(peft_model, "get_base_model", None)
    return get_base() if get_base is not None else getattr(peft_model, "model", peft_model)


def _unsupported_adapters(layer: PeftLoraLinear) -> list[str]:
    variants = getattr(layer, "lora_variant", {})
    biases = getattr(layer, "lora_bias", {})
    return [n for n in layer.lora_A if n in variants or biases.get(n, False) or layer.use_dora.get(n, False)]


class _PeftState:
    """The runtime of one enabled PEFT model, and which device slot holds which adapter."""

    def __init__(self, layers: dict[str, PeftLoraLinear], pool_bytes: int | None) -> None:
        self.layers = list(layers.values())
        self.index = {id(layer): i for i, layer in enumerate(self.layers)}
        self.runtime = LoraRuntime(list(layers), _pool_for(self.layers, pool_bytes))
        self._route_key: tuple | None = None
        self._sources: dict[str, tuple[PeftLoraLinear, torch.Tensor]] = {}  # adapter -> (a layer, its A then)
        self.routed_names: Sequence[str] | None = None  # the adapter_names this forward was routed for
        self.routed_shape: torch.Size | None = None

    def new_forward(self, *_: Any) -> None:
        """A model forward starts: its first LoRA layer routes again (the list may have changed)."""
        self.routed_names = None

    def route(self, adapter_names: Sequence[str], x: torch.Tensor) -> None:
        """Plan the forward for these rows; the first layer plans, the others find it ready."""
        tokens_per_row = x[0].numel() // x.shape[-1] if x.shape[0] else 0
        wanted = [n for n in dict.fromkeys(adapter_names) if n != BASE_ADAPTER]
        cache = self.runtime.cache
        stale = [n for n in wanted if cache.resident(n) is not None and not self._current(n)]
        for name in stale:
            cache.drop(name)
        key = (tuple(adapter_names), tokens_per_row)
        if key == self._route_key and not stale:
            self.routed_names, self.routed_shape = adapter_names, x.shape[:-1]
            return
        self._import(wanted)
        slots = {n: r.slot for n in wanted if (r := cache.resident(n)) is not None}
        self.runtime.set_rows([slots.get(n, -1) for n in adapter_names], tokens_per_row)
        self._route_key = key
        self.routed_names, self.routed_shape = adapter_names, x.shape[:-1]

    def _current(self, name: str) -> bool:
        """Whether the device copy of `name` was made from the weights PEFT holds now (a deleted and
        reloaded adapter has new parameters)."""
        layer, weight = self._sources[name]
        return name in layer.lora_A and layer.lora_A[name].weight is weight

    def _import(self, wanted: list[str]) -> None:
        """Copy the adapters of this forward that are not resident from the PEFT layers into the
        pool (once per adapter version), keeping the resident ones pinned meanwhile."""
        cache = self.runtime.cache
        cache.acquire_names(wanted, self._pack)
        cache.release(wanted)

    def _pack(self, names: list[str]) -> list[HostAdapter]:
        """The named adapters as read from the PEFT layers now, packed like host adapters (on the
        device: PEFT already holds them there)."""
        packed = []
        for name in names:
            loras = {}
            source = next((layer for layer in self.layers if name in layer.lora_A), None)
            if source is not None:
                self._sources[name] = (source, source.lora_A[name].weight)
            for layer_name, layer in zip(self.runtime.module_names, self.layers, strict=True):
                if name in layer.lora_A:
                    a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
                    loras[layer_name] = (a, b, float(layer.scaling[name]))
            if loras:
                cache = self.runtime.cache
                packed.append(pack_adapter(name, "peft", {}, loras, cache.dtype, cache.device))
        return packed


def _make_forward(state: _PeftState):
    def forward(self: PeftLoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None or self.disable_adapters or self.merged:
            return type(self).forward(self, x, *args, **kwargs)
        if adapter_names is not state.routed_names or x.shape[:-1] != state.routed_shape:
            # First LoRA layer of this forward: PEFT's checks and the plan, once for all layers.
            self._check_forward_args(x, *args, **kwargs)
            state.route(adapter_names, x)
        kwargs.pop("adapter_names")
        result = self.base_layer(x, *args, **kwargs)
        module = state.index[id(self)]
        runtime = state.runtime
        if runtime.plan is not None and runtime.module_mask >> module & 1:
            runtime.apply(module, x, result)
        return result

    return forward


def _pool_for(layers: list[PeftLoraLinear], pool_bytes: int | None) -> PagePool:
    weight = layers[0].base_layer.weight
    page_elems = align_up(max(_MIN_PAGE_ELEMS, *(max(la.in_features, la.out_features) for la in layers)))
    if pool_bytes is None:
        loaded = sum(p.numel() for la in layers for d in (la.lora_A, la.lora_B) for p in d.parameters())
        pool_bytes = (2 * loaded + _SPARE_PAGES * page_elems) * weight.element_size()
    return PagePool.for_device(page_elems, weight.dtype, weight.device, pool_bytes=pool_bytes)
