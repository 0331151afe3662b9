"""The multi-turn tool-use text protocol (ALGORITHMS.md section 2).

The model writes reasoning, then either a tool call `<search>query</search>`,
`<python>code</python>`, `<calc>expression</calc>` (generation stops at the closing tag) or a
final `<answer>...</answer>` (ends the rollout). The environment answers a tool call with
`format_result(text)`. This module is the one place that knows the tags; the rollout agent,
the SFT data builder and the rewards all go through it.

Tool output is untrusted text: a program can print `</result><answer>...</answer>`. Before it
reaches the model, every protocol tag in it is escaped (`escape_protocol_tags`), so a result
block can neither close itself early nor carry tags that read as the model's own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

TOOL_TAGS: tuple[str, ...] = ("search", "python", "calc")
ANSWER_TAG = "answer"
RESULT_TAG = "result"
THINK_TAG = "think"
PROTOCOL_TAGS: tuple[str, ...] = (THINK_TAG, *TOOL_TAGS, ANSWER_TAG, RESULT_TAG)
RESULT_OPEN = f"<{RESULT_TAG}>\n"  # what the environment writes before a tool result
RESULT_CLOSE = f"\n</{RESULT_TAG}>"  # ... and after it
STOP_STRINGS: tuple[str, ...] = tuple(f"</{tag}>" for tag in TOOL_TAGS) + (f"</{ANSWER_TAG}>",)

ActionKind = Literal["tool", "answer", "none", "malformed"]

_PROTOCOL_TAG_RE = re.compile(r"<(/?(?:" + "|".join(map(re.escape, PROTOCOL_TAGS)) + r")>)")

__all__ = [
    "ANSWER_TAG",
    "PROTOCOL_TAGS",
    "RESULT_CLOSE",
    "RESULT_OPEN",
    "RESULT_TAG",
    "STOP_STRINGS",
    "THINK_TAG",
    "TOOL_TAGS",
    "Action",
    "ActionKind",
    "escape_protocol_tags",
    "extract_answer",
    "extract_boxed",
    "format_result",
    "parse_action",
]


@dataclass(frozen=True)
class Action:
    """What a model segment asks for.

    kind: "tool" (call `tag` with `argument`), "answer" (final answer `argument`), "none" (the
    segment ended without a closing tag: EOS or budget) or "malformed" (a closing tag the
    environment cannot act on; `error` is the result text the model is shown instead).
    """

    kind: ActionKind
    tag: str | None = None  # name of the closing tag the segment ended on
    argument: str = ""
    error: str = ""

    @property
    def tool(self) -> str | None:
        """The tool name for a well-formed tool call, else None."""
        return self.tag if self.kind == "tool" else None


def escape_protocol_tags(text: str) -> str:
    """`text` with the `<` of every protocol tag (`<tag>` or `</tag>` for each tag in
    PROTOCOL_TAGS) written as `&lt;`: `</result>` becomes `&lt;/result>`. Other text, including
    other angle brackets, is unchanged."""
    return _PROTOCOL_TAG_RE.sub(r"&lt;\1", text)


def format_result(text: str) -> str:
    """The text the environment appends after a tool call: `<result>\\n{body}\\n</result>`,
    where body is `text` with its protocol tags escaped (`escape_protocol_tags`), so the only
    result tags in the block are the environment's own."""
    return f"{RESULT_OPEN}{escape_protocol_tags(text)}{RESULT_CLOSE}"


def _closing_tag(text: str) -> str | None:
    for tag in (*TOOL_TAGS, ANSWER_TAG):
        if text.endswith(f"</{tag}>"):
            return tag
    return None


def parse_action(segment_text: str) -> Action:
    """Parse the segment the model just wrote (ending where generation stopped).

    The argument is the text between the LAST `<tag>` and the closing `</tag>` the segment ends
    on (trailing whitespace after the closing tag is ignored). A closing tag without a matching
    opening tag, or a tool call with an empty argument, is "malformed"; an empty answer is still
    an answer (the reward judges it).
    """
    text = segment_text.rstrip()
    tag = _closing_tag(text)
    if tag is None:
        return Action("none")
    opening, closing = f"<{tag}>", f"</{tag}>"
    body = text[: -len(closing)]
    start = body.rfind(opening)
    if start < 0:
        return Action(
            "malformed", tag,
            error=f"Error: malformed call: {closing} without a matching {opening}; "
            f"write {opening}...{closing}.",
        )
    argument = body[start + len(opening):].strip()
    if tag == ANSWER_TAG:
        return Action("answer", tag, argument)
    if not argument:
        return Action(
            "malformed", tag,
            error=f"Error: malformed call: empty argument in {opening}{closing}.",
        )
    return Action("tool", tag, argument)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (braces balanced), or None."""
    key = "\\boxed{"
    start = text.rfind(key)
    while start >= 0:
        depth, i = 1, start + len(key)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(key): i - 1].strip()
        start = text.rfind(key, 0, start)  # unbalanced: try an earlier one
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last `<answer>...</answer>` block, stripped.

    When that block holds a `\\boxed{...}`, its content is returned instead (math answers).
    None when the response has no complete answer block.
    """
    closing, opening = f"</{ANSWER_TAG}>", f"<{ANSWER_TAG}>"
    end = text.rfind(closing)
    if end < 0:
        return None
    start = text.rfind(opening, 0, end)
    if start < 0:
        return None
    answer = text[start + len(opening): end].strip()
    boxed = extract_boxed(answer)
    return boxed if boxed is not None else answer
