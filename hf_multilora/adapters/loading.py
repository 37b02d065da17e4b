"""Read PEFT-format LoRA adapters into one flat host tensor (`HostAdapter`).

The batched kernels can only apply the plain LoRA update ``y += scale * (x @ A.T) @ B.T`` to Linear-like
modules. Anything a PEFT adapter may carry beyond that (DoRA magnitudes, trained biases, fully trained
modules, embedding LoRA, ...) would be silently dropped if we loaded only A and B, and the served model
would quietly differ from the trained one. So this loader refuses every such feature by name instead of
approximating it, and it checks every shape against the base model before anything is allocated.

PEFT semantics mirrored here (peft 0.21): the saved tensors define the target set (the ``target_modules``
regexes are resolved at training time against the training model, so they are only a hint), the per-module
rank/alpha come from ``rank_pattern``/``alpha_pattern`` with ``get_pattern_key`` matching, and the scale is
``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_multilora.adapters.host_store import HostAdapter, pack_adapter

__all__ = [
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdapterShapeError",
    "UnsupportedAdapterError",
    "load_peft_adapter",
    "lora_target_modules",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# PeftModel wraps the base model as `base_model.model`; saved keys carry that prefix.
_PEFT_PREFIX = "base_model.model."
# `<module>.lora_A.weight` as saved by PEFT (adapter name stripped), or `<module>.lora_A.<adapter>.weight`
# as found in a raw PeftModel.state_dict().
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$"
)
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_[AB](?:\.[^.]+)?$")
# Training-only state of variants whose inference forward is exactly plain LoRA (VeLoRA only changes the
# backward pass; MonteCLoRA samples only in training mode). Ignoring these loses nothing at inference.
_TRAINING_ONLY_KEY = re.compile(r"\.(lora_velora_embed|lora_monteclora_sampler)(\.|$)")
# Hugging Face Hub repo ids are `owner/name` with a restricted alphabet.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# init_lora_weights values whose training rewrote the base weights: the saved A/B are only valid on that
# rewritten base, unless PEFT converted them (which sets init_lora_weights back to True).
_BASE_MUTATING_INITS = {
    "pissa": "PiSSA",
    "corda": "CorDA",
    "olora": "OLoRA",
    "lora_ga": "LoRA-GA",
    "loftq": "LoftQ",
}


class AdapterLoadError(ValueError):
    """Base of every error this module raises about an adapter; the message names the adapter and problem."""


class UnsupportedAdapterError(AdapterLoadError):
    """The adapter uses a PEFT feature that the batched LoRA kernels cannot reproduce."""


class AdapterShapeError(AdapterLoadError):
    """The adapter's tensors do not fit the base model (usually: trained on a different model)."""


class AdapterNotFoundError(AdapterLoadError, FileNotFoundError):
    """The adapter directory, repo or one of its files is missing.

    Also a FileNotFoundError so that callers treating "missing" like any other missing file keep working,
    while `except AdapterLoadError` still catches every load failure.
    """


def lora_target_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every module of `model` a LoRA adapter may target: name -> (in_features, out_features).

    nn.Linear and transformers' Conv1D (GPT-2 style, weight stored [in, out]) are the layers the kernels
    handle. The output embedding (lm_head) is excluded even though it is usually an nn.Linear: it is often
    tied to the input embedding and is computed outside the batched decoder layers, so a LoRA on it could
    not be served.
    """
    from transformers.pytorch_utils import Conv1D

    output_embedding = _output_embedding(model)
    targets: dict[str, tuple[int, int]] = {}
    for module_name, module in model.named_modules():
        if not module_name or module is output_embedding:
            continue
        if isinstance(module, nn.Linear):
            targets[module_name] = (int(module.in_features), int(module.out_features))
        elif isinstance(module, Conv1D):
            # Same rule as PEFT's LoRA Linear for Conv1D: the weight is [in, out].
            in_features, out_features = module.weight.shape
            targets[module_name] = (int(in_features), int(out_features))
    return targets


@dataclass(frozen=True)
class ModelTargets:
    """What adapter validation needs to know about a base model, computed once per model (it scans
    every module, which registering thousands of adapters must not repeat)."""

    targets: dict[str, tuple[int, int]]
    types: dict[str, str]  # every module: name -> class name
    embeddings: frozenset[str]
    output_embedding: str | None

    @classmethod
    def of(cls, model: nn.Module | ModelTargets) -> ModelTargets:
        if isinstance(model, ModelTargets):
            return model
        output_embedding = _output_embedding(model)
        named = dict(model.named_modules())
        return cls(
            lora_target_modules(model),
            {n: type(m).__name__ for n, m in named.items()},
            frozenset(n for n, m in named.items() if isinstance(m, nn.Embedding)),
            next((n for n, m in named.items() if m is output_embedding), None),
        )


@dataclass(frozen=True)
class AdapterSource:
    """A registered adapter, checked but not read: where it is and what it targets."""

    name: str
    directory: Path
    modules: tuple[str, ...]


def check_peft_adapter(name: str, source: str | os.PathLike, model: nn.Module | ModelTargets) -> AdapterSource:
    """Every check of `load_peft_adapter` without reading the weights: config, tensor names and
    shapes come from the safetensors header (a `.bin` has none and is read whole). Registering
    thousands of adapters this way takes seconds; `load_peft_adapter` reads the weights at first use."""
    directory, _, loras = _validated(name, source, model, _read_shapes)
    return AdapterSource(name, directory, tuple(loras))


def load_peft_adapter(
    name: str,
    source: str | os.PathLike,
    model: nn.Module | ModelTargets,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> HostAdapter:
    """Load a PEFT LoRA adapter as one flat host tensor laid out for the batched kernels.

    `flat` holds, for each targeted module in sorted name order, A ([rank, in] row-major) then B
    transposed ([rank, out] row-major), converted to `dtype`, every rank row padded to a multiple
    of the kernels' WEIGHT_ALIGN; offsets in `ModuleLora` are element offsets into it.
    Everything is validated before the flat tensor is allocated and nothing outside the returned object is
    touched (in particular not `model`), so a failed load leaves no trace.

    `pin_memory` asks for page-locked memory so device copies can be asynchronous. Pinning needs an
    accelerator runtime; on a machine without one there is no device copy to speed up, so the tensor is
    left pageable rather than failing.

    Raises AdapterNotFoundError (a FileNotFoundError) when the source or its files are missing,
    UnsupportedAdapterError for PEFT features the kernels cannot reproduce, AdapterShapeError when the
    adapter does not fit `model`, and AdapterLoadError for unreadable files.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

    directory, config, loras = _validated(name, source, model, _read_weights)
    return pack_adapter(
        name, str(directory), config, loras, dtype, pin_memory=pin_memory and _can_pin()
    )


# --------------------------------------------------------------------------------------------- source


def _resolve_source(name: str, source: str | os.PathLike) -> tuple[Path, Path, Path]:
    """Find (directory, config file, weights file), downloading from the Hub only when it is not local.

    A local directory always wins so that a checkout named like a repo id is never shadowed by the Hub.
    """
    raw = os.fspath(source)
    path = Path(raw).expanduser()
    if path.is_dir():
        return _resolve_local_dir(name, path)
    if path.exists():
        raise AdapterNotFoundError(
            f"adapter '{name}': source '{raw}' is a file; expected a directory containing {CONFIG_NAME} "
            f"and {SAFETENSORS_NAME} or {BIN_NAME}"
        )
    if _looks_like_repo_id(raw):
        return _download_from_hub(name, raw)
    raise AdapterNotFoundError(
        f"adapter '{name}': source '{raw}' does not exist (expected a local directory containing "
        f"{CONFIG_NAME} and {SAFETENSORS_NAME} or {BIN_NAME}, or a Hugging Face Hub repo id 'owner/name')"
    )


def _looks_like_repo_id(raw: str) -> bool:
    return not raw.startswith(("/", ".", "~")) and _REPO_ID.match(raw) is not None and ".." not in raw


def _resolve_local_dir(name: str, directory: Path) -> tuple[Path, Path, Path]:
    directory = directory.resolve()
    config_path = directory / CONFIG_NAME
    safetensors_path = directory / SAFETENSORS_NAME
    bin_path = directory / BIN_NAME
    has_config = config_path.is_file()
    # safetensors is preferred: it cannot execute code and loads without unpickling.
    weights_path = (
        safetensors_path if safetensors_path.is_file() else bin_path if bin_path.is_file() else None
    )
    missing = []
    if not has_config:
        missing.append(CONFIG_NAME)
    if weights_path is None:
        missing.append(f"{SAFETENSORS_NAME} or {BIN_NAME}")
    if missing:
        raise AdapterNotFoundError(
            f"adapter '{name}': directory '{directory}' has no {' and no '.join(missing)}; "
            "is it a PEFT adapter directory (saved with save_pretrained)?"
        )
    assert weights_path is not None
    return directory, config_path, weights_path


def _download_from_hub(name: str, repo_id: str) -> tuple[Path, Path, Path]:
    """Fetch only the config and one weights file; a whole-repo snapshot could pull in gigabytes."""
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise AdapterNotFoundError(
            f"adapter '{name}': '{repo_id}' is not a local directory and huggingface_hub is not installed "
            "to download it from the Hub"
        ) from exc

    where = f"adapter '{name}': '{repo_id}' is not a local directory, and downloading"
    try:
        config_path = Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=CONFIG_NAME))
    except Exception as exc:
        raise _hub_error(
            f"{where} {CONFIG_NAME} from the Hugging Face Hub repo '{repo_id}' failed: {exc}", exc
        ) from exc

    # safetensors first (no unpickling); .bin only when the repo has no safetensors file.
    errors: list[str] = []
    last_exc: Exception | None = None
    for filename in (SAFETENSORS_NAME, BIN_NAME):
        try:
            weights_path = Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename))
        except Exception as exc:
            errors.append(f"{filename}: {exc}")
            last_exc = exc
        else:
            return config_path.parent, config_path, weights_path
    assert last_exc is not None
    raise _hub_error(
        f"{where} the weights from the Hugging Face Hub repo '{repo_id}' failed ({'; '.join(errors)})",
        last_exc,
    ) from last_exc


def _hub_error(message: str, exc: Exception) -> AdapterLoadError:
    """Missing repos/files become AdapterNotFoundError; other failures (network, auth) stay generic."""
    from huggingface_hub import errors as hub_errors

    not_found = tuple(
        cls
        for cls_name in (
            "RepositoryNotFoundError",
            "RevisionNotFoundError",
            "EntryNotFoundError",
            "LocalEntryNotFoundError",
        )
        if isinstance(cls := getattr(hub_errors, cls_name, None), type)
    )
    error_cls = AdapterNotFoundError if isinstance(exc, not_found) else AdapterLoadError
    return error_cls(message)


# ---------------------------------------------------------------------------------------------- files


def _read_config(name: str, config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"adapter '{name}': cannot parse '{config_path}': {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(
            f"adapter '{name}': '{config_path}' must hold a JSON object, got {type(config).__name__}"
        )
    return config


def _validated(
    name: str,
    source: str | os.PathLike,
    model: nn.Module | ModelTargets,
    read: Callable[[str, Path], dict[str, Any]],
) -> tuple[Path, dict[str, Any], dict[str, tuple[Any, Any, float]]]:
    """(directory, config, (A, B, scale) per module) after every check; `read` gives the tensors
    (the weights themselves, or shapes only from the header)."""
    directory, config_path, weights_path = _resolve_source(name, source)
    config = _read_config(name, config_path)
    _check_config(name, config)
    pairs, stray_keys = _collect_lora_pairs(name, read(name, weights_path), weights_path)
    loras = _check_modules(name, config, pairs, model)
    if stray_keys:
        raise _stray_error(name, stray_keys)
    return directory, config, loras


@dataclass(frozen=True)
class _HeaderTensor:
    """A tensor known by its shape only (from a safetensors header)."""

    shape: torch.Size

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _read_shapes(name: str, weights_path: Path) -> dict[str, Any]:
    if not weights_path.name.endswith(".safetensors"):
        return _read_weights(name, weights_path)
    try:
        from safetensors import safe_open

        with safe_open(str(weights_path), framework="pt") as f:
            return {k: _HeaderTensor(torch.Size(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise AdapterLoadError(f"adapter '{name}': cannot read weights file '{weights_path}': {exc}") from exc


def _read_weights(name: str, weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        if weights_path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(str(weights_path), device="cpu")
        else:
            # weights_only: a .bin is a pickle, and adapters are often downloaded from strangers.
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(f"adapter '{name}': cannot read weights file '{weights_path}': {exc}") from exc
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise AdapterLoadError(
            f"adapter '{name}': weights file '{weights_path}' is not a mapping of names to tensors"
        )
    return dict(state_dict)


# --------------------------------------------------------------------------------------------- checks


def _check_config(name: str, config: dict[str, Any]) -> None:
    """Refuse configs whose inference forward is not plain `y += scale * B(A(x))` on Linear modules."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterLoadError(
            f"adapter '{name}': adapter_config.json has no peft_type (not a PEFT adapter?)"
        )
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"adapter '{name}' has peft_type {peft_type}; only LoRA adapters (peft_type LORA) are supported"
        )

    features: list[str] = []
    if config.get("use_dora"):
        features.append("DoRA (use_dora=true)")
    if config.get("lora_bias"):
        features.append("a trained LoRA bias (lora_bias=true)")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        features.append(f"trained base-model biases (bias='{bias}')")
    if config.get("modules_to_save"):
        features.append(f"fully trained modules (modules_to_save={config['modules_to_save']})")
    if config.get("trainable_token_indices"):
        features.append("trainable tokens (trainable_token_indices)")
    if config.get("target_parameters"):
        features.append(f"LoRA on parameters (target_parameters={config['target_parameters']})")
    if config.get("layer_replication"):
        features.append("layer replication (layer_replication)")
    if config.get("alora_invocation_tokens") is not None:
        features.append("aLoRA (alora_invocation_tokens)")
    if config.get("use_qalora"):
        features.append("QALoRA (use_qalora=true)")
    if config.get("arrow_config"):
        features.append("Arrow routing (arrow_config)")
    if config.get("use_bdlora"):
        features.append("BD-LoRA block-diagonal factors (use_bdlora)")
    if config.get("kasa_config"):
        features.append("KaSA (kasa_config)")
    init = config.get("init_lora_weights")
    if isinstance(init, str):
        for prefix, label in _BASE_MUTATING_INITS.items():
            if init.lower().startswith(prefix):
                features.append(
                    f"{label} initialisation, which changed the base weights (init_lora_weights='{init}'); "
                    "convert it to plain LoRA with "
                    "save_pretrained(path_initial_model_for_weight_conversion=...)"
                )
                break
    if features:
        raise UnsupportedAdapterError(
            f"adapter '{name}' uses {'; '.join(features)}, which hf_multilora cannot serve"
        )


def _collect_lora_pairs(
    name: str, state_dict: dict[str, torch.Tensor], weights_path: Path
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Group tensors into (A, B) per base-module name, refusing any LoRA tensor we would otherwise drop.

    Also returns the non-LoRA keys. They are refused only after the target modules were checked, so that
    e.g. an lm_head LoRA (which PEFT saves together with the lm_head base weight) is reported as such.
    """
    found: dict[str, dict[str, torch.Tensor]] = {}
    embedding_modules: set[str] = set()
    other_keys: list[str] = []
    for key, tensor in state_dict.items():
        stripped = key.removeprefix(_PEFT_PREFIX)
        match = _LORA_KEY.match(stripped)
        if match is not None:
            if match["param"] == "bias":
                raise UnsupportedAdapterError(
                    f"adapter '{name}' has a trained LoRA bias ('{key}', lora_bias), which hf_multilora "
                    "cannot serve"
                )
            slot = found.setdefault(match["module"], {})
            if match["ab"] in slot:
                raise AdapterLoadError(
                    f"adapter '{name}': '{weights_path}' holds more than one {match['ab']} for module "
                    f"'{match['module']}' (several adapters saved together?)"
                )
            slot[match["ab"]] = tensor
        elif (emb := _EMBEDDING_KEY.match(stripped)) is not None:
            embedding_modules.add(emb["module"])
        elif ".lora_magnitude_vector" in stripped:
            raise UnsupportedAdapterError(
                f"adapter '{name}' has DoRA magnitudes ('{key}'), which hf_multilora cannot serve"
            )
        elif ".trainable_tokens_" in stripped:
            raise UnsupportedAdapterError(
                f"adapter '{name}' has trainable tokens ('{key}'), which hf_multilora cannot serve"
            )
        elif _TRAINING_ONLY_KEY.search(stripped):
            continue
        elif ".lora_" in stripped:
            raise UnsupportedAdapterError(
                f"adapter '{name}' has a tensor of an unsupported LoRA variant ('{key}'); only plain "
                "lora_A/lora_B weights can be served"
            )
        else:
            other_keys.append(key)

    if embedding_modules:
        raise UnsupportedAdapterError(
            f"adapter '{name}' uses embedding LoRA on {sorted(embedding_modules)}, which hf_multilora "
            "cannot serve"
        )

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, slot in found.items():
        missing = [ab for ab in ("lora_A", "lora_B") if ab not in slot]
        if missing:
            raise AdapterLoadError(
                f"adapter '{name}': module '{module_name}' has no {missing[0]} weight in '{weights_path}'"
            )
        pairs[module_name] = (slot["lora_A"], slot["lora_B"])

    if not pairs:
        if other_keys:
            raise _stray_error(name, other_keys)
        raise AdapterLoadError(f"adapter '{name}': '{weights_path}' contains no LoRA weights")
    return pairs, other_keys


def _stray_error(name: str, keys: list[str]) -> UnsupportedAdapterError:
    shown = ", ".join(f"'{k}'" for k in sorted(keys)[:5]) + (", ..." if len(keys) > 5 else "")
    return UnsupportedAdapterError(
        f"adapter '{name}' also stores base-model weights ({shown}), e.g. from modules_to_save, a resized "
        "embedding or trained biases; hf_multilora serves the unmodified base model and cannot apply them"
    )


def _check_modules(
    name: str,
    config: dict[str, Any],
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    model: nn.Module | ModelTargets,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Validate every target against the base model; (A, B, scale) per module in sorted name order."""
    described = ModelTargets.of(model)
    targets = described.targets
    r_default = config.get("r", 8)  # LoraConfig defaults, for hand-written configs that omit them
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))

    loras: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module_name in sorted(pairs):
        a, b = pairs[module_name]
        type_name = described.types.get(module_name)
        if type_name is None:
            raise AdapterShapeError(
                f"adapter '{name}' targets module '{module_name}', which the base model does not have "
                "(trained on another model?)"
            )
        if module_name == described.output_embedding:
            raise UnsupportedAdapterError(
                f"adapter '{name}' uses lm_head LoRA (on the output embedding '{module_name}'), which "
                "hf_multilora cannot serve"
            )
        if module_name in described.embeddings:
            raise UnsupportedAdapterError(
                f"adapter '{name}' uses embedding LoRA (on '{module_name}'), which hf_multilora cannot serve"
            )
        if module_name not in targets:
            raise UnsupportedAdapterError(
                f"adapter '{name}' targets module '{module_name}' of type {type_name}; only "
                "nn.Linear and Conv1D modules can be served"
            )
        in_features, out_features = targets[module_name]
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[1] != in_features
            or b.shape[0] != out_features
            or b.shape[1] != a.shape[0]
        ):
            raise AdapterShapeError(
                f"adapter '{name}' module '{module_name}': lora_A is {list(a.shape)} and lora_B is "
                f"{list(b.shape)}, but the base module has in_features={in_features} and "
                f"out_features={out_features} (needs lora_A [r, {in_features}] and lora_B "
                f"[{out_features}, r]); trained on another model?"
            )
        rank = int(a.shape[0])
        r_cfg = _pattern_value(name, rank_pattern, module_name, r_default, "rank_pattern")
        alpha = _pattern_value(name, alpha_pattern, module_name, alpha_default, "alpha_pattern")
        if isinstance(r_cfg, bool) or not isinstance(r_cfg, int) or r_cfg <= 0:
            raise AdapterLoadError(
                f"adapter '{name}': rank for '{module_name}' is {r_cfg!r}, not a positive int"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise AdapterLoadError(
                f"adapter '{name}': lora_alpha for '{module_name}' is {alpha!r}, not a number"
            )
        if rank != r_cfg:
            raise AdapterShapeError(
                f"adapter '{name}' module '{module_name}': the weights have rank {rank} (lora_A "
                f"{list(a.shape)}) but the config gives r={r_cfg} (r / rank_pattern); "
                "the scale would be wrong"
            )
        # Exactly PEFT's LoraLayer.update_layer arithmetic, so the served output matches PEFT's.
        scale = alpha / math.sqrt(r_cfg) if use_rslora else alpha / r_cfg
        loras[module_name] = (a, b, float(scale))
    return loras


def _pattern_value(name: str, pattern: Any, module_name: str, default: Any, field_name: str) -> Any:
    """PEFT's `get_pattern_key` rule: the first key whose regex matches a dotted suffix of the name wins."""
    if not isinstance(pattern, Mapping):
        raise AdapterLoadError(f"adapter '{name}': {field_name} must be a JSON object, got {pattern!r}")
    for key, value in pattern.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module_name)
        except re.error as exc:
            raise AdapterLoadError(
                f"adapter '{name}': {field_name} key {key!r} is not a valid regex: {exc}"
            ) from exc
        if matched:
            return value
    return default


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if not callable(get_output_embeddings):
        return None
    try:
        return get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _can_pin() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
