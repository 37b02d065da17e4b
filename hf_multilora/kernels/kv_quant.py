"""Quantized KV pages: FP8 (e4m3) and INT4 K/V in ordinary pool pages, with their scales inside.

Why: KV memory decides how many requests (and resident adapters) fit the pool. A quantized page is
an ordinary "kv" page of the same bytes holding more tokens: with Llama-2-7B's 256 KiB pages, 16
tokens of one layer in bf16, 31 in FP8, 60 in INT4 (1.94x, 3.75x).

Layout of one page (one layer, `tokens` slots), read as bytes (`storage.view(torch.uint8)`, page p
from byte p * page_bytes), head-major so that one (row, head) reads contiguous runs; every region
starts on a 16-byte boundary:

    K codes [kv_heads, tokens, code_bytes]   FP8: one e4m3 byte per element (code_bytes = head_dim)
    V codes [kv_heads, tokens, code_bytes]   INT4: two per byte, dims d and d + head_dim/2 sharing
                                             byte d (low nibble: d) (code_bytes = head_dim / 2)
    meta    [kv_heads, tokens, 2 | 4] fp16   FP8: K scale, V scale (absmax / 448)
                                             INT4: K scale, K min, V scale, V min (scale: (max - min) / 15)

A cell's metadata lies together (`meta_bytes`: 4 or 8) so that the decode attention reads it as one
word per key, a load Triton pipelines like the codes; four fp16 regions made four 2-byte gathers per
key, loaded in the loop body and waited for (int4 decode 208 -> 187 us at 16 x 4096 on an H200).

Quantization is per (token, head), done when a token is written: x ~ code * scale (FP8) or
code * scale + min (INT4, codes 0..15). The scale and min are rounded to fp16 first and the codes
computed from the rounded values, so what is stored dequantizes consistently. A head whose values
are all equal (or zero) gets scale 0 and dequantizes exactly; a zeroed page reads as zeros.

This module holds the layout, the quantizers and the plain-PyTorch write / gather paths (the
references the Triton kernels are tested against, and the CPU path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .paged_attention import _positions, stored_tokens

KV_DTYPES = ("fp8", "int4")
FP8_MAX = 448.0  # the largest finite float8 e4m3fn
INT4_LEVELS = 15
_ALIGN = 16
_META_BYTES = 2  # fp16 scale / min


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _meta_bytes(kv_dtype: str) -> int:
    return (2 if kv_dtype == "fp8" else 4) * _META_BYTES


@dataclass(frozen=True)
class KvLayout:
    """Where a quantized page keeps what (byte offsets inside the page; see the module doc)."""

    kv_dtype: str
    kv_heads: int
    head_dim: int
    page_bytes: int
    tokens: int  # slots per page
    code_bytes: int  # per (token, head)
    k_codes: int
    v_codes: int
    k_scale: int  # of cell 0 (head * tokens + slot); cell c's at + c * meta_bytes
    v_scale: int
    k_min: int  # INT4 only (-1 for FP8)
    v_min: int

    @property
    def meta_bytes(self) -> int:
        """Bytes of fp16 metadata per (token, head) cell: K and V scales, and INT4's minimums."""
        return _meta_bytes(self.kv_dtype)

    @property
    def token_bytes(self) -> int:
        """Bytes one token of one layer takes, all KV heads: K and V codes, scales (and minimums);
        what an attention reads per key, the regions' alignment aside."""
        return self.kv_heads * (2 * self.code_bytes + self.meta_bytes)

    @classmethod
    def of(cls, kv_dtype: str, kv_heads: int, head_dim: int, page_bytes: int) -> KvLayout:
        """The layout with the most token slots that fit `page_bytes`; ValueError for an unknown
        dtype, an odd head_dim with INT4, or a page too small for one token."""
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        if kv_heads < 1 or head_dim < 1:
            raise ValueError(f"kv_heads and head_dim must be positive, got {kv_heads}, {head_dim}")
        if kv_dtype == "int4" and head_dim % 2:
            raise ValueError(f"int4 KV packs two dims per byte: head_dim must be even, got {head_dim}")
        code_bytes = head_dim if kv_dtype == "fp8" else head_dim // 2
        tokens = 0
        while cls._bytes(kv_dtype, kv_heads, code_bytes, tokens + 1) <= page_bytes:
            tokens += 1
        if tokens == 0:
            raise ValueError(
                f"a page of {page_bytes} bytes cannot hold one {kv_dtype} token of {kv_heads} heads x {head_dim}"
            )
        offsets = cls._offsets(kv_dtype, kv_heads, code_bytes, tokens)
        return cls(kv_dtype, kv_heads, head_dim, page_bytes, tokens, code_bytes, *offsets)

    @staticmethod
    def _offsets(kv_dtype: str, heads: int, code_bytes: int, tokens: int) -> tuple[int, ...]:
        meta = 2 * _align(heads * tokens * code_bytes)
        if kv_dtype == "fp8":
            return 0, meta // 2, meta, meta + _META_BYTES, -1, -1
        return 0, meta // 2, meta, meta + 2 * _META_BYTES, meta + _META_BYTES, meta + 3 * _META_BYTES

    @classmethod
    def _bytes(cls, kv_dtype: str, heads: int, code_bytes: int, tokens: int) -> int:
        return 2 * _align(heads * tokens * code_bytes) + _align(heads * tokens * _meta_bytes(kv_dtype))


def quantize(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [..., head_dim] -> (codes uint8 [..., code_bytes], scale fp16 [...], min fp16 [...] or None)."""
    x = x.float()
    if kv_dtype == "fp8":
        scale = (x.abs().amax(-1) / FP8_MAX).to(torch.float16)
        divisor = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        codes = (x / divisor[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return codes, scale, None
    low = x.amin(-1).to(torch.float16)
    scale = ((x.amax(-1) - low.float()) / INT4_LEVELS).to(torch.float16)
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    levels = ((x - low.float()[..., None]) / divisor[..., None]).round().clamp(0, INT4_LEVELS).to(torch.uint8)
    half = x.shape[-1] // 2
    return levels[..., :half] | (levels[..., half:] << 4), scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, kv_dtype: str) -> torch.Tensor:
    """The inverse of `quantize`, in fp32: [..., head_dim]."""
    if kv_dtype == "fp8":
        return codes.view(torch.float8_e4m3fn).float() * scale.float()[..., None]
    levels = torch.cat([codes & 15, codes >> 4], dim=-1).float()
    return levels * scale.float()[..., None] + low.float()[..., None]


def _byte_index(
    layout: KvLayout, block_table: torch.Tensor, pos: torch.Tensor, region: int, width: int, stride: int
) -> torch.Tensor:
    """Where `width` bytes per (row, position, head), a cell every `stride` bytes from byte `region` of
    each page, lie in the pool: [batch, positions, kv_heads, width] byte offsets, for positions pos
    [batch, positions] (slot pos % tokens of page block_table[b, pos // tokens])."""
    pages = block_table.long().cpu().gather(1, pos // layout.tokens)
    cell = torch.arange(layout.kv_heads)[None, None, :] * layout.tokens + (pos % layout.tokens)[:, :, None]
    first = pages[:, :, None] * layout.page_bytes + region + cell * stride
    return first[..., None] + torch.arange(width)


def _regions(layout: KvLayout) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(codes, scale, min) byte offsets of K, then of V (min -1: FP8 has none)."""
    return (layout.k_codes, layout.k_scale, layout.k_min), (layout.v_codes, layout.v_scale, layout.v_min)


def write_kv_quant_torch(
    storage: torch.Tensor,
    layout: KvLayout,
    block_table: torch.Tensor,
    start: torch.Tensor | int,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Quantize k, v [batch, new, kv_heads, head_dim] and store token i of row b at position start
    (or start[b]) + i: slot pos % tokens of page block_table[b, pos // tokens]; a negative position
    (left padding) is not stored."""
    batch, new, _, _ = k.shape
    data = storage.view(torch.uint8)
    block_table, pos, k, v = stored_tokens(block_table, _positions(start, batch, new, torch.device("cpu")), k, v)
    for x, (codes_at, scale_at, min_at) in zip((k, v), _regions(layout), strict=True):
        codes, scale, low = quantize(x, layout.kv_dtype)  # [batch, new, heads, ...]
        index = _byte_index(layout, block_table, pos, codes_at, layout.code_bytes, layout.code_bytes)
        data[index.to(data.device)] = codes.to(data.device)
        for at, values in ((scale_at, scale), (min_at, low)):
            if values is not None:
                index = _byte_index(layout, block_table, pos, at, _META_BYTES, layout.meta_bytes).to(data.device)
                data[index] = values.contiguous().view(torch.uint8).view(*values.shape, _META_BYTES).to(data.device)


def gather_kv_quant_torch(
    storage: torch.Tensor, layout: KvLayout, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions 0..length-1 of every row, dequantized: K, V [batch, length, kv_heads, head_dim] fp32."""
    data = storage.view(torch.uint8)
    pos = torch.arange(length)[None, :].expand(block_table.shape[0], length)

    def read(region: int, width: int, stride: int) -> torch.Tensor:
        return data[_byte_index(layout, block_table, pos, region, width, stride).to(data.device)]

    def meta(region: int) -> torch.Tensor | None:
        if region < 0:
            return None
        return read(region, _META_BYTES, layout.meta_bytes).contiguous().view(torch.float16)[..., 0]

    k, v = (
        dequantize(read(codes_at, layout.code_bytes, layout.code_bytes), meta(scale_at), meta(min_at), layout.kv_dtype)
        for codes_at, scale_at, min_at in _regions(layout)
    )
    return k, v
