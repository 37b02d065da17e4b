"""hf_multilora.enable(peft_model): PEFT's own mixed-batch calls give PEFT's results, via the kernels."""

import copy
import logging

import pytest
import torch
from conftest import VOCAB, save_adapter
from peft import LoraConfig, PeftModel, get_peft_model

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


def test_enable_refuses_a_model_without_lora_layers(llama_zoo):
    with pytest.raises(ValueError, match="no PEFT LoRA Linear layer"):
        hf_multilora.enable(llama_zoo.fresh_base())


def test_peft_length_check_still_applies(llama_zoo):
    peft_model = hf_multilora.enable(llama_zoo.peft_all())
    with pytest.raises(ValueError), torch.no_grad():
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
