"""The whole model on CUDA with the compiled Triton kernels (run on the device: pytest -m gpu)."""

import copy

import pytest
import torch
from conftest import VOCAB

import hf_multilora
from hf_multilora import MultiLoraModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
POOL_BYTES = 2**28  # tiny models; the default (half the free memory) would starve the next test's model


def prompts(rows, length, seed=0):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed)).cuda()


def on_cuda(model, dtype=torch.float32):
    """A CUDA copy: the zoo's CPU references are shared by other tests and must stay fp32."""
    return copy.deepcopy(model).to("cuda", dtype)


def rel_err(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("zoo_name", ["llama_zoo", "qwen2_zoo", "gpt2_zoo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_on_cuda_matches_peft(zoo_name, dtype, request):
    zoo = request.getfixturevalue(zoo_name)
    model = MultiLoraModel.from_pretrained(
        zoo.fresh_base().to("cuda", dtype), adapters=zoo.paths, pool_bytes=POOL_BYTES
    )
    names = list(zoo.paths)
    rows = [names[0], None, *names, names[-1]]
    input_ids = prompts(len(rows), 11)
    logits = model(input_ids, adapter_ids=rows).logits
    for i, name in enumerate(rows):
        ref = on_cuda(zoo.base if name is None else zoo.peft(name), dtype)
        with torch.no_grad():
            expected = ref(input_ids[i : i + 1]).logits[0]
        limit = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel_err(logits[i], expected) < limit, f"row {i} ({name})"


def test_greedy_generate_on_cuda_matches_peft(llama_zoo):
    model = MultiLoraModel.from_pretrained(
        llama_zoo.fresh_base().cuda(), adapters=llama_zoo.paths, pool_bytes=POOL_BYTES
    )
    names = list(llama_zoo.paths)
    rows = [*names, None, names[0]]
    input_ids = prompts(len(rows), 6, seed=1)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids, adapter_ids=rows, **kwargs)
    for i, name in enumerate(rows):
        ref = on_cuda(llama_zoo.base if name is None else llama_zoo.peft(name))
        expected = ref.generate(input_ids=input_ids[i : i + 1], **kwargs)
        assert out[i].tolist() == expected[0].tolist(), f"row {i} ({name})"
    assert model.memory_stats()["adapters_resident"]


def test_peft_dropin_on_cuda(llama_zoo):
    peft_model = llama_zoo.peft_all().cuda()
    names = list(llama_zoo.paths)
    adapter_names = [names[1], "__base__", *names]
    input_ids = prompts(len(adapter_names), 7, seed=2)
    with torch.no_grad():
        expected = peft_model(input_ids, adapter_names=adapter_names).logits
        hf_multilora.enable(peft_model)
        got = peft_model(input_ids, adapter_names=adapter_names).logits
    assert rel_err(got, expected) < 1e-5
