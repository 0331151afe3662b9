"""The multi-turn tool-use text protocol (docs/algorithms.md section 2): the one definition
of its tags, how a model segment is parsed, and where a response's answer is.

The model writes reasoning, then either a tool call `<name>argument</name>` for a registered
tool (`aepo.tools.registry`; built in: `<search>`, `<python>`, `<calc>`; generation stops at
the closing tag) or a final `<answer>...</answer>` (ends the rollout). The environment answers a
tool call with `format_result(text)`. The rollout agent, the tokenizer, the prompts, the SFT
data builder and the rewards all derive their tags from here.

Tool output is untrusted text: a program can print `</result><answer>...</answer>`. Before it
reaches the model, every protocol tag in it is escaped (`escape_protocol_tags`), so a result
block can neither close itself early nor carry tags that read as the model's own. Look-alikes
count as tags: a span whose Unicode NFKC form is a tag (fullwidth `＜/result＞`, `＜ａｎｓｗｅｒ＞`)
becomes that tag under an NFKC tokenizer, so it is escaped too, and the rewards read it as the
tag (`canonical_tags`).
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from aepo.tools import tool_names

ANSWER_TAG = "answer"
RESULT_TAG = "result"
THINK_TAG = "think"
RESULT_OPEN = f"<{RESULT_TAG}>\n"  # what the environment writes before a tool result
RESULT_CLOSE = f"\n</{RESULT_TAG}>"  # ... and after it

ActionKind = Literal["tool", "answer", "none", "malformed"]
# how the result text of a call the environment could not act on begins, in every tool format
# (aepo.formats): the trainer tells protocol errors from tool errors by it
MALFORMED_CALL = "Error: malformed call"
Part = tuple[Literal["model", "tool"], str]  # who wrote a piece of a response, and its text

__all__ = [
    "ANSWER_TAG",
    "MALFORMED_CALL",
    "RESULT_CLOSE",
    "RESULT_OPEN",
    "RESULT_TAG",
    "THINK_TAG",
    "Action",
    "ActionKind",
    "Part",
    "answer_in",
    "answer_span",
    "canonical_tags",
    "checked_role",
    "escape_protocol_tags",
    "escape_strings",
    "extract_answer",
    "extract_boxed",
    "format_result",
    "model_text",
    "parse_action",
    "parse_tool_calls",
    "protocol_tags",
    "split_response",
    "stop_strings",
    "tag_blocks",
    "tag_pattern",
    "tag_tokens",
    "tool_calls_in",
    "tool_tags",
]


def tool_tags() -> tuple[str, ...]:
    """The tool call tags: every registered tool's name, in registration order."""
    return tool_names()


def protocol_tags() -> tuple[str, ...]:
    """Every tag of the protocol: think, the tools, answer, result."""
    return (THINK_TAG, *tool_tags(), ANSWER_TAG, RESULT_TAG)


def tag_tokens() -> list[str]:
    """`<tag>` and `</tag>` of every protocol tag (the built-in tokenizer's single tokens)."""
    return [t for tag in protocol_tags() for t in (f"<{tag}>", f"</{tag}>")]


def stop_strings() -> tuple[str, ...]:
    """Where a model segment ends: the closing tag of a tool call or of the answer."""
    return tuple(f"</{tag}>" for tag in tool_tags()) + (f"</{ANSWER_TAG}>",)


@functools.lru_cache(maxsize=8)
def _tag_re(tags: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"<(/?)(" + "|".join(map(re.escape, tags)) + r")>")


def tag_pattern() -> re.Pattern[str]:
    """A regex of `<tag>` / `</tag>` for every protocol tag; group 1 is "/" on a closing tag,
    group 2 the tag name."""
    return _tag_re(protocol_tags())


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


def _nfkc_matches(text: str, pattern: re.Pattern[str]) -> list[tuple[int, int, re.Match[str]]]:
    """(start, end, match) in `text` of every match of `pattern`, look-alikes included: a span
    whose characters NFKC-normalise one by one to a match (so `＜/result＞` matches `</result>`)."""
    if text.isascii():
        return [(m.start(), m.end(), m) for m in pattern.finditer(text)]
    norm: list[str] = []
    owner: list[int] = []  # owner[j]: the index in `text` of the character normalised into norm[j]
    for i, ch in enumerate(text):
        n = unicodedata.normalize("NFKC", ch) if not ch.isascii() else ch
        norm.append(n)
        owner.extend([i] * len(n))
    joined = "".join(norm)
    return [(owner[m.start()], owner[m.end() - 1] + 1, m) for m in pattern.finditer(joined)]


def _tag_spans(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, "/" or "", name) of every protocol tag in `text`, look-alikes included."""
    return [(a, b, m.group(1), m.group(2)) for a, b, m in _nfkc_matches(text, tag_pattern())]


@functools.lru_cache(maxsize=32)
def _strings_re(strings: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True))))


def escape_strings(text: str, strings: Sequence[str]) -> str:
    """`text` with every occurrence of each of `strings` (markers that start with `<`, such as a
    chat template's `<|im_end|>` or `<tool_response>`), look-alikes included, written with its
    `<` as `&lt;`, so tool output cannot close a block or open a turn of its own."""
    markers = tuple(s for s in strings if s)
    if not markers:
        return text
    out, i = [], 0
    for start, end, m in _nfkc_matches(text, _strings_re(markers)):
        out.append(text[i:start])
        out.append("&lt;" + m.group(0)[1:] if m.group(0).startswith("<") else m.group(0))
        i = end
    out.append(text[i:])
    return "".join(out)


def _replace_tags(text: str, template: str) -> str:
    spans = _tag_spans(text)
    if not spans:
        return text
    out, i = [], 0
    for start, end, slash, name in spans:
        out.append(text[i:start])
        out.append(template.format(slash=slash, name=name))
        i = end
    out.append(text[i:])
    return "".join(out)


def escape_protocol_tags(text: str) -> str:
    """`text` with the `<` of every protocol tag (`<tag>` or `</tag>` for each tag in
    `protocol_tags()`) written as `&lt;`: `</result>` becomes `&lt;/result>`. A look-alike that
    NFKC-normalises to a tag (`＜/result＞`) is written as the escaped ASCII tag. Other text,
    including other angle brackets, is unchanged."""
    return _replace_tags(text, "&lt;{slash}{name}>")


def canonical_tags(text: str) -> str:
    """`text` with every look-alike protocol tag (a span that NFKC-normalises to `<tag>` or
    `</tag>`) written as the ASCII tag, the rest unchanged: what an NFKC tokenizer would make
    of the tags, without normalising the answer itself ("2²" stays "2²", not "22")."""
    return text if text.isascii() else _replace_tags(text, "<{slash}{name}>")


def format_result(text: str) -> str:
    """The text the environment appends after a tool call: `<result>\\n{body}\\n</result>`,
    where body is `text` with its protocol tags escaped (`escape_protocol_tags`), so the only
    result tags in the block are the environment's own."""
    return f"{RESULT_OPEN}{escape_protocol_tags(text)}{RESULT_CLOSE}"


def _closing_tag(text: str) -> str | None:
    for stop in stop_strings():  # "</tag>"
        if text.endswith(stop):
            return stop[2:-1]
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
            error=f"{MALFORMED_CALL}: {closing} without a matching {opening}; "
            f"write {opening}...{closing}.",
        )
    argument = body[start + len(opening):].strip()
    if tag == ANSWER_TAG:
        return Action("answer", tag, argument)
    if not argument:
        return Action(
            "malformed", tag,
            error=f"{MALFORMED_CALL}: empty argument in {opening}{closing}.",
        )
    return Action("tool", tag, argument)


# ----------------------------------------------------------------------------- responses


def split_response(text: str) -> list[Part]:
    """A joined response cut into parts: each `<result>` block up to the first `</result>`
    after it (to the end when unclosed) is a "tool" part, the text between is "model" text.

    Exact only when tool output cannot contain `</result>`, which `format_result` ensures by
    escaping it; rollouts have exact parts in their segments (`aepo.rewards.trajectory_parts`).
    When a tool did not escape, its text after a `</result>` it printed lands in a model part
    together with the environment's own `</result>`: a result tag in model text, which fails
    the format gate and, when it is at or after the answer, zeroes accuracy
    (`aepo.rewards.scoring.score_parts`). Cutting at the first `</result>` keeps that stray tag
    in sight; look-alike tags are read as tags (`canonical_tags`) before the cut.
    """
    text = canonical_tags(text)
    opening, closing = f"<{RESULT_TAG}>", f"</{RESULT_TAG}>"
    parts: list[Part] = []
    i = 0
    while (start := text.find(opening, i)) >= 0:
        end = text.find(closing, start + len(opening))
        stop = len(text) if end < 0 else end + len(closing)
        if start > i:
            parts.append(("model", text[i:start]))
        parts.append(("tool", text[start:stop]))
        i = stop
    if i < len(text):
        parts.append(("model", text[i:]))
    return parts


def checked_role(role: object) -> Literal["model", "tool"]:
    if role not in ("model", "tool"):
        raise ValueError(f"a response part's role must be 'model' or 'tool', got {role!r}")
    return role  # type: ignore[return-value]


def model_text(parts: Sequence[Part]) -> str:
    """The text the model wrote: its parts joined, tool parts left out."""
    return "".join(text for role, text in parts if checked_role(role) == "model")


def balanced_brace(text: str, open_pos: int) -> int | None:
    """Index of the `}` matching the `{` at `open_pos`, or None when unbalanced."""
    depth = 0
    for i in range(open_pos, len(text)):
        ch = text[i]
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i
    return None


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last well-formed `\\boxed{...}` / `\\fbox{...}` / `\\boxed 5`."""
    starts = list(re.finditer(r"\\(?:boxed|fbox)\b", text))
    for m in reversed(starts):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = balanced_brace(text, i)
            if end is not None:
                return m.start(), text[i + 1 : end].strip()
        elif i > m.end():  # "\\boxed 5": the next token
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return m.start(), tok.group(0)
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`), braces balanced;
    an unbalanced one is skipped for an earlier one. None when there is none."""
    found = _last_boxed(text)
    return None if found is None else found[1]


def answer_span(own_text: str) -> tuple[int, str] | None:
    """(where it starts in `own_text`, answer) for `answer_in`: the start of the last complete
    `<answer>` block, or of the `\\boxed{}` used without one; None when there is no answer."""
    blocks = list(re.finditer(rf"<{ANSWER_TAG}>(.*?)</{ANSWER_TAG}>", own_text, re.DOTALL))
    if blocks:
        content = blocks[-1].group(1).strip()
        boxed = extract_boxed(content)
        return blocks[-1].start(), boxed if boxed is not None else content
    return _last_boxed(own_text)


def answer_in(own_text: str) -> str | None:
    """The answer in text the model wrote: the last complete `<answer>...</answer>` block,
    stripped and unwrapped from `\\boxed{}`; without one, the last `\\boxed{}` anywhere (plain
    chain-of-thought output); None when there is neither."""
    found = answer_span(own_text)
    return None if found is None else found[1]


def extract_answer(text: str) -> str | None:
    """The final answer of a joined response (`answer_in` of its model text): tool results are
    skipped, so only the model's own text can hold its answer."""
    return answer_in(model_text(split_response(text)))


def tool_calls_in(own_text: str) -> list[tuple[str, str]]:
    """(tool name, stripped argument) of each tool call in text the model wrote, in order."""
    tools = set(tool_tags())
    return [(name, content.strip()) for name, content in tag_blocks(own_text) if name in tools]


def parse_tool_calls(text: str) -> list[tuple[str, str]]:
    """`tool_calls_in` the model text of a joined response: tags inside results are not calls."""
    return tool_calls_in(model_text(split_response(text)))


def tag_blocks(text: str) -> list[tuple[str, str]]:
    """(tag name, content) of each innermost `<tag>content</tag>` block of model text."""
    out = []
    open_name, open_end = None, 0
    for m in tag_pattern().finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if not closing:
            open_name, open_end = name, m.end()
        elif name == open_name:
            out.append((name, text[open_end : m.start()]))
            open_name = None
    return out
