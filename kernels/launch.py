"""Launch a Triton kernel many times over with the host cost of the compiled launcher alone.

`kernel[grid](*args)` re-binds and re-specializes every argument, looks the kernel up and checks
its globals on every call: about 30 us of host time on an H100 host, as much as the base layer's
whole GEMM call. HF decode is host-bound, so that cost is the LoRA overhead. A `BoundLaunch` fixes
the grid and every argument but the first once per plan, compiles through Triton's normal path on
first use, then calls the compiled launcher directly. The first argument (the activation) may
change between calls; a change of its dtype or 16-byte alignment -- the only properties Triton
specializes a pointer on -- goes back through Triton's path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import triton


def _launch_hooks_set() -> bool:
    """Whether a profiler asked Triton for launch callbacks (then every launch takes Triton's path).

    Triton >= 3.5 keeps them in an always-present HookChain that is active only when non-empty.
    """
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    hooks = [getattr(runtime, name, None) for name in ("launch_enter_hook", "launch_exit_hook")]
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)


class BoundLaunch:
    def __init__(
        self,
        fn: Any,
        grid: tuple[int, int, int],
        args: Sequence[Any],
        constexprs: dict[str, Any],
        num_warps: int,
    ) -> None:
        self._fn, self._grid, self._args = fn, grid, list(args)
        self._constexprs, self._num_warps = constexprs, num_warps
        self._direct = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
        self._compiled: tuple | None = None
        self._first_key: tuple | None = None
        first = self._args[0]
        self._stream_device = first.device.index if first.is_cuda else None

    def __call__(self, first: torch.Tensor) -> None:
        args = self._args
        args[0] = first
        key = (first.dtype, first.data_ptr() % 16 == 0)
        if self._compiled is not None and key == self._first_key:
            run, function, metadata = self._compiled
            stream = torch._C._cuda_getCurrentRawStream(self._stream_device)
            run(*self._grid, stream, function, metadata, None, None, None, *args, *self._constexprs.values())
            return
        kernel = self._fn[self._grid](*args, num_warps=self._num_warps, **self._constexprs)
        if self._direct and self._stream_device is not None and not _launch_hooks_set():
            self._compiled = (
                kernel.run,
                kernel.function,
                kernel.packed_metadata,
            )  # .run first: it loads the module
            self._first_key = key
