"""Load any local HF causal LM directory (Qwen2.5 / Qwen3 / Llama / the built-in tiny model).

Nothing is ever downloaded: the directory must hold `config.json`, weights (safetensors or
.bin, single or sharded) and tokenizer files. Missing pieces fail early with a message that
names the directory and what it lacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# the files that hold a vocabulary (tokenizer_config.json alone does not)
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; asking for cuda without one is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device cpu (or auto)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (float32 | bfloat16 | float16, or bf16/fp16/fp32) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class ModelDirError(ValueError):
    """A model directory that cannot be loaded: a missing, empty, truncated or malformed file,
    or weights that do not fit its config.json. The message names the directory and the file,
    and says what to do."""


def silence_transformers_progress() -> None:
    """Turn off transformers' own progress bars ("Loading weights", "Writing model shards"):
    the commands show their own progress, and a bar per load clutters every log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _where(root: Path) -> str:
    return f"model directory {str(root)!r}"


def _read_safetensors_header(root: Path, file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header; ModelDirError if the file is empty,
    truncated or not safetensors. Reads the header only, not the weights."""
    fix = f"copy {file.name} again from where the model came from (or re-save the model)"
    size = file.stat().st_size
    if size == 0:
        raise ModelDirError(f"{_where(root)}: {file.name} is empty (0 bytes); {fix}")
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or n <= 1 or n > 100 * 2**20:
            raise ModelDirError(f"{_where(root)}: {file.name} is not a safetensors file or is damaged "
                                f"(no valid header in its {size} bytes); {fix}")
        if 8 + n > size:
            raise ModelDirError(f"{_where(root)}: {file.name} is truncated ({size} bytes, shorter than "
                                f"its own header says); {fix}")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
            shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ModelDirError(f"{_where(root)}: {file.name} has a damaged header; {fix}") from None
    if 8 + n + end > size:
        raise ModelDirError(f"{_where(root)}: {file.name} is truncated ({size} of {8 + n + end} bytes); {fix}")
    return shapes


def _weight_shapes(root: Path) -> dict[str, tuple[int, ...]] | None:
    """Shapes of the safetensors weights transformers would load (None for .bin weights), after
    checking that every file is there and complete."""
    single = root / "model.safetensors"
    if single.is_file():
        return _read_safetensors_header(root, single)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelDirError(f"{_where(root)}: {index.name} is not a valid weights index (JSON with a "
                                f"\"weight_map\"); copy it again from where the model came from") from None
        shapes: dict[str, tuple[int, ...]] = {}
        for name in shards:
            if not (root / name).is_file():
                raise ModelDirError(f"{_where(root)}: {index.name} lists {name}, which is missing; "
                                    f"copy every weights shard into the directory")
            shapes.update(_read_safetensors_header(root, root / name))
        return shapes
    for name in ("pytorch_model.bin",):
        if (root / name).is_file() and (root / name).stat().st_size == 0:
            raise ModelDirError(f"{_where(root)}: {name} is empty (0 bytes); copy it again from where the "
                                f"model came from")
    return None


def _check_config(root: Path) -> None:
    path = root / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelDirError(f"{_where(root)}: config.json is not a text file; restore it from where the "
                            f"model came from") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{_where(root)}: config.json is not valid JSON ({e.msg} at line {e.lineno}, "
                            f"column {e.colno}); fix it, or restore it from where the model came from") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{_where(root)}: config.json must hold a JSON object, got {type(data).__name__}; "
                            f"restore it from where the model came from")
    if not data.get("model_type"):
        raise ModelDirError(f"{_where(root)}: config.json has no \"model_type\"; restore it from where the "
                            f"model came from")


def _check_shapes_match_config(root: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare the weights' shapes with those of the model config.json describes (built on the
    meta device: no memory, no weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ModelDirError(f"{_where(root)}: config.json does not describe a causal LM that transformers can "
                            f"build ({_first_line(e)}); restore it from where the model came from") from None
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: not checked here
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not _renames_checkpoint_keys(model):  # else names in the file differ from the model's by design
        prefix = getattr(model, "base_model_prefix", "") or ""
        have = {k if k in expected or f"{prefix}.{k}" not in expected else f"{prefix}.{k}" for k in shapes}
        skip_missing = getattr(model, "_keys_to_ignore_on_load_missing", None)
        skip_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
        missing = sorted(k for k in set(expected) - have if k not in _tied_keys(model) and not _ignored(k, skip_missing))
        unexpected = sorted(k for k in shapes if k not in expected and f"{prefix}.{k}" not in expected
                            and not _ignored(k, skip_unexpected))
        if missing:
            raise ModelDirError(_key_mismatch_message(root, type(model).__name__, missing, unexpected))
    bad = [(k, shapes[k], expected[k]) for k in sorted(shapes) if k in expected and shapes[k] != expected[k]]
    if bad:
        k, got, want = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ModelDirError(
            f"{_where(root)}: the weights do not match config.json: {k} is {list(got)} in the weights but "
            f"{list(want)} per config.json{more}; put the config.json that belongs to these weights in the "
            f"directory (or the weights that belong to this config)")


def _renames_checkpoint_keys(model: torch.nn.Module) -> bool:
    """Whether transformers renames or fuses this architecture's tensors while loading (MoE
    experts, legacy names): then the file's names are not the model's and are not compared here."""
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model

        return bool(extract_weight_conversions_for_model(model))
    except Exception:  # noqa: BLE001 - another transformers: assume renaming, leave it to load_model
        return True


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Parameters tied to another (lm_head to the embeddings): absent from the weights by design."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied)


def _ignored(key: str, patterns: list[str] | None) -> bool:
    import re

    return any(re.search(p, key) for p in patterns or [])


def _key_mismatch_message(root: Path, arch: str, missing: list[str], unexpected: list[str]) -> str:
    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    text = (f"{_where(root)} does not hold weights for this architecture ({arch}, per config.json): "
            f"{len(missing)} of its tensors are not in the weights ({few(missing)})")
    if unexpected:
        text += f", and the weights hold {len(unexpected)} tensors it does not have ({few(unexpected)})"
    return (text + "; loading them would leave those tensors randomly initialised. Put the weights that belong "
            "to this config.json in the directory (or the config.json that belongs to these weights)")


def check_model_dir(path: str | Path, *, deep: bool = True) -> Path:
    """Return the directory if it looks like a loadable HF causal LM, else raise ModelDirError
    (a ValueError) naming the directory, the file at fault and what to do.

    Checks that config.json, weights and tokenizer files are present, that config.json is valid
    JSON, and (with `deep`) that every safetensors weights file is complete and its tensors have
    the shapes config.json implies. Only headers are read: nothing is loaded.
    """
    root = Path(path).expanduser()
    if (root / "adapter_config.json").is_file():  # a LoRA adapter: its files, then its base model's
        from aepo.models.lora import adapter_base

        check_model_dir(adapter_base(root), deep=deep)
        return root
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise ModelDirError(f"{_where(root)} {what}; give a local HF model directory "
                            f"(e.g. one made by `aepo model init`)")
    if not (root / "config.json").is_file():
        raise ModelDirError(f"{_where(root)} lacks config.json; give a local HF model directory "
                            f"(config.json, weights and tokenizer files)")
    has_weights = any((root / name).is_file() for name in _WEIGHT_FILES) or any(root.glob("*.safetensors"))
    if not has_weights:
        raise ModelDirError(
            f"{_where(root)} lacks weights (one of {', '.join(_WEIGHT_FILES)} or *.safetensors); "
            f"copy the weights into the directory"
        )
    if not any((root / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelDirError(
            f"{_where(root)} lacks tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); copy the "
            f"tokenizer files of the model into the directory"
        )
    if not any((root / name).is_file() for name in _VOCAB_FILES):
        raise ModelDirError(
            f"{_where(root)} lacks tokenizer files: tokenizer.json is missing (tokenizer_config.json alone "
            f"does not hold the vocabulary); copy tokenizer.json from the original model into the directory"
        )
    _check_config(root)
    if deep:
        shapes = _weight_shapes(root)
        if shapes:
            _check_shapes_match_config(root, shapes)
    return root


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _is_load_error(e: BaseException) -> bool:
    """Whether a from_pretrained failure means damaged or mismatched files (not, say, out of memory)."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    text = str(e)
    return (isinstance(e, (OSError, ValueError)) or type(e).__name__ == "SafetensorError"
            or "size mismatch" in text or "ignore_mismatched_sizes" in text)


def load_tokenizer(path: str | Path, *, checked: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory (EOS as pad where it has no pad token); a
    tokenizer that cannot be loaded raises ModelDirError naming the directory."""
    root = Path(path) if checked else check_model_dir(path)
    if (root / "adapter_config.json").is_file() and not any((root / n).is_file() for n in _VOCAB_FILES):
        from aepo.models.lora import adapter_base

        root = adapter_base(root)  # an adapter saved without a tokenizer: its base model's
    silence_transformers_progress()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ModelDirError(f"{_where(root)}: its tokenizer files cannot be loaded ({_first_line(e)}); copy "
                            f"tokenizer.json and tokenizer_config.json from the original model") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local causal LM and its tokenizer, in eval mode on `device` with `dtype`. An
    adapter directory (`aepo.models.lora`) loads as its base model with the adapter on top.

    A tokenizer without a pad token gets its EOS token as pad (Llama-style tokenizers). A
    directory that cannot be loaded raises ModelDirError (a ValueError) naming the file.
    """
    root = check_model_dir(path)
    if (root / "adapter_config.json").is_file():
        from aepo.models.lora import load_adapter_model

        return load_adapter_model(root, device=device, dtype=dtype)  # type: ignore[return-value]
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(root, checked=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch_dtype, local_files_only=True,
                                                           output_loading_info=True)
    except Exception as e:
        if not _is_load_error(e):
            raise
        raise ModelDirError(f"{_where(root)}: its weights cannot be loaded ({_first_line(e)}); check that "
                            f"config.json and the weights files are complete and belong together") from None
    # transformers fills tensors the weights lack with random values and only warns: refuse instead
    # (tied tensors, such as lm_head tied to the embeddings, are not reported missing)
    missing = sorted(set(info.get("missing_keys") or ()) - _tied_keys(model))
    if missing:
        raise ModelDirError(_key_mismatch_message(root, type(model).__name__, missing,
                                                  sorted(info.get("unexpected_keys") or ())))
    model.to(torch_device)
    model.eval()
    return model, tokenizer


MODEL_ID_FILE = "aepo_model_id.json"
"""A random id written with every model directory aepo saves: with the weights' sizes and
times (`model_identity`) it names these weights, so a cached result is reused only for them."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def write_model_files(directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write `model` (safetensors), `tokenizer` and a fresh MODEL_ID_FILE into an existing directory."""
    import uuid

    silence_transformers_progress()
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    Path(directory, MODEL_ID_FILE).write_text(json.dumps({"id": uuid.uuid4().hex}) + "\n")


def model_identity(model_dir: str | Path) -> str:
    """A short hash naming the weights in `model_dir`: its MODEL_ID_FILE (any model aepo saved),
    config.json, and every weight file's name, size and modification time (so weights replaced
    by hand, or a model aepo did not write, get another identity)."""
    import hashlib

    d = Path(model_dir)
    h = hashlib.sha256()
    for name in (MODEL_ID_FILE, "config.json"):
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    for f in sorted(p for p in d.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if (d / "adapter_config.json").is_file():  # a LoRA adapter names its weights with its base model's
        from aepo.models.lora import adapter_base

        h.update((d / "adapter_config.json").read_bytes() + model_identity(adapter_base(d)).encode())
    return h.hexdigest()[:16]


def save_model_dir(out_dir: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   *, jsonl_files: dict[str, list[dict]] | None = None,
                   text_files: dict[str, str] | None = None) -> Path:
    """Save a loadable HF directory atomically (a kill never leaves half of one), with optional
    side files: JSONL rows such as a training history, and text such as the run config the
    model was trained with (`aepo.config.RUN_CONFIG_FILE`)."""
    from aepo.io import atomic_dir, write_jsonl

    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, model, tokenizer)
        for name, rows in (jsonl_files or {}).items():
            write_jsonl(tmp / name, rows)
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)
