"""hf_multilora.enable(peft_model): PEFT's own mixed-batch calls give PEFT's results, via the kernels."""

import copy
import logging

import pytest
import torch
from conftest import VOCAB, save_adapter
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

import hf_multilora


def prompts(rows, length, seed=0):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def names_for(zoo):
    names = list(zoo.paths)
    return [names[1], "__base__", names[0], *names, names[1]]


@pytest.mark.parametrize("zoo_name", ["llama_zoo", "qwen2_zoo", "gpt2_zoo"])
def test_enabled_forward_equals_peft_mixed_batch(zoo_name, request):
    zoo = request.getfixturevalue(zoo_name)
    peft_model = zoo.peft_all()
    adapter_names = names_for(zoo)
    input_ids = prompts(len(adapter_names), 7)
    with torch.no_grad():
        expected = peft_model(input_ids, adapter_names=adapter_names).logits
        hf_multilora.enable(peft_model)
        got = peft_model(input_ids, adapter_names=adapter_names).logits
        hf_multilora.disable(peft_model)
        again = peft_model(input_ids, adapter_names=adapter_names).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_enabled_generate_equals_peft_generate(llama_zoo):
    peft_model = llama_zoo.peft_all()
    adapter_names = names_for(llama_zoo)
    input_ids = prompts(len(adapter_names), 5, seed=1)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = peft_model.generate(input_ids=input_ids, adapter_names=adapter_names, **kwargs)
    beams = peft_model.generate(input_ids=input_ids, adapter_names=adapter_names, num_beams=2, **kwargs)
    hf_multilora.enable(peft_model)
    assert (
        peft_model.generate(input_ids=input_ids, adapter_names=adapter_names, **kwargs).tolist()
        == expected.tolist()
    )
    got_beams = peft_model.generate(input_ids=input_ids, adapter_names=adapter_names, num_beams=2, **kwargs)
    assert got_beams.tolist() == beams.tolist()
    # Without adapter_names, PEFT's active adapter path runs untouched.
    active = peft_model.active_adapter
    with torch.no_grad():
        plain = peft_model(input_ids).logits
        mixed = peft_model(input_ids, adapter_names=[active] * len(adapter_names)).logits
    torch.testing.assert_close(mixed, plain, rtol=1e-4, atol=1e-5)


def test_adapter_loaded_after_enable_is_picked_up(llama_zoo):
    names = list(llama_zoo.paths)
    peft_model = PeftModel.from_pretrained(
        llama_zoo.fresh_base(), llama_zoo.paths[names[0]], adapter_name=names[0]
    )
    hf_multilora.enable(peft_model)
    peft_model.load_adapter(llama_zoo.paths[names[2]], adapter_name=names[2])
    input_ids = prompts(3, 5, seed=2)
    rows = [names[2], names[0], "__base__"]
    with torch.no_grad():
        got = peft_model(input_ids, adapter_names=rows).logits
    hf_multilora.disable(peft_model)
    with torch.no_grad():
        expected = peft_model(input_ids, adapter_names=rows).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_dora_layers_keep_peft_forward(llama_zoo, tmp_path, caplog):
    base = llama_zoo.fresh_base()
    dora = save_adapter(
        base, tmp_path / "dora", seed=5, r=4, lora_alpha=8, target_modules=["v_proj"], use_dora=True
    )
    names = list(llama_zoo.paths)
    peft_model = PeftModel.from_pretrained(base, llama_zoo.paths[names[0]], adapter_name=names[0])
    peft_model.load_adapter(dora, adapter_name="dora")
    peft_model.eval()
    rows = [names[0], "__base__", names[0]]  # PEFT itself refuses DoRA rows in adapter_names
    input_ids = prompts(3, 5, seed=3)
    with torch.no_grad():
        expected = peft_model(input_ids, adapter_names=rows).logits
        with caplog.at_level(logging.WARNING, logger="hf_multilora"):
            hf_multilora.enable(peft_model)
        got = peft_model(input_ids, adapter_names=rows).logits
    assert "keep PEFT's own forward" in caplog.text
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tuner", ["none", "ia3"])
def test_enable_refuses_a_model_without_lora_layers(llama_zoo, tuner):
    model = llama_zoo.fresh_base()
    if tuner == "ia3":
        model = get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"]))
    with pytest.raises(ValueError, match="found no PEFT LoRA layer in this model"):
        hf_multilora.enable(model)


def test_peft_length_check_still_applies(llama_zoo):
    peft_model = hf_multilora.enable(llama_zoo.peft_all())
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"), torch.no_grad():
        peft_model(prompts(2, 5), adapter_names=[next(iter(llama_zoo.paths))])


def test_enable_twice_is_idempotent(llama_zoo):
    peft_model = get_peft_model(
        copy.deepcopy(llama_zoo.base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.eval()
    input_ids = prompts(2, 4)
    with torch.no_grad():
        expected = peft_model(input_ids, adapter_names=["default", "__base__"]).logits
        hf_multilora.enable(hf_multilora.enable(peft_model))
        got = peft_model(input_ids, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_same_list_mutated_between_calls_is_routed_again(llama_zoo):
    """PEFT hands layers the caller's own list; a list edited in place must not reuse a stale plan."""
    peft_model = llama_zoo.peft_all()
    names = list(llama_zoo.paths)
    rows = [names[0], "__base__"]
    input_ids = prompts(2, 5, seed=4)
    with torch.no_grad():
        hf_multilora.enable(peft_model)
        first = peft_model(input_ids, adapter_names=rows).logits
        rows[0] = names[3]
        second = peft_model(input_ids, adapter_names=rows).logits
        hf_multilora.disable(peft_model)
        expected = peft_model(input_ids, adapter_names=rows).logits
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first, second)


def test_deleted_and_reloaded_adapter_is_not_served_stale(llama_zoo):
    names = list(llama_zoo.paths)
    peft_model = PeftModel.from_pretrained(
        llama_zoo.fresh_base(), llama_zoo.paths[names[0]], adapter_name="x"
    )
    peft_model.load_adapter(llama_zoo.paths[names[1]], adapter_name="other")
    peft_model.eval()
    input_ids = prompts(2, 5, seed=5)
    with torch.no_grad():
        hf_multilora.enable(peft_model)
        peft_model(input_ids, adapter_names=["x", "__base__"])
        peft_model.delete_adapter("x")
        peft_model.load_adapter(llama_zoo.paths[names[2]], adapter_name="x")
        got = peft_model(input_ids, adapter_names=["x", "__base__"]).logits
        hf_multilora.disable(peft_model)
        expected = peft_model(input_ids, adapter_names=["x", "__base__"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# Adapters the kernels do not compute (issue 12): whatever way they reach the model, the layers
# holding them run PEFT's own forward in calls that use them, giving PEFT's logits or PEFT's error.

INVOKE = [5, 6]  # the aLoRA adapters' invocation tokens


def outcome(model, inputs, **kwargs):
    """A call's logits, or the message of the ValueError it raised (PEFT refuses some calls)."""
    try:
        with torch.no_grad():
            out = model(inputs, **kwargs)
    except ValueError as error:
        return str(error)
    return getattr(out, "logits", out)


def assert_same_outcome(got, expected):
    if isinstance(expected, str):
        assert got == expected
    else:
        assert not isinstance(got, str), got
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def with_invocations(input_ids):
    """Rows 0 and 2 hold the aLoRA invocation sequence (at different places), the others do not."""
    input_ids = input_ids.clone()
    input_ids[input_ids == INVOKE[0]] = 0
    input_ids[0, 2:4] = torch.tensor(INVOKE)
    input_ids[2, 4:6] = torch.tensor(INVOKE)
    return input_ids


def test_lora_bias_adapter_loaded_after_enable_keeps_its_bias(llama_zoo, tmp_path, caplog):
    """q_proj (the first LoRA layer, which routes the call) and v_proj run PEFT's forward for the
    call, k_proj between them the kernels."""
    names = list(llama_zoo.paths)
    biased = save_adapter(
        llama_zoo.fresh_base(), tmp_path / "biased", seed=6, r=4, target_modules=["q_proj", "v_proj"],
        lora_bias=True,
    )  # fmt: skip
    peft_model = PeftModel.from_pretrained(
        llama_zoo.fresh_base(), llama_zoo.paths[names[0]], adapter_name="a"
    )
    peft_model.eval()
    hf_multilora.enable(peft_model)
    peft_model.load_adapter(biased, adapter_name="biased")
    input_ids = prompts(4, 5, seed=6)
    rows = ["biased", "a", "__base__", "biased"]
    with caplog.at_level(logging.WARNING, logger="hf_multilora"):
        got = outcome(peft_model, input_ids, adapter_names=rows)
    hf_multilora.disable(peft_model)
    expected = outcome(peft_model, input_ids, adapter_names=rows)
    assert_same_outcome(got, expected)
    assert "'biased' uses lora_bias" in caplog.text


def test_adapter_replaced_by_one_on_patched_layers_is_checked_again(llama_zoo):
    """ "x" first targets k_proj, which held no LoRA at enable() (PEFT computes it there); once
    replaced by an "x" on q_proj, a patched layer, the same call must add the new one."""
    peft_model = get_peft_model(
        llama_zoo.fresh_base(), LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"])
    ).eval()
    hf_multilora.enable(peft_model)
    input_ids = prompts(2, 5, seed=11)
    rows = ["x", "default"]
    peft_model.add_adapter("x", LoraConfig(r=4, init_lora_weights=False, target_modules=["k_proj"]))
    first = outcome(peft_model, input_ids, adapter_names=rows)
    peft_model.delete_adapter("x")
    peft_model.add_adapter("x", LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    got = outcome(peft_model, input_ids, adapter_names=rows)
    hf_multilora.disable(peft_model)
    assert_same_outcome(got, outcome(peft_model, input_ids, adapter_names=rows))
    assert not torch.allclose(got[0], first[0])


def test_dora_adapter_loaded_after_enable_is_refused_as_peft_does(llama_zoo, tmp_path):
    """DoRA on v_proj only: the first LoRA layer (q_proj) does not hold it, so only a check at the
    layers that do catches it."""
    names = list(llama_zoo.paths)
    dora = save_adapter(
        llama_zoo.fresh_base(), tmp_path / "dora", seed=7, r=4, target_modules=["v_proj"], use_dora=True
    )
    peft_model = PeftModel.from_pretrained(
        llama_zoo.fresh_base(), llama_zoo.paths[names[0]], adapter_name="a"
    )
    peft_model.eval()
    input_ids = prompts(3, 5, seed=7)
    calls = [["a", "dora", "__base__"], ["a", "__base__", "a"]]  # the second one avoids the DoRA adapter
    hf_multilora.enable(peft_model)
    peft_model.load_adapter(dora, adapter_name="dora")  # v_proj now holds a DoRA and a plain adapter
    got = [outcome(peft_model, input_ids, adapter_names=rows) for rows in calls]
    hf_multilora.disable(peft_model)
    expected = [outcome(peft_model, input_ids, adapter_names=rows) for rows in calls]
    assert expected[0] == "Cannot pass `adapter_names` when DoRA is enabled."
    for g, e in zip(got, expected, strict=True):
        assert_same_outcome(g, e)


@pytest.mark.parametrize(
    ("first", "second_after_enable"), [("plain", False), ("alora", False), ("plain", True)]
)
def test_alora_next_to_plain_lora_equals_peft(llama_zoo, tmp_path, first, second_after_enable):
    """aLoRA on v_proj, plain LoRA on q_proj/o_proj: PEFT hands every LoRA layer `alora_offsets`
    when a row (or, with an aLoRA first adapter, the active adapter) is aLoRA."""
    base = llama_zoo.fresh_base()
    paths = {
        "plain": save_adapter(
            base, tmp_path / "plain", seed=8, r=4, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM"
        ),
        "alora": save_adapter(
            base, tmp_path / "alora", seed=9, r=4, target_modules=["v_proj"], task_type="CAUSAL_LM",
            alora_invocation_tokens=INVOKE,
        ),
    }  # fmt: skip
    second = "alora" if first == "plain" else "plain"
    peft_model = PeftModel.from_pretrained(llama_zoo.fresh_base(), paths[first], adapter_name=first).eval()
    if not second_after_enable:
        peft_model.load_adapter(paths[second], adapter_name=second)
    hf_multilora.enable(peft_model)
    if second_after_enable:
        peft_model.load_adapter(paths[second], adapter_name=second)
    input_ids = with_invocations(prompts(4, 8, seed=8))
    calls = [["alora", "plain", "alora", "__base__"], ["plain", "__base__", "plain", "plain"]]
    got = [outcome(peft_model, input_ids, adapter_names=rows) for rows in calls]
    hf_multilora.disable(peft_model)
    expected = [outcome(peft_model, input_ids, adapter_names=rows) for rows in calls]
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids).logits
    assert not torch.allclose(expected[0][0, -1], base_logits[0, -1])  # the aLoRA row was invoked
    for g, e in zip(got, expected, strict=True):
        assert_same_outcome(g, e)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1))


# A first adapter whose LoRA layers are all of a kind the kernels do not compute.
UNSUPPORTED_ONLY = {
    "dora": dict(target_modules=["v_proj"], use_dora=True),
    "alora": dict(target_modules=["v_proj"], alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM"),
    "target_parameters": dict(target_modules=[], target_parameters=["q_proj.weight"]),
    "embedding": dict(target_modules=["embed_tokens"]),
    "conv2d": dict(target_modules=["conv"]),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED_ONLY))
def test_enable_on_a_model_whose_lora_layers_are_all_unsupported(llama_zoo, kind, caplog):
    torch.manual_seed(10)
    base = ConvNet().eval() if kind == "conv2d" else llama_zoo.fresh_base()
    peft_model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False, **UNSUPPORTED_ONLY[kind]))
    peft_model.eval()
    if kind == "conv2d":
        inputs, later = torch.randn(3, 3, 6, 6), ["head"]
    else:
        inputs, later = with_invocations(prompts(3, 8, seed=10)), ["v_proj", "up_proj"]
    # PEFT leaves its adapter_names hooks on the layers when a call raises (DoRA, target_parameters),
    # so the call without adapter_names comes first.
    expected_plain = outcome(peft_model, inputs)
    with caplog.at_level(logging.WARNING, logger="hf_multilora"):
        hf_multilora.enable(peft_model)
    linear = kind in ("dora", "alora")  # the kinds that put LoRA on Linear layers, which get patched
    assert ("keep PEFT's own forward" if linear else "no PEFT LoRA Linear layer") in caplog.text
    assert_same_outcome(outcome(peft_model, inputs), expected_plain)
    calls = [["default", "__base__", "default"], ["plain", "__base__", "plain"]]
    got = [outcome(peft_model, inputs, adapter_names=calls[0])]
    if linear:  # the unsupported adapter never reaches the kernels' storage
        assert peft_model._hf_multilora_state.runtime.residency.resident("default") is None
    # A plain adapter added now works as in PEFT (on the kernels where the model has patched layers).
    peft_model.add_adapter("plain", LoraConfig(r=4, init_lora_weights=False, target_modules=later))
    got.append(outcome(peft_model, inputs, adapter_names=calls[1]))
    if linear:
        assert peft_model._hf_multilora_state.runtime.residency.resident("plain") is not None
    hf_multilora.disable(peft_model)
    for rows, g in zip(calls, got, strict=True):
        assert_same_outcome(g, outcome(peft_model, inputs, adapter_names=rows))
