"""Tests for hf_multilora.adapters.loading: PEFT LoRA adapters -> HostAdapter.

The ground truth is PEFT itself: every adapter is made with get_peft_model on a tiny model, and the loaded
A/B values and scales are compared with the PeftModel's own lora_A/lora_B weights and `scaling`.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_multilora import MultiLoraModel
from hf_multilora.adapters.host_store import HostAdapter
from hf_multilora.adapters.loading import (
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterShapeError,
    UnsupportedAdapterError,
    check_peft_adapter,
    load_peft_adapter,
    lora_target_modules,
)
from hf_multilora.kernels.sgmv import WEIGHT_ALIGN, align_up

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
CONFIG = "adapter_config.json"


def tiny_llama(hidden_size: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def make_adapter(base: torch.nn.Module, config, directory: Path, seed: int = 1, **save_kwargs):
    """Train-free adapter: get_peft_model on a copy (it mutates its model), random A/B, save_pretrained."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), config)
        peft_model.save_pretrained(str(directory), **save_kwargs)
    return peft_model


def peft_reference(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module name (as in the base model) -> (lora_A, lora_B, scaling) straight from PEFT's layers."""
    ref = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            ref[name] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
                module.scaling["default"],
            )
    return ref


def assert_matches_peft(host: HostAdapter, ref, dtype: torch.dtype = torch.float32) -> None:
    assert list(host.modules) == sorted(ref)
    assert host.flat.dtype == dtype
    assert host.flat.ndim == 1
    assert host.flat.device.type == "cpu"
    offset = 0
    for name in sorted(ref):
        a_ref, b_ref, scale_ref = ref[name]
        m = host.modules[name]
        assert (m.rank, m.in_features) == tuple(a_ref.shape)
        assert (m.out_features, m.rank) == tuple(b_ref.shape)
        assert m.a_offset == offset
        assert m.b_offset == offset + m.rank * align_up(m.in_features)
        offset = m.b_offset + m.rank * align_up(m.out_features)
        a = torch.stack([host.flat[o : o + m.in_features] for o in m.row_starts()[: m.rank]])
        b_t = torch.stack([host.flat[o : o + m.out_features] for o in m.row_starts()[m.rank :]])
        assert all(o % WEIGHT_ALIGN == 0 for o in m.row_starts())
        torch.testing.assert_close(a, a_ref.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(b_t.T, b_ref.to(dtype), rtol=0, atol=0)
        assert m.scale == scale_ref, name
    assert host.flat.numel() == offset


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("plain")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJ, init_lora_weights=False)
    peft_model = make_adapter(llama, cfg, directory)
    return directory, peft_reference(peft_model)


# ------------------------------------------------------------------------------------- target modules


def test_lora_target_modules_llama_excludes_lm_head(llama):
    targets = lora_target_modules(llama)
    assert "lm_head" not in targets
    assert "model.embed_tokens" not in targets
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    expected = {
        f"model.layers.{i}.{'self_attn' if p in attn else 'mlp'}.{p}" for i in range(2) for p in LLAMA_PROJ
    }
    assert set(targets) == expected
    assert targets["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert targets["model.layers.1.self_attn.k_proj"] == (64, 32)  # 2 kv heads of 16
    assert targets["model.layers.0.mlp.gate_proj"] == (64, 96)
    assert targets["model.layers.0.mlp.down_proj"] == (96, 64)


def test_lora_target_modules_gpt2_conv1d_in_out():
    targets = lora_target_modules(tiny_gpt2())
    assert targets["transformer.h.0.attn.c_attn"] == (64, 192)
    assert targets["transformer.h.0.attn.c_proj"] == (64, 64)
    assert targets["transformer.h.1.mlp.c_fc"] == (64, 256)
    assert targets["transformer.h.1.mlp.c_proj"] == (256, 64)
    assert "lm_head" not in targets


# -------------------------------------------------------------------------------------- happy paths


def test_plain_llama_matches_peft(llama, plain):
    directory, ref = plain
    host = load_peft_adapter("plain", directory, llama, torch.float32)
    assert len(ref) == 14
    assert_matches_peft(host, ref)
    assert all(m.scale == 2.0 for m in host.modules.values())
    assert host.name == "plain"
    assert host.source == str(directory.resolve())
    assert host.config == json.loads((directory / CONFIG).read_text())
    assert host.max_rank == 4
    assert host.nbytes == host.flat.numel() * 4


def test_dtype_conversion_and_pin_memory_request(llama, plain):
    directory, ref = plain
    host = load_peft_adapter("plain", str(directory), llama, torch.bfloat16, pin_memory=True)
    assert_matches_peft(host, ref, dtype=torch.bfloat16)
    # Pinning needs an accelerator; without one the tensor is left pageable instead of failing.
    if torch.cuda.is_available():
        assert host.flat.is_pinned()


def test_rank_pattern_and_alpha_pattern(llama, tmp_path):
    rank_pattern = {"q_proj": 2, "layers.1.mlp.down_proj": 6}
    alpha_pattern = {"v_proj": 3, "layers.1.mlp.down_proj": 7, "down_proj": 5}
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_PROJ,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=False,
    )
    trained = peft_reference(make_adapter(llama, cfg, tmp_path))
    # The reference is PEFT's own reload of the saved adapter: save_pretrained writes the config with
    # sort_keys=True, so overlapping pattern keys are matched in sorted order after a reload (here
    # "down_proj" comes before "layers.1.mlp.down_proj"), which can differ from the training-time order.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft_reference(PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path)))
    host = load_peft_adapter("patterns", tmp_path, llama, torch.float32)
    assert_matches_peft(host, reloaded)
    for name, (a, b, _) in trained.items():  # same weights as trained, only the scale rule is PEFT's reload
        assert torch.equal(reloaded[name][0], a) and torch.equal(reloaded[name][1], b)

    saved = json.loads((tmp_path / CONFIG).read_text())
    m = host.modules
    for name, lora in m.items():
        key = get_pattern_key(saved["alpha_pattern"].keys(), name)
        assert lora.scale == saved["alpha_pattern"].get(key, 8) / lora.rank
    assert m["model.layers.0.self_attn.q_proj"].rank == 2
    assert m["model.layers.0.self_attn.q_proj"].scale == 8 / 2
    assert m["model.layers.0.self_attn.v_proj"].scale == 3 / 4
    assert m["model.layers.1.mlp.down_proj"].rank == 6
    assert m["model.layers.1.mlp.down_proj"].scale == 5 / 6
    assert m["model.layers.0.mlp.down_proj"].scale == 5 / 4
    assert m["model.layers.0.mlp.up_proj"].scale == 8 / 4
    assert host.max_rank == 6


def test_pattern_keys_follow_peft_not_substrings(llama, tmp_path):
    # Keys where "key in module name" and PEFT's get_pattern_key disagree: "self_attn", "proj" and
    # "layers.1" are substrings of many names but no name ends in `.<key>`; the regex keys match names
    # that do not contain them literally.
    rank_pattern = {"self_attn": 2, r"layers\.1\.mlp\.up_.*": 6}
    alpha_pattern = {"proj": 3, "layers.1": 5, r"layers\.0\.self_attn\.[qk]_proj": 12}
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_PROJ,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=False,
    )
    make_adapter(llama, cfg, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_reference(PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path)))
    for patterns in (rank_pattern, alpha_pattern):  # the two rules really disagree on these names
        assert any(get_pattern_key(patterns, n) != k for n in reference for k in patterns if k in n)
        assert any(get_pattern_key(patterns, n) in patterns for n in reference)

    host = load_peft_adapter("patterns", tmp_path, llama, torch.float32)
    assert_matches_peft(host, reference)
    m = host.modules
    assert m["model.layers.0.self_attn.q_proj"].rank == 4 and m["model.layers.1.mlp.up_proj"].rank == 6
    assert m["model.layers.0.self_attn.k_proj"].scale == 12 / 4
    assert m["model.layers.1.self_attn.q_proj"].scale == 8 / 4


def test_negative_alpha_is_served_like_peft(llama, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=-8, target_modules=["q_proj"], init_lora_weights=False)
    ref = peft_reference(make_adapter(llama, cfg, tmp_path))
    host = load_peft_adapter("negative", tmp_path, llama, torch.float32)
    assert_matches_peft(host, ref)
    assert host.modules["model.layers.0.self_attn.q_proj"].scale == -2.0


def test_use_rslora(llama, tmp_path):
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"o_proj": 9},
        target_modules=["q_proj", "o_proj"],
        init_lora_weights=False,
    )
    ref = peft_reference(make_adapter(llama, cfg, tmp_path))
    host = load_peft_adapter("rs", tmp_path, llama, torch.float32)
    assert_matches_peft(host, ref)
    assert host.modules["model.layers.0.self_attn.q_proj"].scale == 8 / 2  # alpha / sqrt(4)
    assert host.modules["model.layers.0.self_attn.o_proj"].scale == 8 / 3  # alpha / sqrt(9)


def test_gpt2_conv1d_bin_format(tmp_path):
    gpt2 = tiny_gpt2()
    cfg = LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    ref = peft_reference(make_adapter(gpt2, cfg, tmp_path, safe_serialization=False))
    assert (tmp_path / BIN).exists() and not (tmp_path / SAFETENSORS).exists()
    host = load_peft_adapter("gpt2", tmp_path, gpt2, torch.float32)
    assert_matches_peft(host, ref)
    c_attn = host.modules["transformer.h.0.attn.c_attn"]
    c_fc = host.modules["transformer.h.1.mlp.c_fc"]
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert (c_fc.in_features, c_fc.out_features) == (64, 256)
    assert c_attn.scale == 4.0
    assert len(host.modules) == 4


def test_safetensors_preferred_over_bin(llama, plain, tmp_path):
    directory, ref = plain
    shutil.copytree(directory, tmp_path / "both")
    other_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJ, init_lora_weights=False)
    make_adapter(llama, other_cfg, tmp_path / "other", seed=99, safe_serialization=False)
    shutil.copy(tmp_path / "other" / BIN, tmp_path / "both" / BIN)
    host = load_peft_adapter("both", tmp_path / "both", llama, torch.float32)
    assert_matches_peft(host, ref)


def test_keys_with_adapter_name_accepted(llama, plain, tmp_path):
    directory, ref = plain
    shutil.copytree(directory, tmp_path / "named")
    sd = load_file(str(directory / SAFETENSORS))
    sd = {k.replace(".weight", ".my_adapter.weight"): v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "named" / SAFETENSORS))
    assert_matches_peft(load_peft_adapter("named", tmp_path / "named", llama, torch.float32), ref)


def test_training_only_variant_state_is_ignored(llama, tmp_path):
    from peft.tuners.lora.config import VeloraConfig

    cfg = LoraConfig(r=4, target_modules=["q_proj"], velora_config=VeloraConfig(), init_lora_weights=False)
    ref = peft_reference(make_adapter(llama, cfg, tmp_path))
    assert any("lora_velora_embed" in k for k in load_file(str(tmp_path / SAFETENSORS)))
    assert_matches_peft(load_peft_adapter("velora", tmp_path, llama, torch.float32), ref)


def test_model_is_not_mutated(plain):
    directory, _ = plain
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names_before = [n for n, _ in model.named_modules()]
    load_peft_adapter("plain", directory, model, torch.float32)
    assert [n for n, _ in model.named_modules()] == names_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kind", "config", "match"),
    [
        ("dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False), "DoRA"),
        (
            "lora_bias",
            LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False),
            "lora_bias",
        ),
        (
            "modules_to_save",
            LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
            "modules_to_save",
        ),
        (
            "trainable_tokens",
            LoraConfig(
                r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2], init_lora_weights=False
            ),
            "trainable_token_indices",
        ),
        ("loha", LoHaConfig(r=4, target_modules=["q_proj"]), "LOHA"),
        ("ia3", IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"),
        (
            "embedding",
            LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False),
            "embedding LoRA",
        ),
        (
            "lm_head",
            LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
            "lm_head LoRA",
        ),
    ],
)
def test_unsupported_peft_features(llama, tmp_path, kind, config, match):
    make_adapter(llama, config, tmp_path)
    with pytest.raises(UnsupportedAdapterError, match=match) as info:
        load_peft_adapter(kind, tmp_path, llama, torch.float32)
    assert f"adapter '{kind}'" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("use_dora", True, "DoRA"),
        ("lora_bias", True, "lora_bias"),
        ("bias", "lora_only", "bias='lora_only'"),
        ("target_parameters", ["mlp.experts.gate_up_proj"], "target_parameters"),
        ("layer_replication", [[0, 2], [1, 2]], "layer_replication"),
        ("alora_invocation_tokens", [5, 6], "aLoRA"),
        ("modules_to_save", ["lm_head"], r"modules_to_save=\['lm_head'\]"),
        ("use_qalora", True, "QALoRA"),
        ("arrow_config", {"top_k": 2}, "Arrow"),
        ("use_bdlora", True, "BD-LoRA"),
        ("kasa_config", {"enabled": True}, "KaSA"),
        ("init_lora_weights", "pissa", "PiSSA"),
        ("peft_type", "VERA", "VERA"),
    ],
)
def test_unsupported_config_fields(plain, tmp_path, llama, field, value, match):
    directory, _ = plain
    shutil.copytree(directory, tmp_path / "a")
    config = json.loads((directory / CONFIG).read_text())
    config[field] = value
    (tmp_path / "a" / CONFIG).write_text(json.dumps(config))
    with pytest.raises(UnsupportedAdapterError, match=match):
        load_peft_adapter("edited", tmp_path / "a", llama, torch.float32)


def edit_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(src / SAFETENSORS))
    save_file(edit(sd), str(dst / SAFETENSORS))
    return dst


def test_dora_magnitude_key_refused_even_without_config_flag(llama, plain, tmp_path):
    directory, _ = plain

    def add_magnitude(sd):
        sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
        return sd

    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        load_peft_adapter("x", edit_weights(directory, tmp_path / "a", add_magnitude), llama, torch.float32)


def test_stray_base_weights_refused(llama, plain, tmp_path):
    directory, _ = plain

    def add_base_weight(sd):
        sd["base_model.model.model.norm.weight"] = torch.ones(64)
        return sd

    with pytest.raises(UnsupportedAdapterError, match=r"base-model weights.*model\.norm\.weight"):
        load_peft_adapter("x", edit_weights(directory, tmp_path / "a", add_base_weight), llama, torch.float32)


def test_non_linear_target_refused(llama, plain, tmp_path):
    directory, _ = plain

    def target_norm(sd):
        sd["base_model.model.model.norm.lora_A.weight"] = torch.zeros(4, 64)
        sd["base_model.model.model.norm.lora_B.weight"] = torch.zeros(64, 4)
        return sd

    with pytest.raises(UnsupportedAdapterError, match=r"'model\.norm' of type LlamaRMSNorm"):
        load_peft_adapter("x", edit_weights(directory, tmp_path / "a", target_norm), llama, torch.float32)


# ---------------------------------------------------------------------------------- shape problems


def test_adapter_from_other_hidden_size(llama, tmp_path):
    other = tiny_llama(hidden_size=32)
    make_adapter(other, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), tmp_path)
    with pytest.raises(
        AdapterShapeError,
        match=r"'model\.layers\.0\.self_attn\.q_proj'.*\[4, 32\].*\[32, 4\].*in_features=64",
    ):
        load_peft_adapter("small", tmp_path, llama, torch.float32)


def test_adapter_for_other_architecture(llama, tmp_path):
    make_adapter(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False), tmp_path)
    with pytest.raises(
        AdapterShapeError,
        match=r"targets module 'transformer\.h\.0\.attn\.c_attn', which the base model does not have",
    ):
        load_peft_adapter("gpt2", tmp_path, llama, torch.float32)


def test_rank_differs_from_config(llama, plain, tmp_path):
    directory, _ = plain
    shutil.copytree(directory, tmp_path / "a")
    config = json.loads((directory / CONFIG).read_text())
    config["r"] = 8
    (tmp_path / "a" / CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterShapeError, match=r"rank 4 .*r=8"):
        load_peft_adapter("x", tmp_path / "a", llama, torch.float32)


def test_missing_lora_b(llama, plain, tmp_path):
    directory, _ = plain

    def drop_b(sd):
        del sd["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
        return sd

    with pytest.raises(AdapterLoadError, match=r"'model\.layers\.1\.mlp\.up_proj' has no lora_B"):
        load_peft_adapter("x", edit_weights(directory, tmp_path / "a", drop_b), llama, torch.float32)


# ----------------------------------------------------------------------------------- file problems


def test_missing_directory(llama, tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist") as info:
        load_peft_adapter("x", missing, llama, torch.float32)
    assert isinstance(info.value, AdapterLoadError)


def test_directory_without_files(llama, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"adapter_config\.json.*adapter_model\.safetensors or adapter_model\.bin"
    ):
        load_peft_adapter("x", tmp_path, llama, torch.float32)


def test_missing_weights_file(llama, plain, tmp_path):
    directory, _ = plain
    (tmp_path / CONFIG).write_text((directory / CONFIG).read_text())
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors or adapter_model\.bin"):
        load_peft_adapter("x", tmp_path, llama, torch.float32)


def test_malformed_config(llama, plain, tmp_path):
    directory, _ = plain
    shutil.copytree(directory, tmp_path / "a")
    (tmp_path / "a" / CONFIG).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(AdapterLoadError, match=r"adapter 'x'.*adapter_config\.json"):
        load_peft_adapter("x", tmp_path / "a", llama, torch.float32)


def test_unreadable_weights(llama, plain, tmp_path):
    directory, _ = plain
    shutil.copytree(directory, tmp_path / "a")
    (tmp_path / "a" / SAFETENSORS).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.safetensors"):
        load_peft_adapter("x", tmp_path / "a", llama, torch.float32)


def test_bad_dtype(llama, plain):
    with pytest.raises(ValueError, match="floating-point"):
        load_peft_adapter("x", plain[0], llama, torch.int8)


# -------------------------------------------------------------------------------------------- hub


def test_hub_download_falls_back_to_bin(llama, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    repo_dir = tmp_path / "snapshot"
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref = peft_reference(make_adapter(llama, cfg, repo_dir, safe_serialization=False))
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename))
        if not (repo_dir / filename).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(repo_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.chdir(tmp_path)  # so that "someone/adapter" is not a local path
    host = load_peft_adapter("hub", "someone/adapter", llama, torch.float32)
    assert calls == [("someone/adapter", CONFIG), ("someone/adapter", SAFETENSORS), ("someone/adapter", BIN)]
    assert host.source == str(repo_dir)
    assert_matches_peft(host, ref)


def test_hub_failure_names_source(llama, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        raise EntryNotFoundError(f"{filename} not found")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdapterNotFoundError, match=r"'someone/missing'.*adapter_config\.json"):
        load_peft_adapter("x", "someone/missing", llama, torch.float32)


def test_relative_path_is_not_a_repo_id(llama, tmp_path, monkeypatch):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError("must not reach the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(FileNotFoundError, match=r"\./someone/adapter"):
        load_peft_adapter("x", "./someone/adapter", llama, torch.float32)


# ------------------------------------------------------------------------- numbers the kernels cannot use


def edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((src / CONFIG).read_text())
    (dst / CONFIG).write_text(json.dumps({**config, **changes}))
    return dst


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        # 1e308 / 4 is a float64 but float32 overflows to inf: every output of the adapter is NaN.
        (dict(lora_alpha=1e308), r"'model\.layers\.0\.mlp\.down_proj': lora_alpha = 1e\+308 with r = 4"),
        (dict(lora_alpha=10**400), r"lora_alpha = 1000+ with r = 4 gives the LoRA scale inf"),
        (dict(lora_alpha=float("nan")), r"lora_alpha = nan"),
        (dict(lora_alpha=float("inf")), r"lora_alpha = inf"),
        (dict(lora_alpha=0), r"lora_alpha = 0 with r = 4 gives the LoRA scale 0\.0"),
        (dict(lora_alpha=1e-300), r"lora_alpha = 1e-300"),  # float32 rounds the scale to 0
        (
            dict(alpha_pattern={"v_proj": 2e39}),
            r"'model\.layers\.0\.self_attn\.v_proj': alpha_pattern\['v_proj'\] = 2e\+39 with r = 4",
        ),
        (
            dict(alpha_pattern={"layers.1.mlp.up_proj": float("-inf")}),
            r"'model\.layers\.1\.mlp\.up_proj': alpha_pattern\['layers\.1\.mlp\.up_proj'\] = -inf",
        ),
        (
            dict(rank_pattern={"o_proj": float("nan")}),
            r"'model\.layers\.0\.self_attn\.o_proj'.*nan.*rank_pattern",
        ),
    ],
)
def test_scale_float32_cannot_hold_is_refused_at_registration(llama, plain, tmp_path, changes, match):
    adapter = edit_config(plain[0], tmp_path / "a", **changes)
    with pytest.raises(AdapterLoadError, match=rf"adapter 'bad'.*{match}"):
        check_peft_adapter("bad", adapter, llama)


@pytest.mark.parametrize(
    ("target_modules", "match"),
    [
        (["query", "value"], r"target_modules \['query', 'value'\] name no module"),
        (["proj"], r"\['proj'\] name no module"),  # a substring of names, not a dotted tail: PEFT says no
        (r".*\.attention\.(query|value)", r"the regex '\.\*.*attention.*', which matches no whole module"),
        ("q_proj", r"the regex 'q_proj', which matches no whole module"),  # PEFT fullmatches a string
    ],
)
def test_target_modules_matching_no_module_is_refused(llama, plain, tmp_path, target_modules, match):
    # The tensors fit the base (llama's q_proj, ...) but the config names another model's modules.
    adapter = edit_config(plain[0], tmp_path / "a", target_modules=target_modules)
    with pytest.raises(AdapterShapeError, match=rf"adapter 'x'.*{match}.*end in \['down_proj', 'gate_proj'"):
        check_peft_adapter("x", adapter, llama)


@pytest.mark.parametrize(
    "target_modules",
    [
        ["self_attn.q_proj", "query"],
        "model.layers.0.self_attn.q_proj",
        r".*\.(q_proj|v_proj)",
        "all-linear",
        None,
    ],
)
def test_target_modules_matching_some_module_loads(llama, plain, tmp_path, target_modules):
    adapter = edit_config(plain[0], tmp_path / "a", target_modules=target_modules)
    assert_matches_peft(load_peft_adapter("x", adapter, llama, torch.float32), plain[1])


@pytest.mark.parametrize(
    ("value", "ab", "dtype", "match"),
    [
        (float("nan"), "lora_B", torch.float32, "holds NaN or infinite values"),
        (float("-inf"), "lora_A", torch.bfloat16, "holds NaN or infinite values"),
        # Finite in the file (float32), inf once packed as float16.
        (1e5, "lora_B", torch.float16, r"holds values beyond the range of torch\.float16"),
    ],
)
def test_non_finite_weights_are_refused_when_read(llama, plain, tmp_path, value, ab, dtype, match):
    key = f"base_model.model.model.layers.1.mlp.up_proj.{ab}.weight"

    def plant(sd):
        sd[key] = sd[key].clone()
        sd[key][1, 2] = value
        return sd

    adapter = edit_weights(plain[0], tmp_path / "a", plant)
    check_peft_adapter("x", adapter, llama)  # registration reads no weights
    with pytest.raises(
        AdapterLoadError,
        match=rf"adapter 'x'.*{ab} weight of module 'model\.layers\.1\.mlp\.up_proj' {match}",
    ):
        load_peft_adapter("x", adapter, llama, dtype)


# ---------------------------------------------------------------------------------------- allowed_dir


def linked_folder(folder: Path, targets: dict[str, Path]) -> Path:
    """A real folder whose files are symlinks: file name -> what it points to."""
    folder.mkdir(parents=True)
    for file_name, target in targets.items():
        (folder / file_name).symlink_to(target)
    return folder


@pytest.mark.parametrize("linked", [CONFIG, SAFETENSORS])
def test_allowed_dir_refuses_files_linked_outside(llama, plain, tmp_path, linked):
    outside = plain[0]
    allowed = tmp_path / "allowed"
    folder = allowed / "adapter"
    shutil.copytree(outside, folder)
    (folder / linked).unlink()
    (folder / linked).symlink_to(outside / linked)
    # Without allowed_dir symlinks are followed anywhere (a Hub cache snapshot is made of them).
    assert_matches_peft(load_peft_adapter("x", folder, llama, torch.float32), plain[1])
    match = (
        rf"adapter 'x': '.*adapter/{linked}' resolves to '{outside / linked}', outside the allowed directory"
    )
    with pytest.raises(AdapterLoadError, match=match):
        check_peft_adapter("x", folder, llama, allowed_dir=allowed)
    with pytest.raises(AdapterLoadError, match=match):
        load_peft_adapter("x", folder, llama, torch.float32, allowed_dir=allowed)


def test_allowed_dir_never_opens_a_linked_secret(llama, plain, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"peft_type": "LORA", "password": "hunter2"}')
    allowed = tmp_path / "allowed"
    folder = linked_folder(allowed / "a", {CONFIG: secret, SAFETENSORS: plain[0] / SAFETENSORS})
    with pytest.raises(
        AdapterLoadError, match=r"adapter_config\.json' resolves to .*secret\.json', outside"
    ) as info:
        check_peft_adapter("x", folder, llama, allowed_dir=allowed)
    assert "hunter2" not in str(info.value) and info.value.__cause__ is None


def test_allowed_dir_is_not_a_string_prefix(llama, plain, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copytree(plain[0], tmp_path / "allowed_evil" / "x")  # a sibling whose name starts the same
    shutil.copytree(plain[0], allowed / "ok")
    linked_folder(allowed / "links", {n: tmp_path / "allowed_evil" / "x" / n for n in (CONFIG, SAFETENSORS)})
    for source in [tmp_path / "allowed_evil" / "x", allowed / ".." / "allowed_evil" / "x", allowed / "links"]:
        with pytest.raises(AdapterLoadError, match=r"allowed_evil/x.*outside the allowed directory"):
            load_peft_adapter("x", source, llama, torch.float32, allowed_dir=allowed)
    inside = load_peft_adapter("x", allowed / "ok", llama, torch.float32, allowed_dir=allowed)
    assert_matches_peft(inside, plain[1])


def test_allowed_dir_refuses_hub_ids(llama, tmp_path, monkeypatch):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError("must not reach the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdapterNotFoundError, match=r"'someone/adapter' is not a folder.*no Hugging Face Hub"):
        check_peft_adapter("x", "someone/adapter", llama, allowed_dir=tmp_path)


def test_allowed_dir_is_checked_again_when_the_weights_are_read(plain, tmp_path):
    """The weights are read at first use, maybe after the file was swapped for a link outside."""
    allowed = tmp_path / "allowed"
    shutil.copytree(plain[0], allowed / "a")
    model = MultiLoraModel(tiny_llama())
    model.load_adapter(allowed / "a", "a", allowed_dir=allowed)
    (allowed / "a" / SAFETENSORS).unlink()
    (allowed / "a" / SAFETENSORS).symlink_to(plain[0] / SAFETENSORS)
    with pytest.raises(
        AdapterLoadError, match=r"adapter 'a': .*adapter_model\.safetensors' resolves to .*outside"
    ):
        model.prefetch_adapters(["a"], host_only=True)
    assert model.memory_stats()["adapters_in_host_memory"] == 0
