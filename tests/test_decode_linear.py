"""The decode-sized linear kernel against F.linear (Triton interpreter on CPU, the GPU under -m gpu),
its tile rule, and the glue that runs a layer's projections through it inside MultiLoraModel's calls."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from hf_multilora import MultiLoraModel, decode_linears
from hf_multilora.kernels import decode_linear, sgmv
from hf_multilora.kernels.decode_linear import DecodeLinearTiles, decode_linear_tiles

SMALL = DecodeLinearTiles(block_n=16, block_k=16, num_warps=1, num_stages=1)  # tiny models' dims


def small_tiles(out_features, in_features, rows):
    """The rule's limits with tiles that fit tiny models."""
    divides = in_features % 16 == 0 and all(n % 16 == 0 for n in out_features)
    most_rows = decode_linear.MAX_ROWS_ONE_WEIGHT if len(out_features) == 1 else decode_linear.MAX_ROWS
    return SMALL if rows <= most_rows and divides and len(out_features) <= 3 else None


def random(*shape, seed, dtype=torch.float16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("sizes", [(64,), (64, 32), (64, 32, 48)])
@pytest.mark.parametrize("rows", [1, 5, 16, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_f_linear_per_weight(sizes, rows, bias):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter truncates to bf16
    x = random(rows, 80, seed=rows, dtype=dtype)
    weights = [random(n, 80, seed=10 + i, dtype=dtype) * 0.1 for i, n in enumerate(sizes)]
    biases = [random(n, seed=20 + i, dtype=dtype) if bias else None for i, n in enumerate(sizes)]
    got = decode_linear.decode_linear(x.view(1, rows, 80), weights, biases, SMALL)
    for y, w, b in zip(got, weights, biases, strict=True):
        assert y.shape == (1, rows, w.shape[0]) and y.dtype == dtype and y.is_contiguous()
        expected = F.linear(x.float(), w.float(), None if b is None else b.float())
        torch.testing.assert_close(y.view(rows, -1).float(), expected, rtol=1e-2, atol=1e-2)
        assert expected.abs().amax() > 0.5


def test_decode_linear_reads_an_input_whose_last_dim_is_strided():
    x = random(48, 5, seed=4).t()  # [5, 48], stride (1, 5)
    weight = random(32, 48, seed=5) * 0.1
    (got,) = decode_linear.decode_linear(x, [weight], [None], SMALL)
    torch.testing.assert_close(got.float(), F.linear(x.float(), weight.float()), rtol=1e-2, atol=1e-2)


def test_the_tile_rule_takes_the_measured_shapes_only():
    assert decode_linear_tiles([4096] * 3, 4096, 16) == DecodeLinearTiles(32, 128, 4, 4)  # q, k, v
    assert decode_linear_tiles([11008] * 2, 4096, 1) == DecodeLinearTiles(64, 128, 4, 4)  # gate, up
    assert decode_linear_tiles([4096], 11008, 16) == DecodeLinearTiles(32, 256, 4, 4)  # down
    assert decode_linear_tiles([4096], 11008, 17) is None  # one weight: cuBLAS above 16 rows
    assert decode_linear_tiles([11008] * 2, 4096, 32) == DecodeLinearTiles(64, 128, 4, 4)  # several: 32 rows
    assert decode_linear_tiles([4096, 1024, 1024], 4096, 8) == DecodeLinearTiles(32, 128, 4, 4)  # GQA q, k, v
    assert decode_linear_tiles([4096] * 3, 4096, 33) is None  # more rows than measured
    assert decode_linear_tiles([4096], 4000, 1) is None  # K the tiles do not divide
    assert decode_linear_tiles([2048], 2048, 1) is None  # 64 programs: SMs left idle
    assert decode_linear_tiles([4096] * 4, 4096, 1) is None  # more weights than the kernel's slots


def llama_layer_calls(monkeypatch):
    """Spy on the kernel: the weights' out_features of each launch."""
    launches = []
    launch = decode_linear.decode_linear

    def spy(x, weights, biases, tiles):
        launches.append(tuple(w.shape[0] for w in weights))
        return launch(x, weights, biases, tiles)

    monkeypatch.setattr(decode_linear, "decode_linear", spy)
    monkeypatch.setattr(decode_linear, "decode_linear_tiles", small_tiles)
    monkeypatch.delenv("HF_MULTILORA_DECODE_LINEARS", raising=False)  # the default: on
    return launches


@pytest.mark.parametrize("zoo_name", ["llama_zoo", "qwen2_zoo"])  # qwen2: GQA, and q/k/v with biases
def test_a_models_projections_run_in_one_launch_per_group_with_their_adapters(zoo_name, request, monkeypatch):
    zoo = request.getfixturevalue(zoo_name)
    base = zoo.fresh_base().half().to(DEVICE)
    model = MultiLoraModel.from_pretrained(base, adapters=zoo.paths)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    names = list(zoo.paths)[:3]
    with monkeypatch.context() as unfused:
        unfused.setattr(decode_linears, "_tiles", lambda members, x: None)
        expected = model(ids[:, :5], adapter_ids=names).logits  # 15 rows: within the kernel's rows
    launches = llama_layer_calls(monkeypatch)
    got = model(ids[:, :5], adapter_ids=names).logits
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    config = base.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = [(config.hidden_size, kv, kv), (config.hidden_size,), (config.intermediate_size,) * 2,
                 (config.hidden_size,)]  # fmt: skip
    assert launches == per_layer * config.num_hidden_layers
    # outside the call: no instance forward left but the LoRA ones
    projections = [m for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not base.lm_head]
    assert not any(hasattr(m.__dict__.get("forward"), "original") for m in projections)
    launches.clear()
    model(ids, adapter_ids=names)  # 18 rows: within for q/k/v and gate/up, o and down on cuBLAS
    assert launches == [per_layer[0], per_layer[2]] * config.num_hidden_layers
    launches.clear()
    model(torch.cat([ids] * 2, 1), adapter_ids=names)  # 36 rows: F.linear
    assert launches == []


def expand_calls(monkeypatch):
    """Spy on LoRA expands: the outputs each launch writes (1, or a tensor per slice's count)."""
    expands = []
    expand = sgmv.ExpandCall.__call__

    def spy(self, y):
        expands.append(1 if isinstance(y, torch.Tensor) else len(y))
        return expand(self, y)

    monkeypatch.setattr(sgmv.ExpandCall, "__call__", spy)
    return expands


@pytest.mark.parametrize("registered", ["all", "qv_r4"])
def test_a_groups_lora_deltas_are_added_by_one_expand(llama_zoo, registered, monkeypatch):
    """q/k/v (and gate/up) outputs of one launch get their LoRA deltas from one expand where the
    adapters' modules form the same group (all registered: q, k, v targeted); with only q and v
    targeted, k has no LoRA forward and q and v expand alone. The logits are those of the
    per-module path either way."""
    paths = llama_zoo.paths if registered == "all" else {"qv_r4": llama_zoo.paths["qv_r4"]}
    base = llama_zoo.fresh_base().half().to(DEVICE)
    model = MultiLoraModel.from_pretrained(base, adapters=paths)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    names = list(paths)
    rows = [names[i % len(names)] for i in range(3)]
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    expands = expand_calls(monkeypatch)
    with monkeypatch.context() as unfused:
        unfused.setattr(decode_linears, "_tiles", lambda members, x: None)
        expected = model(ids, adapter_ids=rows).logits
        assert not torch.allclose(expected, model(ids).logits, rtol=2e-3, atol=2e-3)  # the adapters matter
    layers = base.config.num_hidden_layers
    per_module = [1] * (7 if registered == "all" else 2)
    assert expands == per_module * layers
    expands.clear()
    llama_layer_calls(monkeypatch)
    got = model(ids, adapter_ids=rows).logits
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    assert expands == ([3, 1, 2, 1] if registered == "all" else per_module) * layers


def test_an_adapter_loaded_between_calls_gets_one_expand_per_group(llama_zoo, monkeypatch):
    """The group's forwards are those of the latest install: LoRA forwards added by a later
    load_adapter are stacked, and gone again after unload_adapter."""
    base = llama_zoo.fresh_base().half().to(DEVICE)
    model = MultiLoraModel.from_pretrained(base)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    llama_layer_calls(monkeypatch)
    plain = model(ids).logits
    model.load_adapter(llama_zoo.paths["attn_r8"], "attn_r8")
    with monkeypatch.context() as unfused:
        unfused.setattr(decode_linears, "_tiles", lambda members, x: None)
        expected = model(ids, adapter_ids=["attn_r8", None]).logits
    expands = expand_calls(monkeypatch)
    got = model(ids, adapter_ids=["attn_r8", None]).logits
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    assert expands == [3, 1] * base.config.num_hidden_layers  # q/k/v stacked, o alone
    model.unload_adapter("attn_r8")
    expands.clear()
    torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)
    assert expands == []


def test_nothing_is_installed_when_turned_off(llama_zoo, monkeypatch):
    base = llama_zoo.fresh_base().half().to(DEVICE)
    model = MultiLoraModel.from_pretrained(base)
    launches = llama_layer_calls(monkeypatch)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    monkeypatch.setenv("HF_MULTILORA_DECODE_LINEARS", "0")
    seen = []
    base.model.layers[0].register_forward_pre_hook(
        lambda *_: seen.append("forward" in base.model.layers[0].self_attn.q_proj.__dict__)
    )
    model(torch.randint(3, 128, (2, 3)).to(DEVICE))
    assert launches == [] and seen == [False]
    monkeypatch.delenv("HF_MULTILORA_DECODE_LINEARS")  # the default: on
    model(torch.randint(3, 128, (2, 3)).to(DEVICE))
    assert launches and seen == [False, True]


def test_generate_with_the_kernel_equals_generate_without(llama_zoo, monkeypatch):
    base = llama_zoo.fresh_base().half().to(DEVICE)
    model = MultiLoraModel.from_pretrained(base, adapters=llama_zoo.paths)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)  # prefill: 36 rows
    names = list(llama_zoo.paths)[:3]
    kwargs = dict(adapter_ids=names, max_new_tokens=3, do_sample=False, pad_token_id=0, cuda_graphs=False)
    with monkeypatch.context() as unfused:
        unfused.setattr(decode_linears, "_tiles", lambda members, x: None)
        expected = model.generate(ids, **kwargs)
    launches = llama_layer_calls(monkeypatch)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    assert len(launches) == 2 * 4 * base.config.num_hidden_layers  # the 2 decode steps, not the prefill


@torch.no_grad()
def test_a_sibling_whose_input_changed_computes_its_own(monkeypatch):
    monkeypatch.setattr(decode_linear, "decode_linear_tiles", small_tiles)
    q, k, v = (torch.nn.Linear(32, 16, bias=False).half().to(DEVICE) for _ in range(3))
    group = decode_linears._Group([q, k, v])
    x = random(4, 32, seed=3)

    def output(index, x):
        y, lora_added = group.output(index, x)
        assert not lora_added  # no LoRA forwards here
        return y

    torch.testing.assert_close(output(0, x), F.linear(x, q.weight), rtol=1e-2, atol=1e-2)
    x.mul_(2)  # in place between q's call and k's: k's kept output is stale
    torch.testing.assert_close(output(1, x), F.linear(x, k.weight), rtol=1e-2, atol=1e-2)
    other = x.clone()  # another tensor of equal values: not the kept input
    torch.testing.assert_close(output(2, other), F.linear(other, v.weight), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(output(2, x), F.linear(x, v.weight), rtol=1e-2, atol=1e-2)
    assert group.output(0, x.float()) is None  # fp32: tl.dot would round to tf32
    with torch.enable_grad():
        assert group.output(0, x) is None  # the kernel has no backward: F.linear's path


def test_modules_with_someone_elses_forward_are_left_alone(llama_zoo, monkeypatch):
    base = llama_zoo.fresh_base().half().to(DEVICE)
    attention = base.model.layers[0].self_attn
    calls = []
    original = attention.k_proj.forward
    attention.k_proj.forward = lambda x: calls.append(1) or original(x)  # e.g. an offloading hook
    model = MultiLoraModel.from_pretrained(base)
    launches = llama_layer_calls(monkeypatch)
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    model(torch.randint(3, 128, (2, 3)).to(DEVICE))
    assert calls == [1]
    layers = base.config.num_hidden_layers
    assert len(launches) == 4 * layers - 1  # layer 0's q, k and v through their own forwards
    assert sum(len(sizes) == 3 for sizes in launches) == layers - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("rows", [1, 16, 32])
def test_the_rules_tiles_on_llama_7b_shapes_equal_f_linear(rows):
    for sizes, in_features in (([4096] * 3, 4096), ([11008] * 2, 4096), ([4096], 4096), ([4096], 11008)):
        tiles = decode_linear_tiles(sizes, in_features, 1)  # the rule's for these shapes (at 32 rows o/down: none)
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        weights = [torch.randn(n, in_features, device="cuda", dtype=torch.bfloat16) * 0.02 for n in sizes]
        for got, w in zip(decode_linear.decode_linear(x, weights, [None] * len(sizes), tiles), weights, strict=True):
            torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decode_steps_replayed_from_graphs_with_the_kernel_give_the_eager_tokens(llama_zoo, monkeypatch):
    base = llama_zoo.fresh_base().half().cuda()
    model = MultiLoraModel.from_pretrained(base, adapters=llama_zoo.paths)
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2)).cuda()
    kwargs = dict(adapter_ids=list(llama_zoo.paths)[:3], max_new_tokens=8, do_sample=False, pad_token_id=0)
    launches = llama_layer_calls(monkeypatch)
    expected = model.generate(ids, cuda_graphs=False, **kwargs)
    eager_launches = len(launches)
    assert torch.equal(model.generate(ids, cuda_graphs=True, **kwargs), expected)
    assert eager_launches and len(launches) > eager_launches  # captured into the graphs
