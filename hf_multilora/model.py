"""MultiLoraModel: one HF base model, many LoRA adapters, one batched generate() with an adapter per row.

The base model is left as it is: targeted linear layers get a forward hook that adds the SGMV delta
of the current plan, and a pre-forward hook on the model plans each forward once. Adapters live in
a host store (pinned when CUDA is there); a call copies the ones it needs into device memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .adapters.host_store import HostAdapter
from .adapters.loading import load_peft_adapter, lora_target_modules
from .layers import LoraRuntime, add_lora_to_forward
from .routing import BASE_ADAPTER, batch_rows, expand_rows, forward_shape, resolve_adapter_ids


class MultiLoraModel(torch.nn.Module):
    def __init__(self, base_model: PreTrainedModel, *, device_adapter_bytes: int | None = None) -> None:
        """Wrap an already loaded base model.

        `device_adapter_bytes` caps the device memory held by adapter weights; past it, adapters
        the running call does not use are evicted least recently used first (None: no cap).
        """
        super().__init__()
        self.base_model = base_model
        targets = lora_target_modules(base_model)
        if not targets:
            raise ValueError(
                f"{type(base_model).__name__} has no Linear or Conv1D layer a LoRA adapter could target"
            )
        devices = {m.weight.device for n, m in base_model.named_modules() if n in targets}
        if len(devices) > 1:
            raise ValueError(
                f"the base model's layers are spread over {sorted(map(str, devices))}; one device only"
            )
        self._module_names = list(targets)
        self._modules_by_name = dict(base_model.named_modules())
        self._registry: dict[str, HostAdapter] = {}
        self._hooks: dict[int, Callable[[], None]] = {}  # module index -> undo of its LoRA forward
        self._lock = threading.RLock()
        self._row_slots: list[int] | None = None
        self._device_adapter_bytes = device_adapter_bytes
        self._runtime = self._new_runtime()
        self._plan_hook = base_model.register_forward_pre_hook(self._plan_forward, with_kwargs=True)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | PreTrainedModel,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        *,
        device_adapter_bytes: int | None = None,
        **hf_kwargs: Any,
    ) -> MultiLoraModel:
        """Load the base (path, hub id or a loaded PreTrainedModel) and register `adapters`
        ({name: PEFT adapter folder or hub id}). `hf_kwargs` go to AutoModelForCausalLM.from_pretrained."""
        if isinstance(base, PreTrainedModel):
            if hf_kwargs:
                raise TypeError(f"{sorted(hf_kwargs)} apply when loading the base; it is already loaded")
            model = base
        else:
            model = AutoModelForCausalLM.from_pretrained(base, **hf_kwargs)
        multi = cls(model, device_adapter_bytes=device_adapter_bytes)
        for name, source in (adapters or {}).items():
            multi.load_adapter(source, name)
        return multi

    # ------------------------------------------------------------------ adapter registry

    @property
    def adapter_names(self) -> list[str]:
        """Registered adapters; an int in adapter_ids indexes this list."""
        return list(self._registry)

    def load_adapter(self, path: str | os.PathLike, adapter_name: str, *, replace: bool = False) -> None:
        """Register a PEFT LoRA adapter (folder or hub id). A failure leaves the registry as it was."""
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ADAPTER:
            raise ValueError(f"invalid adapter name {adapter_name!r}")
        with self._lock:
            if adapter_name in self._registry and not replace:
                raise ValueError(
                    f"adapter {adapter_name!r} is already loaded; pass replace=True to replace it"
                )
            adapter = load_peft_adapter(
                adapter_name,
                path,
                self.base_model,
                self.base_model.dtype,
                pin_memory=torch.cuda.is_available(),
            )
            self._runtime.store.drop(adapter_name)
            self._registry[adapter_name] = adapter
            self._sync_hooks()

    def unload_adapter(self, adapter_name: str) -> None:
        with self._lock:
            if adapter_name not in self._registry:
                raise KeyError(f"unknown adapter {adapter_name!r}; known adapters: {self.adapter_names}")
            self._runtime.store.drop(adapter_name)
            del self._registry[adapter_name]
            self._sync_hooks()

    def _sync_hooks(self) -> None:
        """LoRA forwards on exactly the modules some registered adapter targets."""
        index = {name: i for i, name in enumerate(self._module_names)}
        wanted = {index[n] for a in self._registry.values() for n in a.modules}
        for m in set(self._hooks) - wanted:
            self._hooks.pop(m)()
        for m in sorted(wanted - set(self._hooks)):
            module = self._modules_by_name[self._module_names[m]]
            self._hooks[m] = add_lora_to_forward(module, m, lambda: self._runtime)

    # ------------------------------------------------------------------ calls

    def forward(
        self,
        *args: Any,
        adapter_ids: Sequence | None = None,
        adapter_names: Sequence | None = None,
        **kwargs: Any,
    ):
        """The base model's forward with one adapter per row (inference only: runs under no_grad)."""
        with torch.no_grad(), self._routed(args, kwargs, adapter_ids, adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(
        self,
        *args: Any,
        adapter_ids: Sequence | None = None,
        adapter_names: Sequence | None = None,
        **kwargs: Any,
    ):
        """The base model's generate(); row i uses adapter_ids[i] (a name, an int, or None for the base).

        Beam search and num_return_sequences expand the batch; each copy keeps its row's adapter.
        """
        with self._routed(args, kwargs, adapter_ids, adapter_names):
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def _routed(
        self, args: tuple, kwargs: dict, adapter_ids: Sequence | None, adapter_names: Sequence | None
    ) -> Iterator[None]:
        with self._lock:
            names = resolve_adapter_ids(
                adapter_ids, adapter_names, self.adapter_names, batch_rows(args, kwargs)
            )
            self._follow_base_placement()
            self._row_slots = self._make_resident(names) if names is not None else None
            try:
                yield
            finally:
                self._row_slots = None
                self._runtime.clear()

    def _make_resident(self, names: list[str | None]) -> list[int]:
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        residents = self._runtime.store.ensure([self._registry[n] for n in distinct])
        slot_of = {n: r.slot for n, r in zip(distinct, residents, strict=True)}
        return [slot_of[n] if n is not None else -1 for n in names]

    def _plan_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._row_slots is None:
            self._runtime.clear()
            return
        rows, tokens_per_row = forward_shape(args, kwargs)
        self._runtime.set_rows(expand_rows(self._row_slots, rows), tokens_per_row)

    def _follow_base_placement(self) -> None:
        """After base_model.to(device/dtype), device copies are rebuilt from the host store."""
        weight = self._modules_by_name[self._module_names[0]].weight
        store = self._runtime.store
        if (weight.device, weight.dtype) != (store.device, store.dtype):
            self._runtime = self._new_runtime()

    def _new_runtime(self) -> LoraRuntime:
        weight = self._modules_by_name[self._module_names[0]].weight
        return LoraRuntime(
            self._module_names, weight.device, weight.dtype, max_bytes=self._device_adapter_bytes
        )

    # ------------------------------------------------------------------ plumbing

    def memory_stats(self) -> dict[str, Any]:
        """Adapters registered / resident on the device, evictions and host->device bytes copied."""
        store = self._runtime.store
        return {
            "adapters_registered": len(self._registry),
            "adapters_resident": store.resident_names,
            "evictions": store.evictions,
            "bytes_copied_to_device": store.bytes_copied,
        }

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)
