"""Which implementation runs a tensor's kernels: Triton, or the plain-PyTorch references.

One rule for every kernel the package launches (LoRA, paged attention, the fused norm and rotary):
Triton on CUDA; `HF_MULTILORA_KERNELS=triton` forces it elsewhere (the Triton interpreter, in tests).
"""

from __future__ import annotations

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("HF_MULTILORA_KERNELS") == "triton"
