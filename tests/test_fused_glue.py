"""The fused RMSNorm and rotary kernels against their plain-PyTorch references (Triton interpreter on
CPU, the GPU under -m gpu), and the glue that puts them into MultiLoraModel's calls."""

import types

import pytest
import torch
from conftest import DEVICE
from helpers import interpreter_only
from transformers.models.llama import modeling_llama

from hf_multilora import MultiLoraModel, fusion
from hf_multilora.kernels import fused_glue

DEVICES = [
    pytest.param(
        "cpu",
        marks=interpreter_only("the cuda case is its twin"),
    ),
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
    ),
]
# The interpreter rounds fp32 -> bf16 by truncation (a GPU rounds to nearest even): bf16 is checked on the GPU.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def skip_interpreted_bf16(device, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter rounds fp32 -> bf16 by truncation; bf16 runs on the GPU (-m gpu)")


def prompts(rows, length, seed):
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def random(*shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_the_reference_within_rounding(device, dtype):
    skip_interpreted_bf16(device, dtype)
    # rows strided (every other row of a wider tensor), columns not a power of two
    x = random(6, 2, 3, 96, dtype=dtype, device=device, seed=1)[:, 1]
    weight = random(96, dtype=dtype, device=device, seed=2)
    assert fused_glue.rms_norm_fusable(x, weight)
    got = fused_glue.rms_norm(x, weight, 1e-6)
    expected = fused_glue.rms_norm_reference(x, weight, 1e-6)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    # the sum of squares runs in another order: the normalised value may round the other way (1 ulp),
    # and the weight multiplies that
    limit = 2 * ULP[dtype] * weight.abs().max().item() * expected.abs().max().item() + 1e-6
    assert (got.float() - expected.float()).abs().max().item() <= limit
    if dtype != torch.float32:  # rounded to 8 or 11 bits, nearly all equal: not a looser formula
        assert (got != expected).float().mean().item() < 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", [1, 3])
def test_rotary_matches_the_reference_within_rounding(device, dtype, cos_batch):
    skip_interpreted_bf16(device, dtype)
    # q and k as HF makes them: [batch, tokens, heads, dim] viewed as [batch, heads, tokens, dim]; GQA
    q = random(3, 5, 6, 16, dtype=dtype, device=device, seed=3).transpose(1, 2)
    k = random(3, 5, 2, 16, dtype=dtype, device=device, seed=4).transpose(1, 2)
    cos = random(cos_batch, 5, 16, dtype=dtype, device=device, seed=5)
    sin = random(cos_batch, 5, 16, dtype=dtype, device=device, seed=6)
    assert fused_glue.rotary_fusable(q, k, cos, sin)
    got, expected = fused_glue.rotary(q, k, cos, sin), fused_glue.rotary_reference(q, k, cos, sin)
    hf = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for g, e, h in zip(got, expected, hf, strict=True):
        assert g.stride() == e.stride()  # the layout torch's elementwise result has
        assert torch.equal(e, h)
        # a rounding fewer where the GPU fuses a product into the sum: within an ulp of the result
        assert (g.float() - e.float()).abs().max().item() <= 2 * ULP[dtype] * e.abs().max().item()


def test_what_the_kernels_do_not_take():
    x, w = torch.randn(2, 8), torch.randn(8)
    assert not fused_glue.rms_norm_fusable(x, w.double())  # torch would promote the output
    assert not fused_glue.rms_norm_fusable(x.t(), torch.randn(2))  # last dim strided
    q, k, cs = torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12), torch.randn(1, 3, 12)
    assert not fused_glue.rotary_fusable(q, k, cs, cs)  # half of 12 is not a power of two
    q, k, cs = torch.randn(1, 2, 3, 8).half(), torch.randn(1, 2, 3, 8).half(), torch.randn(1, 3, 8).half()
    assert fused_glue.rotary_fusable(q, k, cs, cs)
    assert not fused_glue.rotary_fusable(q, k, cs.float(), cs.float())
    assert not fused_glue.rotary_fusable(q, k, torch.randn(2, 3, 8), torch.randn(2, 3, 8))  # batch 2 vs 1


@pytest.fixture
def counted(monkeypatch):
    """How many times each fused kernel ran."""
    calls = {"rms_norm": 0, "rotary": 0}
    for name in calls:
        kernel = getattr(fused_glue, name)

        def spy(*args, _kernel=kernel, _name=name):
            calls[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(fused_glue, name, spy)
    return calls


def test_the_model_uses_the_fused_code_inside_its_calls_only(llama_zoo, monkeypatch, counted):
    base = llama_zoo.fresh_base().half().to(DEVICE)  # on CUDA, the compiled kernels
    ids = prompts(2, 5, seed=3).to(DEVICE)
    plain = base(ids).logits
    original_rotary = modeling_llama.apply_rotary_pos_emb
    model = MultiLoraModel.from_pretrained(base, adapters=llama_zoo.paths)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    monkeypatch.setattr(fusion, "_probed", {})  # probes of earlier tests' calls (in this process) run again
    norms = [m for m in base.modules() if isinstance(m, modeling_llama.LlamaRMSNorm)]
    installed = []
    base.model.layers[0].register_forward_pre_hook(
        lambda *_: installed.append(
            (
                all("forward" in m.__dict__ for m in norms),
                modeling_llama.apply_rotary_pos_emb is not original_rotary,
            )
        )
    )

    fused = model(ids).logits
    layers = base.config.num_hidden_layers
    # the probes ran each kernel once, then every norm and every layer's rotary
    assert counted == {"rms_norm": 1 + 2 * layers + 1, "rotary": 1 + layers}
    assert installed == [(True, True)]
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=2e-3)
    # outside a call: transformers' code, untouched
    assert (
        not any("forward" in m.__dict__ for m in norms)
        and modeling_llama.apply_rotary_pos_emb is original_rotary
    )
    torch.testing.assert_close(base(ids).logits, plain, rtol=0, atol=0)
    if DEVICE == "cpu":  # CUDA tensors always take the Triton kernels
        monkeypatch.setenv("HF_MULTILORA_KERNELS", "torch")
        model(ids)  # the torch backend: HF's code
        assert counted == {"rms_norm": 1 + 2 * layers + 1, "rotary": 1 + layers}


def test_a_kernel_that_does_not_reproduce_the_original_is_not_used(llama_zoo, monkeypatch):
    """The probe guards against a transformers whose Llama code computes something else."""
    model = MultiLoraModel.from_pretrained(llama_zoo.fresh_base().half().to(DEVICE), adapters=llama_zoo.paths)
    ids = prompts(2, 5, seed=3).to(DEVICE)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    with monkeypatch.context() as unfused:  # transformers' norm and rotary, the Triton LoRA and attention
        unfused.setattr(fusion, "_fusing", lambda x: False)
        expected = model(ids).logits
    monkeypatch.setattr(fusion, "_probed", {})
    rms_norm, rotary = fused_glue.rms_norm, fused_glue.rotary
    monkeypatch.setattr(fused_glue, "rms_norm", lambda x, w, eps: rms_norm(x, w, eps) * 1.01)
    monkeypatch.setattr(fused_glue, "rotary", lambda q, k, c, s: tuple(t * 1.05 for t in rotary(q, k, c, s)))
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert len(fusion._probed) == 2 and set(fusion._probed.values()) == {False}


def test_only_llama_code_is_replaced():
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        return q * cos, k * cos

    module = types.ModuleType("other")
    module.apply_rotary_pos_emb, module.rotate_half = apply_rotary_pos_emb, modeling_llama.rotate_half
    assert not fusion._rotary_like_llama(module)
    module.apply_rotary_pos_emb = modeling_llama.apply_rotary_pos_emb
    assert fusion._rotary_like_llama(module)
    assert not fusion._same_code(modeling_llama.LlamaMLP.forward, modeling_llama.LlamaRMSNorm.forward)


def func_module(func):
    """What the `kernels` package (a dependency of transformers >= 5.25) makes of a function that
    transformers decorates with `@use_kernel_forward_from_hub`: an instance of a module whose forward
    calls it. The real package where it is installed, else a module built the same way."""
    try:
        from kernels import use_kernel_forward_from_hub
    except ImportError:

        class Func(torch.nn.Module):
            def forward(self, *args, **kwargs):
                return func(*args, **kwargs)

        return Func()
    return use_kernel_forward_from_hub("rotary_pos_emb")(func)


def test_rotary_wrapped_in_a_kernels_func_module_is_recognised_and_still_computed(llama_zoo, monkeypatch):
    """With transformers 5.25 and `kernels`, MultiLoraModel.from_pretrained raised AttributeError
    ('Func' object has no attribute '__code__') while comparing apply_rotary_pos_emb with Llama's."""
    original = modeling_llama.apply_rotary_pos_emb
    if not isinstance(original, torch.nn.Module):  # wrapped already with transformers >= 5.25 and `kernels`
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", func_module(original))
    wrapped = modeling_llama.apply_rotary_pos_emb
    assert fusion._rotary_like_llama(modeling_llama)
    other = types.ModuleType("other")
    other.apply_rotary_pos_emb, other.rotate_half = func_module(lambda q, k, cos, sin: (q, k)), modeling_llama.rotate_half
    assert not fusion._rotary_like_llama(other)
    assert not fusion._same_code(torch.nn.Linear(2, 2), wrapped)  # a module that calls no function: no error
    base = llama_zoo.fresh_base()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = MultiLoraModel.from_pretrained(base, adapters={})
    assert modeling_llama in model._fusion.rotary_modules
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert modeling_llama.apply_rotary_pos_emb is wrapped  # the Func module is back after the call


def test_the_rotary_probe_allows_rounding_where_terms_cancel_and_nothing_more():
    """Where x * cos and rotate_half(x) * sin nearly cancel, rounding once (the kernel) and after
    each op (transformers) differ by far more than the result's own ulp; the probe must accept that
    (an elementwise allclose rejected the kernel on CUDA in fp16) and still reject a wrong formula."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(1, 2, 64, 32, generator=gen) * 8).half()
    angle = torch.rand(1, 64, 32, generator=gen) * 6.3
    cos, sin = angle.cos().half(), angle.sin().half()
    exact = x.float() * cos.float()[:, None] + modeling_llama.rotate_half(x.float()) * sin.float()[:, None]
    rounded_once = exact.half()
    per_op = x * cos[:, None] + modeling_llama.rotate_half(x) * sin[:, None]
    assert not torch.allclose(rounded_once, per_op, rtol=1e-3, atol=1e-3)
    assert fusion._within_rounding(rounded_once, per_op, x, cos, sin)
    wrong = (x.float() * cos.float()[:, None] - modeling_llama.rotate_half(x.float()) * sin.float()[:, None]).half()
    assert not fusion._within_rounding(wrong, per_op, x, cos, sin)
