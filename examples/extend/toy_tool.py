"""A new tool in one file: `<reverse>text</reverse>` answers with the text reversed.

    aepo train src/aepo/configs/demo.yaml plugins=[examples/extend/toy_tool.py] \
        tools.enabled=[search,calc,python,reverse] tools.options={reverse: {upper: true}}

Registering the tool is all it takes: the protocol's tags and stop strings, the built-in
tokenizer's tag tokens (for a tokenizer built after the import), the system prompt, config
checks and the tool runner all read the registry.
"""
from typing import Any

from aepo.tools import ToolSpec, register_tool


class Reverse:
    name = "reverse"

    def __init__(self, upper: bool = False) -> None:
        self.upper = upper

    def __call__(self, argument: str) -> str:
        out = argument[::-1]
        return out.upper() if self.upper else out


def build(cfg: Any, **_: Any) -> Reverse:
    return Reverse(**cfg.options.get("reverse", {}))


register_tool(ToolSpec("reverse", usage="to reverse a text write <reverse> text </reverse>", build=build))
