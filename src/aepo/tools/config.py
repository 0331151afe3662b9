"""The tools' settings (`tools.*` in a run config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ToolsConfig"]


@dataclass
class ToolsConfig:
    enabled: list[str] = field(default_factory=lambda: ["search", "calc", "python"])  # registered tools
    search_cache: str = ""  # search: a JSON file of recorded query -> results (tried first)
    search_corpus: str = ""  # search: a JSONL corpus searched with BM25 (the demo world's corpus.jsonl)
    search_url: str = ""  # search: a Search-R1 retriever server's URL, tried last
    search_topk: int = 3  # search: documents per result
    search_max_chars: int = 600  # search: characters kept of each document
    timeout: float = 10.0  # per tool call
    # tool calls in flight at once per process (one runner serves every tree of a worker), so
    # a policy that calls the Python sandbox in every row cannot start hundreds of them at once
    max_workers: int = 8
    python_timeout: float = 10.0  # the sandbox's own wall-clock limit (at most `timeout`)
    python_memory_mb: int = 512  # the sandbox's address-space limit
    # "strict": namespaces, a minimal root and a system-call filter, or refuse to run;
    # "limits-only": resource limits only, the program can read host files (docs/security.md)
    python_isolation: Literal["strict", "limits-only"] = "strict"
    # settings of tools that have no fields of their own: {tool name: {option: value}}, handed
    # to the tool's builder (`aepo.tools.registry`)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
