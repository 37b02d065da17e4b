"""RMSNorm and rotary embedding, each one launch, with the arithmetic of transformers' Llama code.

Why: in a decoder step the GEMMs and attention are a few large kernels, but HF's RMSNorm (cast, pow,
mean, add, rsqrt, mul, cast, mul) and rotary embedding (four multiplies, two adds, two negations
and two concatenations for q and k) are ~18 small kernels per layer. Replayed from a CUDA graph a
Llama-2-7B decode step at batch 32 spends 2.5 of its 8.5 ms of GPU time on them; fused they cost
~0.3 ms.

Numerics. Both kernels compute in fp32 and round to the tensors' dtype where torch does, but not
bit for bit: `rms_norm` sums the squares in another order than torch's reduction, and in `rotary`
the compiler may fuse a product into the sum (one rounding where torch has two). Either differs
from its reference by one unit in the last place at most, on a few elements (bf16: ~1% of them).
So MultiLoraModel's decode steps agree with each other (eager or replayed, both fused), and with
transformers' own code within rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import SpecializedLaunch


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [rows, cols], last dim contiguous
    weight_ptr,  # [cols]
    out_ptr,  # [rows, cols] contiguous, x's dtype
    x_row_stride,
    cols,
    eps,
    BLOCK: tl.constexpr,  # next power of two >= cols
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < cols
    x = tl.load(x_ptr + row * x_row_stride + offsets, mask=inside, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / cols
    normed = (x * (1.0 / tl.sqrt(variance + eps))).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + offsets, mask=inside)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * cols + offsets, out, mask=inside)


@triton.jit(  # shape-dependent scalars and table pointers: see kernels/launch.py
    do_not_specialize=["tokens"],
)
def _rotate_half_kernel(
    x_ptr,  # [batch, heads, tokens, head_dim], last dim contiguous
    cos_ptr,  # [batch or 1, tokens, head_dim], last dim contiguous
    sin_ptr,  # like cos
    out_ptr,  # x's shape and strides
    heads,
    tokens,
    x_b, x_h, x_t,  # x's strides (batch, head, token)
    c_b, c_t,  # cos / sin strides (batch: 0 when broadcast)
    o_b, o_h, o_t,  # out's strides
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_HEADS: tl.constexpr,
):  # fmt: skip
    bt = tl.program_id(0).to(tl.int64)
    b, t = bt // tokens, bt % tokens
    h = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, HALF)[None, :]
    inside = h < heads
    dtype = out_ptr.dtype.element_ty
    c = cos_ptr + b * c_b + t * c_t + d
    s = sin_ptr + b * c_b + t * c_t + d
    cos1, cos2 = tl.load(c).to(tl.float32), tl.load(c + HALF).to(tl.float32)
    sin1, sin2 = tl.load(s).to(tl.float32), tl.load(s + HALF).to(tl.float32)
    x = x_ptr + b * x_b + h * x_h + t * x_t + d
    x1 = tl.load(x, mask=inside).to(tl.float32)
    x2 = tl.load(x + HALF, mask=inside).to(tl.float32)
    # torch: (x * cos) + (cat(-x2, x1) * sin), each product and the sum rounded to the dtype
    first = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    second = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    o = out_ptr + b * o_b + h * o_h + t * o_t + d
    tl.store(o, first.to(dtype), mask=inside)
    tl.store(o + HALF, second.to(dtype), mask=inside)


_RMS_NORM = SpecializedLaunch(_rms_norm_kernel)
_ROTATE_HALF = SpecializedLaunch(_rotate_half_kernel)
_MAX_NORM_BLOCK = 16384  # columns one program holds in registers


def rms_norm_fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` takes these (else call the reference): the weight in x's dtype (torch would
    promote), a float dtype, the last dim contiguous and short enough for one program."""
    cols = x.shape[-1] if x.dim() else 0
    return (
        x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.shape == (cols,)
        and weight.is_contiguous()
        and weight.device == x.device
        and 0 < cols <= _MAX_NORM_BLOCK
        and x.stride(-1) == 1
        and x.numel() > 0
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference` in one launch; x [..., cols] (see `rms_norm_fusable`)."""
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)  # a view where the rows are evenly strided
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(cols)
    _RMS_NORM(
        grid=(x2.shape[0],),
        args=(x2, weight, out, x2.stride(0), cols, float(eps)),
        constexprs={"BLOCK": block},
        num_warps=max(1, min(16, block // 256)),
    )
    return out.view(x.shape)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


def rotary_fusable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rotary` takes these (else call the reference): q, k [batch, heads, tokens, head_dim],
    cos, sin [batch or 1, tokens, head_dim], one float dtype, one device, last dims contiguous."""
    if (
        q.dim() != 4
        or k.dim() != 4
        or cos.dim() != 3
        or cos.shape != sin.shape
        or cos.stride() != sin.stride()
    ):
        return False
    batch, _, tokens, head_dim = q.shape
    half = head_dim // 2
    return (
        q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and k.dtype == cos.dtype == sin.dtype == q.dtype
        and k.device == cos.device == sin.device == q.device
        and (k.shape[0], k.shape[2], k.shape[3]) == (batch, tokens, head_dim)
        and cos.shape[0] in (1, batch)
        and cos.shape[1:] == (tokens, head_dim)
        and head_dim % 2 == 0
        and half & (half - 1) == 0
        and q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1
        and q.numel() > 0
        and k.numel() > 0
    )


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_reference` (unsqueeze_dim=1), one launch per tensor (see `rotary_fusable`); the outputs
    have their inputs' strides, as torch's elementwise results do."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    out = torch.empty_like(x)
    block_heads = min(triton.next_power_of_2(heads), max(1, 4096 // head_dim))
    cos_batch_stride = cos.stride(0) if cos.shape[0] > 1 else 0
    _ROTATE_HALF(
        grid=(batch * tokens, triton.cdiv(heads, block_heads)),
        args=(
            x, cos, sin, out, heads, tokens,
            x.stride(0), x.stride(1), x.stride(2),
            cos_batch_stride, cos.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
        ),
        constexprs={"HALF": head_dim // 2, "BLOCK_HEADS": block_heads},
        num_warps=4,
    )  # fmt: skip
    return out


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb with unsqueeze_dim=1."""

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
