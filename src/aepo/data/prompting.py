"""Turning a question into the token ids a rollout starts from.

The built-in tiny model sees a plain `question: ...` line. A real instruction-tuned model
(`model.chat_template=true`) gets the tokenizer's chat template with a system prompt that
describes the tools and the tag protocol of docs/algorithms.md section 2.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aepo.tools import tool_names, tool_usage


def system_prompt(tools: Sequence[str], max_tool_calls: int = 6) -> str:
    """The system prompt for a chat model: the tag protocol, and one clause per tool in `tools`
    (each registered tool's `usage`, `aepo.tools.registry`)."""
    clauses = tool_usage(list(tools))
    tool_text = ("; ".join(clauses) + ". Each tool call is answered inside <result> </result>. Call tools "
                 f"as often as you need (at most {max_tool_calls} times), then give") if clauses else "Give"
    return ("You answer questions by reasoning step by step" + (" and calling tools" if clauses else "")
            + ". Think inside <think> </think>. " + tool_text[0].upper() + tool_text[1:]
            + " the final answer inside <answer> </answer>; for math put it in \\boxed{}.")


def prompt_text(question: str) -> str:
    """The plain prompt the built-in model is trained on."""
    return f"question: {question.strip()}\n"


def chat_messages(question: str, *, tools: Sequence[str] | None = None, max_tool_calls: int = 6) -> list[dict]:
    """The chat messages of a chat model's prompt: the system prompt teaching `tools` (default:
    every registered tool) and the question. `aepo data to-verl` writes exactly these."""
    return [
        {"role": "system", "content": system_prompt(tool_names() if tools is None else tools, max_tool_calls)},
        {"role": "user", "content": question.strip()},
    ]


def run_prompt(question: str, tokenizer: Any, cfg: Any) -> list[int]:
    """The prompt ids of `question` under run config `cfg` (its `model.chat_template`,
    `tools.enabled` and `rollout.max_tool_calls`): the one builder sft, train, eval and rollout
    use, so a model is prompted as it was trained."""
    return encode_prompt(question, tokenizer, chat_template=cfg.model.chat_template,
                         max_tool_calls=cfg.rollout.max_tool_calls, tools=cfg.tools.enabled)


def encode_prompt(
    question: str, tokenizer: Any, *, chat_template: bool = False, max_tool_calls: int = 6,
    tools: Sequence[str] | None = None,
) -> list[int]:
    """Token ids of the prompt for `question`; with `chat_template`, `chat_messages` through the
    tokenizer's template (the system prompt teaches `tools`, default every registered tool)."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "model.chat_template=true but the tokenizer has no chat template; "
                "set model.chat_template=false for base models"
            )
        messages = chat_messages(question, tools=tools, max_tool_calls=max_tool_calls)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(prompt_text(question), add_special_tokens=False))
