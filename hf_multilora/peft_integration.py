"""hf_multilora.enable(peft_model): PEFT's own mixed-batch API, computed by the SGMV kernels.

PEFT hands `adapter_names` to every LoRA layer through forward pre-hooks and then loops over the
adapters of the batch in Python. `enable` replaces the forward of each PEFT LoRA `Linear` by one
that runs the base layer and one SGMV shrink/expand for all rows. Calls without `adapter_names`
and merged or disabled adapters keep PEFT's own forward. So does, for a call, each layer where an
adapter of that call is one the kernels do not compute exactly (DoRA, aLoRA and the other LoRA
variants, `lora_bias`): every adapter is checked at its first use, however it was loaded, so the
results are always PEFT's, and so are the errors.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import layer as peft_lora

from .adapters.host_store import HostAdapter, pack_adapter
from .kernels.sgmv import align_up
from .layers import LoraRuntime
from .memory.page_pool import PagePool
from .routing import BASE_ADAPTER

logger = logging.getLogger(__name__)
_STATE = "_hf_multilora_state"
_MIN_PAGE_ELEMS = 32768  # the drop-in's pool holds adapter rows only: pages of 64 KiB (bf16) or more
_SPARE_PAGES = 64
# Keywords PEFT hands every LoRA layer for its variants only (aLoRA's offsets): the base layer
# must not get them.
_VARIANT_KWARGS = tuple(getattr(peft_lora, "VARIANT_KWARG_KEYS", ("alora_offsets",)))


def enable(peft_model: torch.nn.Module, *, pool_bytes: int | None = None) -> torch.nn.Module:
    """Route `peft_model.generate(..., adapter_names=[...])` and forward through the kernels.

    Call it after loading the adapters; adapters added later are checked and picked up at their
    first use. Device copies of the adapters live in a page pool of `pool_bytes` (default: twice
    the bytes of the adapters loaded now, plus some pages); when a forward needs more than it
    holds, the least recently used adapters are evicted and re-copied from PEFT's weights at their
    next use. A model whose LoRA layers are none of them `Linear` (embedding, convolution,
    `target_parameters`) has nothing to patch: a warning says so and PEFT's forward stays. Raises
    ValueError for a model without any PEFT LoRA layer. Returns the same model.
    """
    if getattr(peft_model, _STATE, None) is not None:
        disable(peft_model)
    lora_layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, peft_lora.LoraLayer)}
    if not lora_layers:
        raise ValueError(
            f"enable() found no PEFT LoRA layer in this model ({type(peft_model).__name__}); it takes a "
            "PeftModel holding LoRA adapters"
        )
    layers = {name: m for name, m in lora_layers.items() if isinstance(m, peft_lora.Linear)}
    if not layers:
        logger.warning(
            "hf_multilora: no PEFT LoRA Linear layer in this model (its LoRA layers are %s): nothing "
            "runs on the kernels and PEFT's own forward stays; call enable() again after loading an "
            "adapter on Linear layers",
            ", ".join(sorted({type(m).__name__ for m in lora_layers.values()})),
        )
        return peft_model
    state = _PeftState(layers, getattr(peft_model, "peft_config", {}), pool_bytes)
    for layer in layers.values():
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


def _unsupported(layer: peft_lora.Linear, name: str) -> str | None:
    """What keeps the kernels from computing adapter `name` of this layer exactly as PEFT does, if
    anything: the kernels add x A^T B^T * scaling and nothing else."""
    if layer.use_dora.get(name, False):
        return "DoRA"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return f"a LoRA variant ({type(variant).__name__})"
    if getattr(layer, "lora_bias", {}).get(name, False) or layer.lora_B[name].bias is not None:
        return "lora_bias"
    return None


@dataclass(frozen=True)
class _Verdict:
    """One version of an adapter, as checked: which patched layers must run PEFT's forward in a
    call that uses it. A version is told by its PEFT config object and by the A weight of the
    first patched layer holding it, which delete_adapter + load_adapter both replace."""

    config: Any
    source: peft_lora.Linear | None
    weight: torch.Tensor | None
    fallback_mask: int  # bit m: patched layer m holds the adapter in a form the kernels do not compute

    def is_current(self, name: str, configs: Mapping[str, Any]) -> bool:
        if configs.get(name) is not self.config:
            return False
        source = self.source
        return source is None or (name in source.lora_A and source.lora_A[name].weight is self.weight)


class _PeftState:
    """The runtime of one enabled PEFT model, and which device slot holds which adapter."""

    def __init__(
        self, layers: dict[str, peft_lora.Linear], configs: Mapping[str, Any], pool_bytes: int | None
    ) -> None:
        self.layers = list(layers.values())
        self.index = {id(layer): i for i, layer in enumerate(self.layers)}
        self.runtime = LoraRuntime(list(layers), _pool_for(self.layers, pool_bytes))
        self._configs = configs
        self._verdicts: dict[str, _Verdict] = {}
        self._route_key: tuple | None = None
        self.routed_names: Sequence[str] | None = None  # the adapter_names this forward was routed for
        self.routed_shape: torch.Size | None = None
        self.fallback_mask = 0  # bit m: patched layer m runs PEFT's own forward in this forward
        for name in dict.fromkeys(n for layer in self.layers for n in layer.lora_A):
            self._check(name)

    def new_forward(self, *_: Any) -> None:
        """A model forward starts: its first LoRA layer routes again (the list may have changed)."""
        self.routed_names = None

    def route(self, adapter_names: Sequence[str], x: torch.Tensor) -> None:
        """Plan the forward for these rows; the first layer plans, the others find it ready.

        Each adapter of the call is checked again when PEFT holds a new version of it, so one
        loaded after `enable`, or deleted and loaded again, reaches the kernels only where they
        compute it exactly.
        """
        tokens_per_row = x[0].numel() // x.shape[-1] if x.shape[0] else 0
        wanted = [n for n in dict.fromkeys(adapter_names) if n != BASE_ADAPTER]
        renewed = [n for n in wanted if not self._current(n)]
        for name in renewed:
            self._check(name)
        key = (tuple(adapter_names), tokens_per_row)
        if key != self._route_key or renewed:
            self._import(wanted)
            residency = self.runtime.residency
            slots = {n: r.slot for n in wanted if (r := residency.resident(n)) is not None}
            self.runtime.set_rows([slots.get(n, -1) for n in adapter_names], tokens_per_row)
            self.fallback_mask = 0
            for name in wanted:
                self.fallback_mask |= self._verdicts[name].fallback_mask
            self._route_key = key
        self.routed_names, self.routed_shape = adapter_names, x.shape[:-1]

    def _current(self, name: str) -> bool:
        verdict = self._verdicts.get(name)
        return verdict is not None and verdict.is_current(name, self._configs)

    def _check(self, name: str) -> None:
        """Judge adapter `name` as PEFT holds it now in every patched layer, and forget the device
        copy of an older version."""
        if self.runtime.residency.resident(name) is not None:
            self.runtime.residency.drop(name)
        source, mask, reasons = None, 0, set()
        for i, layer in enumerate(self.layers):
            if name not in layer.lora_A:
                continue
            source = layer if source is None else source
            reason = _unsupported(layer, name)
            if reason is not None:
                mask |= 1 << i
                reasons.add(reason)
        if mask:
            logger.warning(
                "hf_multilora: adapter %r uses %s, which the kernels do not compute: the %d LoRA layers "
                "holding it keep PEFT's own forward in calls that use it",
                name,
                " and ".join(sorted(reasons)),
                mask.bit_count(),
            )
        weight = None if source is None else source.lora_A[name].weight
        self._verdicts[name] = _Verdict(self._configs.get(name), source, weight, mask)

    def _import(self, wanted: list[str]) -> None:
        """Copy the adapters of this forward that are not resident from the PEFT layers into the
        pool (once per adapter version), keeping the resident ones pinned meanwhile."""
        residency = self.runtime.residency
        residency.acquire_names(wanted, self._pack)
        residency.release(wanted)

    def _pack(self, names: list[str]) -> list[HostAdapter]:
        """The named adapters as read from the PEFT layers now, packed like host adapters (on the
        device: PEFT already holds them there), each with the layers its verdict allows."""
        packed = []
        for name in names:
            fallback = self._verdicts[name].fallback_mask
            loras = {}
            for i, (layer_name, layer) in enumerate(zip(self.runtime.module_names, self.layers, strict=True)):
                if name in layer.lora_A and not fallback >> i & 1:
                    a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
                    loras[layer_name] = (a, b, float(layer.scaling[name]))
            if loras:
                residency = self.runtime.residency
                packed.append(pack_adapter(name, "peft", {}, loras, residency.dtype, residency.device))
        return packed


def _make_forward(state: _PeftState):
    def forward(self: peft_lora.Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None or self.disable_adapters or self.merged:
            return type(self).forward(self, x, *args, **kwargs)
        if adapter_names is not state.routed_names or x.shape[:-1] != state.routed_shape:
            # First LoRA layer of this forward: PEFT's checks and the plan, once for all layers.
            self._check_forward_args(x, *args, **kwargs)
            state.route(adapter_names, x)
        module = state.index[id(self)]
        if state.fallback_mask >> module & 1:
            # An adapter of this call is one the kernels do not compute here: PEFT's result, or its error.
            return type(self).forward(self, x, *args, **kwargs)
        kwargs.pop("adapter_names")
        for key in _VARIANT_KWARGS:  # only variants read them, and those run PEFT's forward above
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)
        runtime = state.runtime
        if runtime.plan is not None and runtime.module_mask >> module & 1:
            runtime.apply(module, x, result)
        return result

    return forward


def _pool_for(layers: list[peft_lora.Linear], pool_bytes: int | None) -> PagePool:
    weight = layers[0].base_layer.weight
    page_elems = align_up(max(_MIN_PAGE_ELEMS, *(max(la.in_features, la.out_features) for la in layers)))
    if pool_bytes is None:
        loaded = sum(p.numel() for la in layers for d in (la.lora_A, la.lora_B) for p in d.parameters())
        pool_bytes = (2 * loaded + _SPARE_PAGES * page_elems) * weight.element_size()
    return PagePool.for_device(page_elems, weight.dtype, weight.device, pool_bytes=pool_bytes)
