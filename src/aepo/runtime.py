"""The CLI's shortcuts for a run's parts: the tools its options name, and its task rows.

A run's tool runner is `aepo.tools.build_tool_runner(cfg.tools)`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from aepo.tools.config import ToolsConfig


def search_tools_config(cache: str | Path | None = None, corpus: str | Path | None = None,
                        url: str | None = None) -> ToolsConfig:
    """calc and python, plus search when any search backend is given (the CLI's tool options)."""
    enabled = ["calc", "python"] + (["search"] if (cache or corpus or url) else [])
    return ToolsConfig(enabled=enabled, search_cache=str(cache or ""), search_corpus=str(corpus or ""),
                       search_url=url or "")


def load_tasks(path: str | Path, *, prompt_key: str | None = None, answer_key: str | None = None,
               limit: int | None = None) -> list[Any]:
    from aepo.data.datasets import load_dataset

    return load_dataset(path, prompt_key=prompt_key or None, answer_key=answer_key or None, limit=limit)
