"""Turning a question into the token ids a rollout starts from.

The built-in tiny model sees a plain `question: ...` line. A real instruction-tuned model
(`model.chat_template=true`) gets the tokenizer's chat template with a system prompt that
describes the tools and the tag protocol of docs/algorithms.md section 2.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aepo.formats import get_format
from aepo.formats.tags import chat_messages, prompt_text, system_prompt

__all__ = ["chat_messages", "encode_prompt", "prompt_text", "run_prompt", "system_prompt"]


def run_prompt(question: str, tokenizer: Any, cfg: Any) -> list[int]:
    """The prompt ids of `question` under run config `cfg` (its `model.chat_template`,
    `tools.enabled` and `rollout.max_tool_calls`): the one builder sft, train, eval and rollout
    use, so a model is prompted as it was trained."""
    return encode_prompt(question, tokenizer, chat_template=cfg.model.chat_template,
                         max_tool_calls=cfg.rollout.max_tool_calls, tools=cfg.tools.enabled,
                         tool_format=cfg.rollout.tool_format)


def encode_prompt(
    question: str, tokenizer: Any, *, chat_template: bool = False, max_tool_calls: int = 6,
    tools: Sequence[str] | None = None, tool_format: str = "tags",
) -> list[int]:
    """Token ids of the prompt for `question` in `tool_format` (`aepo.formats`); with
    `chat_template`, chat messages through the tokenizer's template, teaching `tools` (default
    every registered tool)."""
    from aepo.tools import tool_names

    return get_format(tool_format).prompt_ids(question, tokenizer, tools=tool_names() if tools is None else tools,
                                              max_tool_calls=max_tool_calls, chat_template=chat_template)
