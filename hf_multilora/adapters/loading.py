"""Read PEFT-format LoRA adapters into one flat host tensor (`HostAdapter`).

The batched kernels can only apply the plain LoRA update ``y += scale * (x @ A.T) @ B.T`` to Linear-like
modules. Anything a PEFT adapter may carry beyond that (DoRA magnitudes, trained biases, fully trained
modules, embedding LoRA, ...) would be silently dropped if we loaded only A and B, and the served model
would quietly differ from the trained one. So this loader refuses every such feature by name instead of
approximating it, and it checks every shape against the base model before anything is allocated.

PEFT semantics mirrored here (peft 0.21): the saved tensors define the target set (the ``target_modules``
regexes are resolved at training time against the training model, so they are only a hint), the per-module
rank/alpha come from ``rank_pattern``/``alpha_pattern`` with ``get_pattern_key`` matching, and the scale is
``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA. ``target_modules`` is still checked to match some module
of the base with PEFT's ``check_target_module_exists`` rule, as PEFT refuses a config that matches nothing.

The loaders take `allowed_dir`: when set, every file is opened through its resolved path and only if that
lies inside `allowed_dir`, so a folder inside it whose files are symlinks to elsewhere cannot be used to read
them; `AdapterSource` carries it, so the weights read at first use are checked again then.
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
# adapter_config.json flags that, when set, make the forward something other than y += scale * B(A(x))
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "a trained LoRA bias (lora_bias=true)",
    "modules_to_save": "fully trained modules (modules_to_save={})",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters={})",
    "layer_replication": "layer replication (layer_replication)",
    "use_qalora": "QALoRA (use_qalora=true)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "BD-LoRA block-diagonal factors (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
}
_FLOAT32 = torch.finfo(torch.float32)  # the kernels' scale type


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
    # Every dotted tail of every module name ('q_proj', 'self_attn.q_proj', ...): a target_modules list
    # entry matches some module exactly when it is one of these (PEFT: equal to or a `.`-suffix of a name).
    name_tails: frozenset[str]

    @classmethod
    def of(cls, model: nn.Module | ModelTargets) -> ModelTargets:
        if isinstance(model, ModelTargets):
            return model
        output_embedding = _output_embedding(model)
        named = dict(model.named_modules())
        parts = [n.split(".") for n in named if n]
        return cls(
            lora_target_modules(model),
            {n: type(m).__name__ for n, m in named.items()},
            frozenset(n for n, m in named.items() if isinstance(m, nn.Embedding)),
            next((n for n, m in named.items() if m is output_embedding), None),
            frozenset(".".join(p[i:]) for p in parts for i in range(len(p))),
        )


@dataclass(frozen=True)
class AdapterSource:
    """A registered adapter, checked but not read: where it is, what it targets, and the directory its
    files must stay in (None: anywhere), which the read at first use checks again."""

    name: str
    directory: Path
    modules: tuple[str, ...]
    allowed_dir: Path | None = None
    max_rank: int = 0  # its largest module rank (decode graphs are shared by adapters of one rank capacity)


def check_peft_adapter(
    name: str,
    source: str | os.PathLike,
    model: nn.Module | ModelTargets,
    *,
    allowed_dir: str | os.PathLike | None = None,
) -> AdapterSource:
    """Every check of `load_peft_adapter` without reading the weights: config, tensor names and
    shapes come from the safetensors header (a `.bin` has none and is read whole). Registering
    thousands of adapters this way takes seconds; `load_peft_adapter` reads the weights at first use."""
    allowed = _resolved_allowed_dir(name, allowed_dir)
    directory, _, loras = _validated(name, source, model, _read_shapes, allowed)
    max_rank = max((a.shape[0] for a, _, _ in loras.values()), default=0)
    return AdapterSource(name, directory, tuple(loras), allowed, max_rank)


def load_peft_adapter(
    name: str,
    source: str | os.PathLike,
    model: nn.Module | ModelTargets,
    dtype: torch.dtype,
    pin_memory: bool = False,
    *,
    allowed_dir: str | os.PathLike | None = None,
) -> HostAdapter:
    """Load a PEFT LoRA adapter as one flat host tensor laid out for the batched kernels.

    `flat` holds, for each targeted module in sorted name order, A ([rank, in] row-major) then B
    transposed ([rank, out] row-major), converted to `dtype`, every rank row padded to a multiple
    of the kernels' WEIGHT_ALIGN; offsets in `ModuleLora` are element offsets into it.
    Everything but the finiteness of the weights (checked in one pass over the flat tensor) is validated
    before the flat tensor is allocated, and nothing outside the returned object is touched (in particular
    not `model`), so a failed load leaves no trace.

    `pin_memory` asks for page-locked memory so device copies can be asynchronous. Pinning needs an
    accelerator runtime; on a machine without one there is no device copy to speed up, so the tensor is
    left pageable rather than failing.

    `allowed_dir` confines the source to that directory: it must be a local folder (no Hub id) and every
    file read must resolve, symlinks followed, to a path inside it. Without it symlinks are followed
    anywhere (a Hub cache snapshot is made of them).

    Raises AdapterNotFoundError (a FileNotFoundError) when the source or its files are missing,
    UnsupportedAdapterError for PEFT features the kernels cannot reproduce, AdapterShapeError when the
    adapter does not fit `model`, and AdapterLoadError for unreadable files, files outside `allowed_dir`,
    scales float32 cannot hold and NaN / inf weights.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

    allowed = _resolved_allowed_dir(name, allowed_dir)
    directory, config, loras = _validated(name, source, model, _read_weights, allowed)
    host = pack_adapter(name, str(directory), config, loras, dtype, pin_memory=pin_memory and _can_pin())
    _check_finite(name, host.flat, loras, dtype)
    return host


# --------------------------------------------------------------------------------------------- source


def _resolved_allowed_dir(name: str, allowed_dir: str | os.PathLike | None) -> Path | None:
    if allowed_dir is None:
        return None
    allowed = Path(allowed_dir).expanduser().resolve()
    if not allowed.is_dir():
        raise AdapterNotFoundError(f"adapter '{name}': allowed_dir '{allowed_dir}' is not a directory")
    return allowed


def _confined(name: str, path: Path, allowed: Path | None) -> Path:
    """The path to open for `path`: itself when not confined, else its real path (symlinks followed, `..`
    applied), refused unless inside `allowed`. Opening the real path reads what was checked."""
    if allowed is None:
        return path
    real = path.resolve()
    if not real.is_relative_to(allowed):
        raise AdapterLoadError(
            f"adapter '{name}': '{path}' resolves to '{real}', outside the allowed directory '{allowed}'"
        )
    return real


def _resolve_source(name: str, source: str | os.PathLike, allowed: Path | None) -> tuple[Path, Path, Path]:
    """Find (directory, config file, weights file), downloading from the Hub only when it is not local
    and the source is not confined to `allowed`.

    A local directory always wins so that a checkout named like a repo id is never shadowed by the Hub.
    """
    raw = os.fspath(source)
    path = Path(raw).expanduser()
    if path.is_dir():
        return _resolve_local_dir(name, _confined(name, path, allowed))
    if path.exists():
        raise AdapterNotFoundError(
            f"adapter '{name}': source '{raw}' is a file; expected a directory containing {CONFIG_NAME} "
            f"and {SAFETENSORS_NAME} or {BIN_NAME}"
        )
    if allowed is not None:
        raise AdapterNotFoundError(
            f"adapter '{name}': source '{raw}' is not a folder; only folders inside the allowed directory "
            f"'{allowed}' can be loaded (no Hugging Face Hub downloads)"
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


def _read_config(name: str, config_path: Path, allowed: Path | None) -> dict[str, Any]:
    try:
        config = json.loads(_confined(name, config_path, allowed).read_text(encoding="utf-8"))
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
    read: Callable[[str, Path, Path | None], dict[str, Any]],
    allowed: Path | None,
) -> tuple[Path, dict[str, Any], dict[str, tuple[Any, Any, float]]]:
    """(directory, config, (A, B, scale) per module) after every check; `read` gives the tensors
    (the weights themselves, or shapes only from the header)."""
    directory, config_path, weights_path = _resolve_source(name, source, allowed)
    config = _read_config(name, config_path, allowed)
    _check_config(name, config)
    pairs, stray_keys = _collect_lora_pairs(name, read(name, weights_path, allowed), weights_path)
    described = ModelTargets.of(model)
    loras = _check_modules(name, config, pairs, described)
    if stray_keys:
        raise _stray_error(name, stray_keys)
    _check_target_modules(name, config.get("target_modules"), described)
    return directory, config, loras


@dataclass(frozen=True)
class _HeaderTensor:
    """A tensor known by its shape only (from a safetensors header)."""

    shape: torch.Size

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _read_shapes(name: str, weights_path: Path, allowed: Path | None) -> dict[str, Any]:
    if not weights_path.name.endswith(".safetensors"):
        return _read_weights(name, weights_path, allowed)
    opened = _confined(name, weights_path, allowed)
    try:
        from safetensors import safe_open

        with safe_open(str(opened), framework="pt") as f:
            return {k: _HeaderTensor(torch.Size(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise AdapterLoadError(f"adapter '{name}': cannot read weights file '{weights_path}': {exc}") from exc


def _read_weights(name: str, weights_path: Path, allowed: Path | None) -> dict[str, torch.Tensor]:
    # The format follows the name in the adapter's folder: a link's target may be named otherwise (Hub blobs).
    opened = _confined(name, weights_path, allowed)
    try:
        if weights_path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(str(opened), device="cpu")
        else:
            # weights_only: a .bin is a pickle, and adapters are often downloaded from strangers.
            state_dict = torch.load(opened, map_location="cpu", weights_only=True)
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

    features = [label.format(config[flag]) for flag, label in _UNSUPPORTED_FLAGS.items() if config.get(flag)]
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        features.append(f"trained base-model biases (bias='{bias}')")
    if config.get("alora_invocation_tokens") is not None:
        features.append("aLoRA (alora_invocation_tokens)")
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
    described: ModelTargets,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Validate every target against the base model; (A, B, scale) per module in sorted name order."""
    targets = described.targets
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
        loras[module_name] = (a, b, _scale(name, config, module_name, a))
    return loras


def _scale(name: str, config: dict[str, Any], module_name: str, a: Any) -> float:
    """The module's LoRA scale from r / rank_pattern and lora_alpha / alpha_pattern, refused unless the
    kernels can apply it: they hold scales as float32, where e.g. alpha 1e308 is inf and every output
    of the adapter would be NaN. (A negative alpha is served: PEFT allows it.)"""
    # LoraConfig defaults, for hand-written configs that omit them.
    r_field, r_cfg = _pattern_value(name, config, module_name, "r", "rank_pattern", 8)
    alpha_field, alpha = _pattern_value(name, config, module_name, "lora_alpha", "alpha_pattern", 8)
    if isinstance(r_cfg, bool) or not isinstance(r_cfg, int) or r_cfg <= 0:
        raise AdapterLoadError(
            f"adapter '{name}': rank for '{module_name}' is {r_cfg!r} ({r_field}), not a positive int"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterLoadError(
            f"adapter '{name}': lora_alpha for '{module_name}' is {alpha!r} ({alpha_field}), not a number"
        )
    rank = int(a.shape[0])
    if rank != r_cfg:
        raise AdapterShapeError(
            f"adapter '{name}' module '{module_name}': the weights have rank {rank} (lora_A "
            f"{list(a.shape)}) but the config gives r={r_cfg} ({r_field}); the scale would be wrong"
        )
    use_rslora = bool(config.get("use_rslora", False))
    try:
        # Exactly PEFT's LoraLayer.update_layer arithmetic, so the served output matches PEFT's.
        scale = float(alpha / math.sqrt(r_cfg) if use_rslora else alpha / r_cfg)
    except OverflowError:  # an int alpha beyond the float range
        scale = math.inf
    if not _FLOAT32.tiny <= abs(scale) <= _FLOAT32.max:  # also false for NaN
        raise AdapterLoadError(
            f"adapter '{name}' module '{module_name}': {alpha_field} = {alpha!r} with {r_field} = {r_cfg} "
            f"gives the LoRA scale {scale!r}; it must be a non-zero number float32 can hold "
            f"({_FLOAT32.tiny:.3g} <= |scale| <= {_FLOAT32.max:.3g})"
        )
    return scale


def _pattern_value(
    name: str, config: dict[str, Any], module_name: str, field_name: str, pattern_name: str, default: Any
) -> tuple[str, Any]:
    """(where the value came from, value) for `module_name`: PEFT's `get_pattern_key` rule, the first
    `pattern_name` key whose regex matches a dotted suffix of the name wins, else `field_name`."""
    pattern = config.get(pattern_name) or {}
    if not isinstance(pattern, Mapping):
        raise AdapterLoadError(f"adapter '{name}': {pattern_name} must be a JSON object, got {pattern!r}")
    for key, value in pattern.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module_name)
        except re.error as exc:
            raise AdapterLoadError(
                f"adapter '{name}': {pattern_name} key {key!r} is not a valid regex: {exc}"
            ) from exc
        if matched:
            return f"{pattern_name}[{key!r}]", value
    return field_name, config.get(field_name, default)


def _check_target_modules(name: str, target_modules: Any, described: ModelTargets) -> None:
    """Refuse a config whose target_modules match no module of the base, as PEFT does: the saved
    tensors fit (they were checked first), so the config was edited or made for another model, and
    whatever else it says (ranks and alphas by module name) cannot be trusted to fit either.

    PEFT's `check_target_module_exists` rule: a string is a regex that must match a whole module
    name; a list entry must equal a module name or its last dotted parts. None or an empty list
    (PEFT's default targets) and 'all-linear' are no hint to check."""
    if not target_modules or target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise AdapterLoadError(
                f"adapter '{name}': target_modules {target_modules!r} is not a valid regex: {exc}"
            ) from exc
        if any(pattern.fullmatch(module) for module in described.types if module):
            return
        looked_for = f"target_modules is the regex {target_modules!r}, which matches no whole module name"
    elif isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules):
        if any(t in described.name_tails for t in target_modules):
            return
        looked_for = (
            f"target_modules {sorted(target_modules)} name no module of the base model (each must be "
            "a module's name or its last dotted parts)"
        )
    else:
        raise AdapterLoadError(
            f"adapter '{name}': target_modules must be a list of module names or a regex string, got "
            f"{target_modules!r}"
        )
    leaves = sorted({module.rsplit(".", 1)[-1] for module in described.targets})
    raise AdapterShapeError(
        f"adapter '{name}': its config's {looked_for}; the base model's LoRA-capable modules end in "
        f"{leaves}. Made for another model, or an edited config?"
    )


def _check_finite(
    name: str,
    flat: torch.Tensor,
    loras: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    dtype: torch.dtype,
) -> None:
    """Refuse NaN / inf weights: every logit of a row using them would be NaN, which generate() turns
    into token 0 without a word. One pass over the packed tensor, which also catches finite weights that
    overflow `dtype` (float32 values beyond float16's range): aminmax propagates NaN and is several times
    faster than isfinite().all() on CPU. The tensors are searched only to say where."""
    if all(math.isfinite(bound) for bound in torch.aminmax(flat)):
        return
    for module_name, (a, b, _) in loras.items():
        for label, weight in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(weight).all()):
                problem = "holds NaN or infinite values"
            elif not bool(torch.isfinite(weight.to(dtype)).all()):
                problem = f"holds values beyond the range of {dtype}, the dtype it is served in"
            else:
                continue
            raise AdapterLoadError(
                f"adapter '{name}': the {label} weight of module '{module_name}' {problem}"
            )


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
