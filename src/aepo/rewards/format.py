"""The format gate: whether a response follows the tag protocol (docs/algorithms.md section 7).

A response is a list of parts, ("model", text) written by the policy and ("tool", text)
inserted by the environment. `trajectory_parts` takes them from a rollout's segments by token
position; `aepo.protocol.split_response` cuts a joined text at its `<result>` blocks. Each tool
part is one opaque result block, and a result tag inside model text is a format failure (the
model forging environment output).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aepo.protocol import (
    ANSWER_TAG,
    RESULT_TAG,
    THINK_TAG,
    Part,
    checked_role,
    split_response,
    tag_pattern,
    tool_tags,
)

if TYPE_CHECKING:
    from aepo.types import Trajectory

__all__ = ["DEFAULT_EOS_TOKENS", "check_format", "check_format_parts", "trajectory_parts"]

DEFAULT_EOS_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)

_RESULT_OPEN, _RESULT_CLOSE = f"<{RESULT_TAG}>", f"</{RESULT_TAG}>"


def trajectory_parts(traj: Trajectory) -> list[Part]:
    """The parts of a rollout, by position: one per segment (`Trajectory.segments`), so tool
    output is known by where the environment inserted it, never by the tags it contains.

    A trailing end-of-sequence string that `traj.text` dropped is dropped here too. A
    trajectory without segments falls back to `split_response(traj.text)`.
    """
    segments = getattr(traj, "segments", None) or []
    if not segments:
        return split_response(str(getattr(traj, "text", "")))
    parts: list[Part] = [(checked_role(seg.role), str(seg.text)) for seg in segments]
    return _drop_final_eos(parts, str(getattr(traj, "text", "")), getattr(traj, "finish_reason", ""))


def _drop_final_eos(parts: list[Part], text: str, finish_reason: str) -> list[Part]:
    """Cut from the last model part what the decoded `text` left off after it (the EOS string)."""
    joined = "".join(t for _, t in parts)
    extra = len(joined) - len(text)
    if finish_reason != "eos" or not text or extra <= 0 or not joined.startswith(text):
        return parts
    role, last = parts[-1]
    if role != "model" or len(last) < extra:
        return parts
    return [*parts[:-1], ("model", last[:-extra])]




def _strip_eos(text: str, eos_tokens: Sequence[str]) -> str:
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
    if _strip_eos(tail, eos_tokens):
        return False, f"text after </{ANSWER_TAG}>"
    return True, "ok"


def _last_open(text: str, name: str, before: int) -> int:
    return text.rfind(f"<{name}>", 0, before) + len(name) + 2
