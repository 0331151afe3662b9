"""The tool registry: the one list of tool names, with how each is described and built.

A tool is a module that defines a callable `(argument: str) -> str` with a `name`, and one
`register_tool(ToolSpec(...))` call. Everything else derives from the registry: the protocol's
tags (`<name>argument</name>`, `aepo.protocol`), the tokenizer's tag tokens, the system prompt's
tool list, `tools.enabled` validation and the run's `ToolRunner` (`build_tool_runner`).

    register_tool(ToolSpec("echo", usage="to repeat a text write <echo> text </echo>",
                           build=lambda cfg, **ctx: Echo()))

The built-in tools register themselves when `aepo.tools` is imported, in the order search,
python, calc (the order of their tags in the built-in tokenizer).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aepo.errors import ConfigError
from aepo.registry import Registry

__all__ = ["ToolSpec", "build_tool_runner", "get_tool_spec", "register_tool", "tool_names", "tool_usage"]

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED = ("think", "answer", "result")


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its tag name, the clause of the system prompt that teaches it, and a builder
    `build(tools_cfg, **context) -> Tool` (`context`: what a run has beyond the config, such as
    `corpus_docs` for search). A builder raises ConfigError when the config cannot make the tool."""

    name: str
    usage: str
    build: Callable[..., Any]
    # for formats that declare tools as JSON schemas (rollout.tool_format=hermes): the name and
    # description of the one string argument, and what the tool does
    argument: str = "input"
    description: str = ""


_TOOLS: Registry[ToolSpec] = Registry("tool", error=ConfigError, unknown="unknown tool {name!r}; registered: {names}")


def register_tool(spec: ToolSpec) -> ToolSpec:
    """Add `spec` to the registry (idempotent for the same spec); returns it."""
    if not _NAME_RE.fullmatch(spec.name) or spec.name in _RESERVED:
        raise ValueError(f"tool name {spec.name!r} must be lower-case letters, digits and _ "
                         f"(starting with a letter) and not one of {_RESERVED}")
    return _TOOLS.register(spec.name, spec, same=lambda old, new: old == new)


def tool_names() -> tuple[str, ...]:
    """Registered tool names, in registration order."""
    return tuple(_TOOLS.names())


def get_tool_spec(name: str) -> ToolSpec:
    """The registered tool `name`; ConfigError naming the registered ones otherwise."""
    return _TOOLS.get(name)


def tool_usage(names: tuple[str, ...] | list[str]) -> list[str]:
    """The system-prompt clauses of `names`, in the given order."""
    return [get_tool_spec(n).usage for n in names]


def build_tool_runner(cfg: Any, **context: Any) -> Any:
    """A `ToolRunner` with the tools `cfg.enabled` (a ToolsConfig), each made by its builder;
    ConfigError names the tool whose builder failed and why, before any work."""
    from aepo.tools.runner import ToolRunner

    bad = [t for t in cfg.enabled if t not in _TOOLS]
    if bad:
        raise ConfigError(f"tools.enabled: unknown tool(s) {bad}; registered: {', '.join(_TOOLS)}")
    return ToolRunner([get_tool_spec(name).build(cfg, **context) for name in cfg.enabled], timeout=cfg.timeout,
                      max_workers=cfg.max_workers)
