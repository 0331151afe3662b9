"""Fixtures shared across the test folders: the built-in tokenizer and the micro model on disk.

Helpers that tests import by name (repo_paths, tiny_models, chat_templates, scripted_sampler)
live beside this file; pyproject's pytest `pythonpath` puts tests/ on the import path.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import MICRO_TEXT, save_tiny_qwen3


@pytest.fixture(scope="session")
def tok():
    """The built-in tokenizer with its generic vocabulary, read-only; a module that needs
    another corpus or a chat template defines its own `tok`."""
    from aepo.models.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory) -> Path:
    """A one-layer random Qwen3 and its tokenizer fitted on MICRO_TEXT, saved once per session;
    tests that change model files copy it first."""
    from aepo.models.tokenizer import build_tokenizer

    return save_tiny_qwen3(tmp_path_factory.mktemp("micro"), build_tokenizer([MICRO_TEXT]))
