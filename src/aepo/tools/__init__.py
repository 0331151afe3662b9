"""The agent's tools (search, Python sandbox, calculator), their registry, and the runner.

A tool is any callable `(argument: str) -> str` with a `name`, registered with
`register_tool(ToolSpec(...))` (`aepo.tools.registry`); `ToolRunner` runs batches of calls
concurrently and turns every failure into result text. Importing this package registers the
built-in tools, in the order search, python, calc.
"""

from __future__ import annotations

from aepo.tools.config import ToolsConfig
from aepo.tools.registry import (
    ToolSpec,
    build_tool_runner,
    get_tool_spec,
    register_tool,
    tool_names,
    tool_usage,
)
from aepo.tools.runner import Tool, ToolRunner, truncate_result

from aepo.tools.search import (  # isort: skip  (registration order: search, python, calc)
    BM25Backend,
    CacheBackend,
    HttpBackend,
    SearchBackend,
    SearchBackendError,
    SearchTool,
    build_search_tool,
)
from aepo.tools.sandbox import Isolation, PythonSandbox, SandboxError, SandboxResult, probe_isolation  # isort: skip
from aepo.tools.calc import CalcError, Calculator  # isort: skip

__all__ = [
    "BM25Backend",
    "CacheBackend",
    "CalcError",
    "Calculator",
    "HttpBackend",
    "Isolation",
    "PythonSandbox",
    "SandboxError",
    "SandboxResult",
    "SearchBackend",
    "SearchBackendError",
    "SearchTool",
    "Tool",
    "ToolRunner",
    "ToolSpec",
    "ToolsConfig",
    "build_search_tool",
    "build_tool_runner",
    "get_tool_spec",
    "probe_isolation",
    "register_tool",
    "tool_names",
    "tool_usage",
    "truncate_result",
]
