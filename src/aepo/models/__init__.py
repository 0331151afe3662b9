"""Models: the built-in tokenizer and tiny causal LM, and loading any local HF causal LM.

Attributes are imported on first use, so importing `aepo.models` (e.g. by the CLI) does not
pull in transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "build_tokenizer": "aepo.models.tokenizer",
    "read_corpus": "aepo.models.tokenizer",
    "save_tokenizer": "aepo.models.tokenizer",
    "MODEL_PRESETS": "aepo.models.factory",
    "init_model": "aepo.models.factory",
    "model_config": "aepo.models.factory",
    "count_parameters": "aepo.models.factory",
    "load_model": "aepo.models.loading",
    "resolve_device": "aepo.models.loading",
    "resolve_dtype": "aepo.models.loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aepo.models' has no attribute {name!r}")
