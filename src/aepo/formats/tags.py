"""The `tags` format, the paper's protocol (docs/algorithms.md section 2; `aepo.protocol`):
`<name> argument </name>` calls, `<result>...</result>` results, `<answer>...</answer>`; its
prompts and its format gate (docs/algorithms.md section 7)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aepo import protocol
from aepo.formats import ToolFormat, register_format
from aepo.protocol import (
    ANSWER_TAG,
    RESULT_TAG,
    THINK_TAG,
    Action,
    Part,
    checked_role,
    split_response,
    tag_pattern,
    tool_tags,
)
from aepo.tools import tool_names, tool_usage

__all__ = ["DEFAULT_EOS_TOKENS", "TagsFormat", "chat_messages", "check_format", "check_format_parts", "prompt_text",
           "strip_eos", "system_prompt"]

_RESULT_OPEN, _RESULT_CLOSE = f"<{RESULT_TAG}>", f"</{RESULT_TAG}>"


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



DEFAULT_EOS_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)



def strip_eos(text: str, eos_tokens: Sequence[str] = DEFAULT_EOS_TOKENS) -> str:
    """`text` without trailing whitespace and end-of-sequence strings (any number, any order)."""
    s = text.rstrip()
    changed = True
    while changed:
        changed = False
        for tok in eos_tokens:
            if tok and s.endswith(tok):
                s = s[: -len(tok)].rstrip()
                changed = True
    return s


def check_format(text: str, *, eos_tokens: Sequence[str] = DEFAULT_EOS_TOKENS) -> tuple[bool, str]:
    """`check_format_parts` of a joined response cut by `split_response`."""
    return check_format_parts(split_response(text), eos_tokens=eos_tokens)


def check_format_parts(
    parts: Sequence[Part], *, eos_tokens: Sequence[str] = DEFAULT_EOS_TOKENS
) -> tuple[bool, str]:
    """Whether a response follows the tag protocol; (False, reason) names the first problem.

    Rules: in model text, tags among think/search/python/calc/answer open and close in order;
    tool calls may sit inside <think> but nothing else nests; a result tag in model text is a
    failure (only the environment writes results). Every tool call is followed by a tool part,
    one opaque result block that must end with </result>. There is a non-empty <answer>; after
    </answer> only whitespace and end-of-sequence tokens.
    """
    tools = set(tool_tags())
    stack: list[str] = []
    awaiting_result: str | None = None
    answer: tuple[int, int, int] | None = None  # (part index, content start, content end)
    for k, (role, text) in enumerate(parts):
        if checked_role(role) == "tool":
            if answer is not None:
                return False, f"text after </{ANSWER_TAG}> ({_RESULT_OPEN})"
            if awaiting_result is None:
                return False, f"{_RESULT_OPEN} not preceded by a tool call"
            if not text.rstrip().endswith(_RESULT_CLOSE):
                return False, f"unclosed {_RESULT_OPEN}"
            awaiting_result = None
            continue
        for m in tag_pattern().finditer(text):
            closing, name, tag = m.group(1) == "/", m.group(2), m.group(0)
            if answer is not None:
                return False, f"text after </{ANSWER_TAG}> ({tag})"
            if name == RESULT_TAG:
                return False, f"{tag} written by the model"
            if awaiting_result is not None:
                return False, f"<{awaiting_result}> call without a following {_RESULT_OPEN}"
            if not closing:
                if stack and not (stack[-1] == THINK_TAG and name in tools):
                    return False, f"<{name}> inside <{stack[-1]}>"
                stack.append(name)
                continue
            if not stack:
                return False, f"</{name}> without <{name}>"
            if stack[-1] != name:
                return False, f"</{name}> closes <{stack[-1]}>"
            stack.pop()
            if name in tools:
                awaiting_result = name
            elif name == ANSWER_TAG:
                answer = (k, _last_open(text, ANSWER_TAG, m.start()), m.start())
    if stack:
        return False, f"unclosed <{stack[-1]}>"
    if awaiting_result is not None:
        return False, f"<{awaiting_result}> call without a following {_RESULT_OPEN}"
    if answer is None:
        return False, f"no <{ANSWER_TAG}>"
    k, start, end = answer
    if not parts[k][1][start:end].strip():
        return False, f"empty <{ANSWER_TAG}>"
    tail = parts[k][1][end + len(f"</{ANSWER_TAG}>") :] + "".join(t for _, t in parts[k + 1 :])
    if strip_eos(tail, eos_tokens):
        return False, f"text after </{ANSWER_TAG}>"
    return True, "ok"


def _last_open(text: str, name: str, before: int) -> int:
    return text.rfind(f"<{name}>", 0, before) + len(name) + 2




class TagsFormat(ToolFormat):
    name = "tags"

    def prompt_ids(self, question: str, tokenizer: Any, *, tools: Sequence[str], max_tool_calls: int,
                   chat_template: bool) -> list[int]:
        if not chat_template:
            return list(tokenizer.encode(prompt_text(question), add_special_tokens=False))
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.chat_template=true but the tokenizer has no chat template; "
                             "set model.chat_template=false for base models")
        ids = tokenizer.apply_chat_template(chat_messages(question, tools=tools, max_tool_calls=max_tool_calls),
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def stop_strings(self) -> tuple[str, ...]:
        return protocol.stop_strings()

    def parse_action(self, segment_text: str, finish: str) -> Action:
        return protocol.parse_action(segment_text) if finish != "eos" else Action("none")

    def wrapper(self, tokenizer: Any) -> tuple[str, str]:
        return protocol.RESULT_OPEN, protocol.RESULT_CLOSE

    def escape(self, tokenizer: Any, text: str) -> str:
        return protocol.escape_protocol_tags(text)

    def demo_segments(self, segments: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(role, text) for role, text in segments]

    def check_format_parts(self, parts: Sequence[Part]) -> tuple[bool, str]:
        return check_format_parts(parts)

    def answer_span(self, own_text: str) -> tuple[int, str] | None:
        return protocol.answer_span(own_text)

    def tool_calls_in(self, own_text: str) -> list[tuple[str, str]]:
        return protocol.tool_calls_in(own_text)


register_format(TagsFormat())
