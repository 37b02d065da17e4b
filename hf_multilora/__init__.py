"""Serve many LoRA adapters on one Hugging Face base model: one batched generate(), an adapter per row."""

from .adapters.loading import (
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterShapeError,
    UnsupportedAdapterError,
)
from .memory.page_pool import PagePool, PoolExhaustedError
from .model import MultiLoraModel
from .peft_integration import disable, enable

__all__ = [
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdapterShapeError",
    "MultiLoraModel",
    "PagePool",
    "PoolExhaustedError",
    "UnsupportedAdapterError",
    "disable",
    "enable",
]
__version__ = "0.1.0"
