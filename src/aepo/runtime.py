"""Building a run's parts from config: its tools and its task rows."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from aepo.config import ConfigError, ToolsConfig

TOOL_NAMES = ("search", "calc", "python")


def build_tool_runner(tools: ToolsConfig, *, corpus_docs: list[dict] | None = None) -> Any:
    """A ToolRunner with the enabled tools; search chains cache -> BM25 corpus -> HTTP retriever."""
    from aepo.tools.calc import Calculator
    from aepo.tools.runner import ToolRunner
    from aepo.tools.sandbox import PythonSandbox, SandboxError
    from aepo.tools.search import BM25Backend, CacheBackend, HttpBackend, SearchTool

    bad = [t for t in tools.enabled if t not in TOOL_NAMES]
    if bad:
        raise ConfigError(f"tools.enabled: unknown tool(s) {bad}; valid: {', '.join(TOOL_NAMES)}")
    made: list[Any] = []
    if "search" in tools.enabled:
        backends: list[Any] = []
        if tools.search_cache:
            backends.append(CacheBackend(tools.search_cache))
        if tools.search_corpus:
            backends.append(BM25Backend.from_jsonl(tools.search_corpus))
        elif corpus_docs:
            backends.append(BM25Backend(corpus_docs))
        if tools.search_url:
            backends.append(HttpBackend(tools.search_url))
        if not backends:
            raise ConfigError("tools.enabled has 'search' but no backend is set: give tools.search_cache, "
                              "tools.search_corpus or tools.search_url")
        made.append(SearchTool(backends, topk=tools.search_topk, max_chars=tools.search_max_chars))
    if "calc" in tools.enabled:
        made.append(Calculator())
    if "python" in tools.enabled:
        sandbox = PythonSandbox(timeout=min(tools.timeout, tools.python_timeout),
                                memory_mb=tools.python_memory_mb, mode=tools.python_isolation)
        try:
            sandbox.isolation  # checked before any work: a run never starts with a sandbox that cannot hold
        except SandboxError as e:
            raise ConfigError(f"tools.enabled has 'python' but {e}") from None
        made.append(sandbox)
    return ToolRunner(made, timeout=tools.timeout)


def search_tools_config(cache: str | Path | None = None, corpus: str | Path | None = None,
                        url: str | None = None) -> ToolsConfig:
    """calc and python, plus search when any search backend is given (the CLI's tool options)."""
    enabled = ["calc", "python"] + (["search"] if (cache or corpus or url) else [])
    return ToolsConfig(enabled=enabled, search_cache=str(cache or ""), search_corpus=str(corpus or ""),
                       search_url=url or "")


def load_tasks(path: str | Path, *, prompt_key: str | None = None, answer_key: str | None = None,
               limit: int | None = None) -> list[Any]:
    from aepo.tasks.datasets import load_dataset

    return load_dataset(path, prompt_key=prompt_key or None, answer_key=answer_key or None, limit=limit)
