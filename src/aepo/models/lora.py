"""LoRA adapters on a causal LM (`actor.lora`, docs/usage.md, "LoRA"), built with peft.

- `check_lora(model, lora)` names the modules an adapter would wrap, or raises LoraError (one
  line) for an architecture without matching modules or a rank above a wrapped layer's width;
  `check_lora_dir` does the same from a model directory's config.json alone (the model is
  built on the meta device: no weights are read), so a command fails before any work;
- `apply_lora(model, lora)` wraps a model; only the adapter parameters are trainable, and the
  reference policy is the same module under `adapters_disabled(model)` (no second copy);
- an *adapter directory* is what saving a wrapped model writes: peft's `adapter_config.json`
  and `adapter_model.safetensors`, with the tokenizer and the run config (aepo_run.yaml, whose
  `model.path` names the base model). `adapter_base` finds the base model and
  `load_adapter_model` loads base plus adapter; `merge_adapter` folds it into a plain model.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_TARGETS",
    "LoraError",
    "adapter_base",
    "adapters_disabled",
    "apply_lora",
    "check_lora",
    "check_lora_dir",
    "is_adapter_dir",
    "is_peft_model",
    "load_adapter_model",
    "policy_module",
    "trainable_parameters",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    # the attention and MLP projections of each decoder layer (the embeddings and head stay frozen)
    **{
        arch: _LLAMA_LIKE
        for arch in (
            "llama",
            "qwen2",
            "qwen3",
            "mistral",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        )
    },
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


class LoraError(ValueError):
    """LoRA settings that do not fit the model, or an adapter directory that cannot be loaded;
    the message names what is wrong and what to do."""


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a peft-wrapped model (False without importing peft when it is not loaded)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def policy_module(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM to run forward passes on: a wrapped model's base model, whose layers hold
    the adapters (so its forward applies them), or `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model` (and `policy_module(model)`) computes the base model's outputs:
    the KL reference policy of a LoRA run. A model without adapters is left as it is."""
    if is_peft_model(model):
        with model.disable_adapter():
            yield
    else:
        yield


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer updates: all of a plain model, only the adapters of a wrapped one."""
    return [p for p in model.parameters() if p.requires_grad]


def target_names(model: torch.nn.Module, lora: Any) -> list[str]:
    """The module-name suffixes to wrap: `lora.target_modules`, or the architecture's default."""
    if lora.target_modules:
        return list(lora.target_modules)
    arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch not in DEFAULT_TARGETS:
        raise LoraError(
            f"actor.lora: no default target modules for architecture {arch!r} (defaults exist for "
            f"{', '.join(sorted(DEFAULT_TARGETS))}); name the linear layers to adapt, e.g. "
            f"actor.lora.target_modules=q_proj,v_proj"
        )
    return DEFAULT_TARGETS[arch]


def _layer_width(module: torch.nn.Module) -> int | None:
    """min(in, out) features of a linear-like layer (nn.Linear, or GPT-2's Conv1D), else None."""
    if isinstance(module, torch.nn.Linear):
        return min(module.in_features, module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return min(weight.shape)
    return None


def check_lora(model: torch.nn.Module, lora: Any) -> list[str]:
    """The names of the modules `lora` would wrap in `model`; LoraError when none matches, when a
    match is not a linear layer, or when the rank exceeds a wrapped layer's width."""
    wanted = target_names(model, lora)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in wanted)
    ]
    arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if lora.layers_to_transform and found:
        found = _in_layers(model, found, lora.layers_to_transform)
    if not found:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _layer_width(m)})
        raise LoraError(
            f"actor.lora.target_modules: none of {','.join(wanted)} is a module of this {arch} model; "
            f"its linear layers are named {', '.join(linear[:12]) or '(none)'}"
        )
    for name, m in found:
        width = _layer_width(m)
        if width is None:
            raise LoraError(
                f"actor.lora.target_modules: {name} is a {type(m).__name__}, not a linear layer; "
                f"name linear layers only"
            )
        if lora.rank > width:
            raise LoraError(
                f"actor.lora.rank={lora.rank} is above the width of {name} ({width}); "
                f"give a rank of at most {width}"
            )
    return [name for name, _ in found]


def _in_layers(model: torch.nn.Module, found: list[tuple[str, torch.nn.Module]],
               layers: list[int]) -> list[tuple[str, torch.nn.Module]]:
    """The matches inside the decoder layers numbered `layers` (`.layers.<i>.` in the name);
    LoraError for an index the model does not have."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    bad = [i for i in layers if i < 0 or (count is not None and i >= count)]
    if bad:
        raise LoraError(f"actor.lora.layers_to_transform: {bad} are not decoder layers of this model "
                        f"(it has {count}, numbered 0-{(count or 1) - 1})")
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    inside = []
    for name, m in found:
        hit = pattern.search(name)
        if hit and int(hit.group(1)) in layers:
            inside.append((name, m))
    return inside


def check_lora_dir(model_dir: str | Path, lora: Any) -> list[str]:
    """`check_lora` against the model config.json in `model_dir` describes, built on the meta
    device (no weights read); a model transformers cannot build there is checked when loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - left to apply_lora on the loaded model
        return []
    return check_lora(model, lora)


def apply_lora(model: torch.nn.Module, lora: Any, base_path: str | Path | None = None) -> torch.nn.Module:
    """`model` wrapped with fresh LoRA adapters (peft; B = 0, so it computes what `model` does);
    only the adapters are trainable. `base_path`, the base model's directory, is recorded in the
    adapter's config as an absolute path."""
    from peft import LoraConfig, get_peft_model

    check_lora(model, lora)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_names(model, lora),
        layers_to_transform=list(lora.layers_to_transform) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    base_path = base_path or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    with _quiet_peft():
        wrapped = get_peft_model(model, config)
    if base_path and Path(base_path).is_dir():
        wrapped.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return wrapped


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Wrapping a model reads transformers' deprecated `is_gradient_checkpointing`, which warns
    on every wrap; that warning says nothing about the run."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ----------------------------------------------------------------------------- adapter directories


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is an adapter directory (it holds adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model directory of adapter directory `path`: `model.path` of its run config
    (aepo_run.yaml), else adapter_config.json's base_model_name_or_path; LoraError when neither
    names an existing model directory."""
    from aepo.io import RUN_CONFIG_FILE

    root = Path(path)
    where = f"adapter directory {str(root)!r}"
    try:
        adapter = json.loads((root / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraError(
            f"{where}: {ADAPTER_CONFIG} cannot be read ({type(e).__name__}); copy it again"
        ) from None
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise LoraError(f"{where} lacks {ADAPTER_WEIGHTS}; copy the adapter's weights into it")
    base = ""
    run_config = root / RUN_CONFIG_FILE
    if run_config.is_file():
        import yaml

        try:
            data = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
            base = str(((data.get("model") or {}).get("path")) or "")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            base = ""
    if not base and isinstance(adapter, dict):
        base = str(adapter.get("base_model_name_or_path") or "")
    if not base:
        raise LoraError(
            f"{where} does not name its base model (model.path in {RUN_CONFIG_FILE}, or "
            f"base_model_name_or_path in {ADAPTER_CONFIG}); set one of them to the base model's directory"
        )
    if not (Path(base) / "config.json").is_file():
        raise LoraError(
            f"{where}: its base model {base} is missing (no config.json there); put the base model "
            f"back at that path, or set model.path in {root / RUN_CONFIG_FILE} to where it is now"
        )
    return Path(base)


def load_adapter_model(
    path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "float32"
) -> tuple[torch.nn.Module, Any]:
    """Base model plus the adapter in `path` (peft), in eval mode, and the tokenizer (the adapter
    directory's own, else the base model's)."""
    from peft import PeftModel

    from aepo.models.loading import load_model, load_tokenizer

    root = Path(path)
    base_dir = adapter_base(root)
    base, tokenizer = load_model(base_dir, device=device, dtype=dtype)
    if (root / "tokenizer.json").is_file() or (root / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(root, checked=True)
    try:
        with _quiet_peft():
            model = PeftModel.from_pretrained(base, str(root), is_trainable=False)
    except Exception as e:  # noqa: BLE001 - a damaged or mismatched adapter, whatever peft raises
        raise LoraError(
            f"adapter directory {str(root)!r} does not load onto its base model {base_dir} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check that the "
            f"adapter was trained from that model"
        ) from None
    model.eval()
    return model, tokenizer


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model with the adapters of a wrapped `model` folded into its weights."""
    return model.merge_and_unload() if is_peft_model(model) else model
