"""Fused RMSNorm and rotary embedding inside MultiLoraModel's calls (kernels/fused_glue.py says why).

How: for the length of a MultiLoraModel call (`Fusion.active`) each RMSNorm module of its base model
gets an instance forward, and each modeling module that defines `apply_rotary_pos_emb` a wrapper of
it; both run the fused kernel in a thread that is inside such a call, on tensors the Triton backend
runs and the kernel takes, and the original code everywhere else (other threads, other models of
the same architecture, the CPU, torch.compile). Results differ from transformers' code by rounding (see
kernels/fused_glue.py).

Only code that does what transformers' Llama code does is replaced: a norm class's forward and a
module's `apply_rotary_pos_emb` (and its `rotate_half`) must have the bytecode of Llama's, and the
first fused call for a (function, dtype, device) is checked against the original on a random probe
(within rounding) before the kernel is used for it. So a future
transformers whose Llama code computes something else is never silently fused.

The decode-sized projections (q/k/v, gate/up, o, down: `decode_linears.py`) are installed and
removed with the rest.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.models.llama import modeling_llama

from .backend import use_triton
from .decode_linears import DecodeLinears
from .kernels import fused_glue

_thread = threading.local()  # depth: MultiLoraModel calls this thread is in
_probed: dict[tuple, bool] = {}  # (original function, dtype, device) -> the kernel reproduces it
_PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
_rotary_lock = threading.Lock()
_rotary_users: dict[types.ModuleType, int] = {}  # modeling module -> calls holding its wrapper


class Fusion:
    """The fused code of one model, installed for the length of its calls (`active()`) and removed
    after, so that outside them (a plain call of the base model, transformers' own torch.compile of
    it) the model runs transformers' code untouched. A captured CUDA graph keeps the kernels it
    recorded."""

    def __init__(self, model: torch.nn.Module) -> None:
        llama_norm = modeling_llama.LlamaRMSNorm.forward
        self.norms = [m for m in model.modules() if _same_code(type(m).forward, llama_norm)]
        names = {type(m).__module__ for m in model.modules()}
        self.rotary_modules = [sys.modules[n] for n in sorted(names) if _rotary_like_llama(sys.modules[n])]
        self.linears = DecodeLinears(model, lambda x: _fusing(x))  # late-bound: tests patch _fusing
        self._depth = 0  # calls of this model running (they nest: the model's lock is re-entrant)

    @contextmanager
    def active(self) -> Iterator[None]:
        """A call of the model in the current thread (the caller holds the model's lock)."""
        if self._depth == 0:
            self._install()
        self._depth += 1
        depth = getattr(_thread, "depth", 0)
        _thread.depth = depth + 1
        try:
            yield
        finally:
            _thread.depth = depth
            self._depth -= 1
            if self._depth == 0:
                self._remove()

    def _install(self) -> None:
        for module in self.norms:
            module.forward = _fused_norm_forward(module, module.forward)
        self.linears.install()
        with _rotary_lock:
            for module in self.rotary_modules:
                _rotary_users[module] = _rotary_users.get(module, 0) + 1
                if _rotary_users[module] == 1:
                    module.apply_rotary_pos_emb = _fused_rotary(module.apply_rotary_pos_emb)

    def _remove(self) -> None:
        self.linears.remove()
        for module in self.norms:
            original = module.forward.original_forward
            if getattr(original, "__func__", None) is type(module).forward:
                del module.forward  # the class's own forward again
            else:
                module.forward = original  # an instance forward someone else set (accelerate's hooks)
        with _rotary_lock:
            for module in self.rotary_modules:
                _rotary_users[module] -= 1
                if _rotary_users[module] == 0:
                    del _rotary_users[module]
                    module.apply_rotary_pos_emb = module.apply_rotary_pos_emb.original


def _fused_norm_forward(module: torch.nn.Module, original: Callable) -> Callable:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if (
            _fusing(hidden_states)
            and fused_glue.rms_norm_fusable(hidden_states, weight)
            and _checked(type(module).forward, hidden_states, lambda x: _norm_matches(module, original, x))
        ):
            return fused_glue.rms_norm(hidden_states, weight, module.variance_epsilon)
        return original(hidden_states)

    forward.original_forward = original
    return forward


def _norm_matches(module: torch.nn.Module, original: Callable, x: torch.Tensor) -> bool:
    probe = _random((5, x.shape[-1]), x)
    expected = original(probe)
    got = fused_glue.rms_norm(probe, module.weight, module.variance_epsilon)
    tolerance = _PROBE_TOLERANCE[x.dtype]
    return expected.dtype == got.dtype and torch.allclose(got, expected, rtol=tolerance, atol=tolerance)


def _rotary_like_llama(module: types.ModuleType) -> bool:
    function = getattr(module, "apply_rotary_pos_emb", None)
    return _same_code(function, modeling_llama.apply_rotary_pos_emb) and _same_code(
        getattr(module, "rotate_half", None), modeling_llama.rotate_half
    )


def _fused_rotary(original: Callable) -> Callable:
    @functools.wraps(_function_of(original) or original)
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any,
                             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if (
            _fusing(q)
            and not args
            and kwargs.keys() <= {"unsqueeze_dim"}
            and kwargs.get("unsqueeze_dim", 1) == 1
            and fused_glue.rotary_fusable(q, k, cos, sin)
            and _checked(original, q, lambda x: _rotary_matches(original, x))
        ):
            return fused_glue.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def _rotary_matches(original: Callable, x: torch.Tensor) -> bool:
    head_dim = x.shape[-1]
    q, k = _random((2, 3, 4, head_dim), x), _random((2, 1, 4, head_dim), x)
    cos, sin = _random((2, 4, head_dim), x), _random((2, 4, head_dim), x)
    expected, got = original(q, k, cos, sin), fused_glue.rotary(q, k, cos, sin)
    return all(_within_rounding(g, e, t, cos, sin) for e, g, t in zip(expected, got, (q, k), strict=True))


def _within_rounding(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> bool:  # fmt: skip
    """x * cos + rotate_half(x) * sin rounded once (the kernel) or after each product and the sum
    (transformers) differ by ~1.5 ulp of the terms' magnitude, which where the terms cancel is far
    more than of the result's (an elementwise allclose rejected the kernel on CUDA in fp16); a wrong
    formula is off by the terms themselves."""
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    terms = (x.float() * cos).abs() + (modeling_llama.rotate_half(x.float()) * sin).abs()
    bound = 2 * torch.finfo(x.dtype).eps * terms + torch.finfo(x.dtype).tiny
    return bool(((got.float() - expected.float()).abs() <= bound).all())


def _fusing(x: torch.Tensor) -> bool:
    # is_compiling first: torch.compile folds it and never traces the thread-local read
    return not torch.compiler.is_compiling() and getattr(_thread, "depth", 0) > 0 and use_triton(x)


def _checked(function: Callable, x: torch.Tensor, matches: Callable[[torch.Tensor], bool]) -> bool:
    """Whether the kernel reproduced `function` on a probe for x's dtype and device (probed on first use;
    never inside a CUDA graph capture, where the original runs until a probe outside one)."""
    key = (function, x.dtype, x.device)
    verdict = _probed.get(key)
    if verdict is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        verdict = _probed[key] = bool(matches(x))
    return verdict


def _random(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Random values from a generator of their own: the caller's seeded sampling must not change."""
    generator = torch.Generator(device=like.device).manual_seed(len(_probed))
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)


def _function_of(f: Any) -> types.FunctionType | None:
    """f, or the function a `kernels` Func module stands for: with the `kernels` package installed (a
    dependency of transformers >= 5.25), `@use_kernel_forward_from_hub` makes a modeling module's
    `apply_rotary_pos_emb` an instance of a Func module whose forward calls the function (or a hub
    kernel that `kernelize` picked: the probe compares against whatever the Func computes)."""
    if isinstance(f, torch.nn.Module):
        f = inspect.getclosurevars(type(f).forward).nonlocals.get("func")
    return f if isinstance(f, types.FunctionType) else None


def _same_code(f: Any, g: Any) -> bool:
    """Whether f compiles to g's bytecode, names and non-string constants (docstrings aside); False
    where either is no Python function (nor a Func module of one)."""
    a, b = (getattr(_function_of(x), "__code__", None) for x in (f, g))
    if a is None or b is None:
        return False

    def constants(code: types.CodeType) -> tuple:
        return tuple(c for c in code.co_consts if not isinstance(c, str))

    return (a.co_code, a.co_names, a.co_varnames, constants(a)) == (
        b.co_code,
        b.co_names,
        b.co_varnames,
        constants(b),
    )
