"""Prefills of new shapes reuse the kernels compiled for earlier ones.

Triton compiles a kernel anew for each combination of its integer arguments' being 1 or divisible by
16 and its pointers' alignment; the kernels exempt the arguments that follow a forward's shape (see
kernels/launch.py). Before, a 7B serving trace at 14 requests/s compiled 16-28 kernels inside its
timed run. In the interpreter this checks the launch keys the compiled launchers are cached by; on
CUDA, also Triton's own compile count.
"""

from collections import defaultdict

import pytest
import torch

from hf_multilora import MultiLoraModel
from hf_multilora.kernels.launch import SpecializedLaunch, compiled_variants

VOCAB_LOW = 3


@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_a_prefill_of_another_shape_launches_the_kernels_compiled_for_the_first(llama_zoo, monkeypatch, kv_dtype):
    """One row of 16 tokens with one adapter, then three rows of 9 tokens with two adapters and the
    base: the batch (1 / 3), the query length (divisible by 16 / not) and the SGMV tile count (1 / 2)
    differ, the tile sizes (constexprs) do not. (The quantized KV kernels launch through Triton's
    own path: only the CUDA compile count sees them.)"""
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base().to(device), adapters=llama_zoo.paths)
    keys: dict[str, set] = defaultdict(set)
    call = SpecializedLaunch.__call__

    def recorded(self, grid, args, constexprs, num_warps, num_stages=3):
        keys[self._fn.__name__].add(self._key(args, constexprs, num_warps, num_stages, pdl=False))
        return call(self, grid, args, constexprs, num_warps, num_stages)

    monkeypatch.setattr(SpecializedLaunch, "__call__", recorded)
    gen = torch.Generator().manual_seed(0)

    def prefill(rows: int, tokens: int, adapters: list) -> dict[str, set]:
        keys.clear()
        ids = torch.randint(VOCAB_LOW, 128, (rows, tokens), generator=gen).to(device)
        model.generate(ids, adapter_ids=adapters, max_new_tokens=1, do_sample=False, pad_token_id=0,
                       kv_cache_dtype=kv_dtype)  # fmt: skip
        return {name: set(found) for name, found in keys.items()}

    prefill(2, 5, [None, "qv_r4"])  # the first call also checks the fused kernels on small probes
    first = prefill(1, 16, ["attn_r8"])
    compiled = compiled_variants() if device == "cuda" else None
    second = prefill(3, 9, ["qv_r4", "attn_r8", None])
    expected = {"_sgmv_shrink_kernel", "_sgmv_expand_kernel"}
    expected |= {"_paged_attention_kernel", "_write_kv_kernel"} if kv_dtype is None else set()
    assert expected <= set(first), set(first)
    assert second == first
    if compiled is not None:
        assert compiled_variants() == compiled
