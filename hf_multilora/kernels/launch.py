"""Launch a Triton kernel many times over with the host cost of the compiled launcher alone.

`kernel[grid](*args)` re-binds and re-specializes every argument, looks the kernel up and checks
its globals on every call: about 30 us of host time on an H100 host, as much as the base layer's
whole GEMM call. HF decode is host-bound, so that cost is the LoRA overhead. A `BoundLaunch` fixes
the grid and every argument but the first once per plan, compiles through Triton's normal path on
first use, then calls the compiled launcher directly. The first argument (the activation) may
change between calls; a change of its dtype or 16-byte alignment -- the only properties Triton
specializes a pointer on -- goes back through Triton's path.

On Hopper and later a BoundLaunch may use programmatic dependent launch (PDL): the kernel is let
onto the GPU while the kernel before it in the stream still runs, and waits for it only where its
code says so (`griddepcontrol.wait`). For kernels of a few microseconds, the launch gap and the
time to get the first loads in flight are a large part of the cost; PDL overlaps them with the
previous kernel.

Triton compiles a kernel anew for every combination of its integer arguments' being 1 or divisible
by 16 and its pointers' 16-byte alignment. Arguments that follow a forward's shape (rows, query
length, table width, tile count) and pointers into per-forward tables took new combinations with
every new prefill shape: a 7B serving trace at 14 requests/s compiled 16-28 kernels inside its timed
run (H200, 2026-12-02). Kernels list such arguments in `do_not_specialize` and
`do_not_specialize_on_alignment`. Only the SGMV workspace strides take part in vectorized accesses
(rows of rank x fp32 per token), the rest are scalar loads and loop bounds. Where a value matters to
the code, a constexpr of few values keeps it: the quantized decode attention lost 6% without
`q_len == 1` compiled in, and now takes it as `ONE_QUERY`.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from functools import cache
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


@cache
def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched with PDL: an NVIDIA GPU of compute capability 9.0
    or later (not the interpreter, not ROCm) and a Triton that has both the launch option and the
    device-side `gdc_wait`. Capturing such launches into a CUDA graph needs a CUDA 12.3 or later driver."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda" or torch.version.hip:
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


class BoundLaunch:
    """One kernel, grid and fixed arguments (see the module doc).

    With `pdl`, launches through the compiled launcher are programmatic dependent launches, so the
    kernel must call `gdc_wait` before it touches anything the kernel before it may write, and
    before it ends. The first launch of every BoundLaunch (variants included) is an ordinary one:
    what the caller made just before (tables the kernel reads before its wait, say) is complete
    before any launch can overlap it.

    The compiled launchers come from the kernel's shared SpecializedLaunch; `variant` makes the same
    launch with other tensors for some fixed arguments, sharing this one's launchers without
    computing Triton's specialization of every argument again: a prefill prepares two launches per
    LoRA module for one forward, ~190 at 7B, and the per-argument keys were a third of its LoRA host
    time (H200, 2026-12-02).
    """

    def __init__(
        self,
        fn: Any,
        grid: tuple[int, int, int],
        args: dict[str, Any],
        constexprs: dict[str, Any],
        num_warps: int,
        pdl: bool = False,
    ) -> None:
        """`args`: the kernel's arguments before its constexprs, by name (the first one is the
        activation); `constexprs` likewise."""
        if [*args, *constexprs] != list(fn.arg_names):
            raise ValueError(f"{fn.__name__} takes {fn.arg_names}; got {[*args]} then constexprs {[*constexprs]}")
        first, *fixed = args.values()
        # Only the fixed arguments are kept (alive): the activation is the caller's, given anew per
        # call. Holding it kept every LoRA layer's input and output of a prefill alive (16 x 4096
        # tokens of a 7B model: ~90 GiB).
        self._fn, self._grid, self._fixed = fn, grid, fixed
        self._constexprs, self._num_warps, self._pdl = constexprs, num_warps, pdl
        # (the activation's dtype, its 16-byte alignment) -> (the launcher of a first launch, that of
        # the later ones), shared with variants
        self._launchers: dict[tuple, tuple[tuple, tuple]] = {}
        self._launched = False
        self._stream_device = first.device.index
        # The fixed arguments as the compiled launcher takes them: tensors as their addresses (it
        # accepts ints for pointers, which skips a data_ptr() call and a driver pointer check per
        # tensor per launch), then the constexprs.
        self._tail = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in fixed)
        self._tail += tuple(constexprs.values())

    def __call__(self, first: torch.Tensor) -> None:
        address = first.data_ptr()
        entries = self._launchers.get((first.dtype, address % 16 == 0))
        if entries is not None:
            run, function, metadata = entries[self._launched]
            self._launched = True
            stream = torch._C._cuda_getCurrentRawStream(self._stream_device)
            run(*self._grid, stream, function, metadata, None, None, None, address, *self._tail)
            return
        args = [first, *self._fixed]
        launch = specialized(self._fn)
        entry = launch(self._grid, args, self._constexprs, self._num_warps)
        self._launched = True
        if entry is not None:  # the same code, whose launcher sets the PDL attribute
            later = launch.compiled(args, self._constexprs, self._num_warps, pdl=True) if self._pdl else entry
            self._launchers[(first.dtype, address % 16 == 0)] = (entry, later)

    def variant(self, **tensors: torch.Tensor) -> BoundLaunch:
        """This launch with `tensors` for the fixed tensor arguments of those names, each of the old
        one's shape, strides and device (so scalars derived from them stay right). It shares this
        launch's compiled launchers where Triton specializes each new tensor as it did the old one
        (dtype, and 16-byte alignment unless the kernel lists it in do_not_specialize_on_alignment);
        otherwise it compiles or finds its own on first use."""
        launch = specialized(self._fn)
        fixed, tail = list(self._fixed), list(self._tail)
        same = True
        for name, tensor in tensors.items():
            i = launch.position.get(name, 0) - 1  # among the fixed arguments (the activation is not)
            if not 0 <= i < len(fixed) or not isinstance(fixed[i], torch.Tensor) or not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{self._fn.__name__}: {name!r} is not one of its fixed tensor arguments")
            old = fixed[i]
            if (tensor.device, tensor.shape, tensor.stride()) != (old.device, old.shape, old.stride()):
                raise ValueError(
                    f"{self._fn.__name__}: {name} must be like the one it replaces ({old.device}, shape "
                    f"{tuple(old.shape)}, strides {old.stride()}); got {tensor.device}, {tuple(tensor.shape)}, "
                    f"{tensor.stride()}"
                )
            align = name not in launch.unaligned
            same = same and _specialization(tensor, True, align) == _specialization(old, True, align)
            fixed[i], tail[i] = tensor, tensor.data_ptr()
        clone = shallow_copy(self)
        clone._fixed, clone._tail, clone._launched = fixed, tuple(tail), False
        if not same:
            clone._launchers = {}
        return clone


def shallow_copy(obj: Any) -> Any:
    """copy.copy for an object of plain attributes, without its reduce protocol (~5x faster: a
    prefill makes ~190 launch variants)."""
    clone = object.__new__(type(obj))
    clone.__dict__.update(obj.__dict__)
    return clone


_NOT_COMPILED = object()


@cache
def specialized(fn: Any) -> SpecializedLaunch:
    """The one SpecializedLaunch of a kernel that BoundLaunches share."""
    return SpecializedLaunch(fn)


class SpecializedLaunch:
    """Every argument per call, for launches whose tensors change on every call (attention's query,
    output and per-layer page table): the properties Triton specializes on are read here, in a few
    microseconds, and pick a launcher compiled earlier; a new combination compiles through Triton's
    normal path. The key is at least as fine as Triton's specialization (finer only costs a
    compile), so a cached launcher is never used for arguments it was not compiled for."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self.arg_names: list[str] = list(fn.arg_names)
        self._direct = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
        unspecialized, self.unaligned = _unspecialized(fn)
        self.position = {name: i for i, name in enumerate(self.arg_names)}
        # per argument position: (Triton specializes its value, its alignment)
        self._flags = [(name not in unspecialized, name not in self.unaligned) for name in self.arg_names]
        self._compiled: dict[tuple, tuple | None] = {}  # None: launch through Triton's path

    def __call__(
        self,
        grid: Sequence[int],
        args: Sequence[Any],
        constexprs: dict[str, Any],
        num_warps: int,
        num_stages: int = 3,
    ) -> tuple | None:
        """Launch; returns the compiled launcher used, (run, function, metadata), or None where the
        launch went through Triton's own path."""
        first = args[0]
        if not self._direct or not first.is_cuda or _launch_hooks_set():
            self._fn[tuple(grid)](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            return None
        grid3 = (*grid, 1, 1)[:3]
        key = self._key(args, constexprs, num_warps, num_stages, pdl=False)
        entry = self._entry(key, args, constexprs, num_warps, num_stages, pdl=False)
        if entry is not None:
            flat = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in args]
            flat += [constexprs[name] for name in self.arg_names[len(args) :]]
            stream = torch._C._cuda_getCurrentRawStream(first.device.index)
            try:
                entry[0](*grid3, stream, entry[1], entry[2], None, None, None, *flat)
                return entry
            except (TypeError, ValueError, OverflowError):  # rejected while parsing arguments, before any launch
                self._compiled[key] = None
        self._fn[tuple(grid)](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        return None

    def compiled(
        self, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int, num_stages: int = 3, pdl: bool = False
    ) -> tuple | None:
        """The launcher for these arguments, compiled if need be but not launched; `pdl`: one whose
        launches are programmatic dependent launches."""
        return self._entry(self._key(args, constexprs, num_warps, num_stages, pdl), args, constexprs, num_warps,
                           num_stages, pdl)  # fmt: skip

    def _key(self, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int, num_stages: int, pdl: bool) -> tuple:
        fixed = [constexprs[name] for name in self.arg_names[len(args) :]]  # constexprs by value
        # `_specialization`, its tensor case inlined: this runs for every argument of every launch
        # that is not prepared (~190 variants a prefill at 7B)
        specialization = [(value.dtype, align and value.data_ptr() % 16 == 0) if type(value) is torch.Tensor
                          else _specialization(value, specialize, align)
                          for value, (specialize, align) in zip(args, self._flags, strict=False)]  # fmt: skip
        return (num_warps, num_stages, pdl, args[0].device.index, *specialization, *fixed)

    def _entry(
        self, key: tuple, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int, num_stages: int, pdl: bool
    ) -> tuple | None:
        """The launcher kept under `key` (None: launch through Triton's path), compiled on first use."""
        entry = self._compiled.get(key, _NOT_COMPILED)
        if entry is _NOT_COMPILED:
            options = {"num_warps": num_warps, "num_stages": num_stages, **({"launch_pdl": True} if pdl else {})}
            kernel = self._fn.warmup(*args, grid=(1, 1, 1), **options, **constexprs)
            entry = self._compiled[key] = (kernel.run, kernel.function, kernel.packed_metadata)  # run first: sets function
        return entry


class RepeatedLaunch:
    """One SpecializedLaunch call made over and over with new tensors and the same everything else (a
    decode step's layers): the grid, constexprs and launch options are fixed here. The first call goes
    through the SpecializedLaunch; a later call whose tensors have the first call's dtypes and are
    16-byte aligned, and whose scalars equal the first call's, calls the launcher it used directly.
    The kernel takes its pointer arguments first, then its scalars. Like BoundLaunch, direct launches
    bypass Triton's launch hooks."""

    def __init__(
        self,
        launch: SpecializedLaunch,
        grid: Sequence[int],
        constexprs: dict[str, Any],
        num_warps: int,
        num_stages: int = 3,
    ) -> None:
        self._launch, self._grid, self._constexprs = launch, tuple(grid), constexprs
        self._grid3 = (*grid, 1, 1)[:3]
        self._num_warps, self._num_stages = num_warps, num_stages
        self._direct: tuple | None = None  # (entry, dtypes, scalars, constexpr values, device index)

    def __call__(self, tensors: Sequence[torch.Tensor], scalars: tuple) -> None:
        pointers = [t.data_ptr() for t in tensors]
        direct = self._direct
        if (
            direct is not None
            and scalars == direct[2]
            and not any(p % 16 for p in pointers)
            and direct[1] == tuple(t.dtype for t in tensors)
        ):
            (run, function, metadata), _, _, fixed, device = direct
            stream = torch._C._cuda_getCurrentRawStream(device)
            run(*self._grid3, stream, function, metadata, None, None, None, *pointers, *scalars, *fixed)
            return
        entry = self._launch(
            self._grid, (*tensors, *scalars), self._constexprs, self._num_warps, self._num_stages
        )
        if entry is not None and not any(p % 16 for p in pointers):
            names = self._launch.arg_names[len(tensors) + len(scalars) :]
            fixed = tuple(self._constexprs[name] for name in names)
            dtypes = tuple(t.dtype for t in tensors)
            self._direct = (entry, dtypes, scalars, fixed, tensors[0].device.index)


def _unspecialized(fn: Any) -> tuple[set[str], set[str]]:
    """The argument names `fn` lists in do_not_specialize and do_not_specialize_on_alignment (a
    JITFunction keeps them on its params; the interpreter's function, in the options it was made with)."""
    params = getattr(fn, "params", None)
    if params is not None:
        return ({p.name for p in params if p.do_not_specialize},
                {p.name for p in params if p.do_not_specialize_on_alignment})  # fmt: skip
    options = getattr(fn, "kwargs", {})
    return set(options.get("do_not_specialize") or ()), set(options.get("do_not_specialize_on_alignment") or ())


def _specialization(value: Any, specialize: bool = True, align: bool = True) -> tuple:
    """What Triton may specialize an argument on: a pointer's dtype and 16-byte alignment; an
    integer's being 0 or 1, divisible by 16, and its width; a float's being a float. `specialize` /
    `align` False: the kernel's do_not_specialize / do_not_specialize_on_alignment name it."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, align and value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return (value,)
    if isinstance(value, int):
        width = (-(2**31) <= value < 2**31, value < 2**63)
        return (int, specialize and value in (0, 1) and value, specialize and value % 16 == 0, *width)
    if isinstance(value, float):
        return (float,)
    return (type(value), value)  # anything else: by value, to stay on the safe side


def compiled_variants() -> Counter[str]:
    """Specializations Triton has compiled so far, per kernel of this package (every device): the
    difference over a run tells whether, and what, it compiled inside it (`.total()`: how many)."""
    from triton.runtime.jit import JITFunction

    counts: Counter[str] = Counter()
    for name, module in list(sys.modules.items()):
        if name.startswith(__package__ + "."):
            for value in vars(module).values():
                if isinstance(value, JITFunction):
                    counts[value.fn.__name__] += sum(len(caches[0]) for caches in value.device_caches.values())
    return counts
