"""Tool-call formats (`rollout.tool_format`): how a model asks for a tool, how the result comes
back, and where its final answer is (docs/algorithms.md section 2).

- `tags` (the default, the paper's): `<search> q </search>`, results in `<result>...</result>`,
  the answer in `<answer>...</answer>` (`aepo.protocol`).
- `hermes`: the format of Qwen's and many other chat templates. Tools are declared as JSON
  schemas through the template's `tools=`, a call is `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`, a result is a `tool` message rendered by the template, and the answer is
  the assistant's last message.

Every format works on token ids, exactly: the ids the sampler produced are the ids trained on,
and a tool result is appended as the ids of the template's rendering of that one new message
(`ToolFormat.result_ids`), never by re-tokenising the conversation. A format is one file with one
`register_format(...)` call, like a tool (`aepo.tools.registry`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aepo.errors import ConfigError
from aepo.protocol import Action, Part
from aepo.registry import Registry

__all__ = ["ToolFormat", "format_names", "get_format", "register_format"]


class ToolFormat:
    """One tool-call format. Subclasses set `name` and define the methods that raise here."""

    name: str = ""

    # ------------------------------------------------------------------ prompting

    def prompt_ids(self, question: str, tokenizer: Any, *, tools: Sequence[str], max_tool_calls: int,
                   chat_template: bool) -> list[int]:
        """The prompt's token ids for `question`, teaching `tools`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ generation

    def stop_strings(self) -> tuple[str, ...]:
        """Where a model segment ends for the environment to act (a tool call's closing marker)."""
        raise NotImplementedError

    def parse_action(self, segment_text: str, finish: str) -> Action:
        """What the segment the model just wrote asks for; `finish` is how generation ended
        ("stop" at a stop string, "eos", "length")."""
        raise NotImplementedError

    # ------------------------------------------------------------------ tool results

    def wrapper(self, tokenizer: Any) -> tuple[str, str]:
        """(text before, text after) a tool result's body, as the environment appends it."""
        raise NotImplementedError

    def escape(self, tokenizer: Any, text: str) -> str:
        """Tool output made safe to append: no marker in it can end its block, open a turn or read
        as the model's own call or answer."""
        raise NotImplementedError

    def result_text(self, tokenizer: Any, text: str) -> str:
        """The whole text appended after a call whose output is `text` (uncut)."""
        before, after = self.wrapper(tokenizer)
        return before + self.escape(tokenizer, text) + after

    def result_ids(self, tokenizer: Any, text: str, remaining: int, max_result_tokens: int) -> tuple[list[int], str] | None:
        """(token ids to append, the body as the model sees it) for tool output `text`, fitting in
        `remaining` tokens; None when not even the wrapper fits. The wrapper is kept whole and
        only the (escaped) body is cut, to `max_result_tokens` or what the wrapper leaves; an
        uncut result is encoded in one piece, as SFT demonstrations encode `result_text`."""
        before, after = self.wrapper(tokenizer)
        head = _encode(tokenizer, before)
        tail = _encode(tokenizer, after)
        room = remaining - len(head) - len(tail)
        if room < 0:
            return None
        body = self.escape(tokenizer, text)
        body_ids = _encode(tokenizer, body)
        limit = min(max_result_tokens, room)
        if len(body_ids) <= limit:
            whole = _encode(tokenizer, before + body + after)
            if len(whole) <= remaining:
                return whole, body
        body_ids = body_ids[:limit]
        return head + body_ids + tail, tokenizer.decode(body_ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ demonstrations

    def demo_segments(self, segments: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Expert demonstrations (written in the tags format) in this format's model text; tool
        segments stay raw tool output (wrapped by `result_text` when encoded)."""
        raise NotImplementedError

    def demo_ends_with_eos(self) -> bool:
        """Whether a demonstration's last model segment ends with the end-of-turn token."""
        return False

    # ------------------------------------------------------------------ reading a response

    def check_format_parts(self, parts: Sequence[Part]) -> tuple[bool, str]:
        """Whether a response's ("model" | "tool", text) parts follow the format; (False, reason)."""
        raise NotImplementedError

    def answer_span(self, own_text: str) -> tuple[int, str] | None:
        """(offset in `own_text`, answer) of the final answer in the model's own text, or None."""
        raise NotImplementedError

    def tool_calls_in(self, own_text: str) -> list[tuple[str, str]]:
        """(tool name, argument) of each call in the model's own text, in order."""
        raise NotImplementedError

    def append_only(self, tokenizer: Any) -> bool:
        """Whether rendering a conversation is a prefix of rendering it with one more turn (a
        template that rewrites history is not); results are appended as deltas either way."""
        return True


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


_FORMATS: Registry[ToolFormat] = Registry(
    "tool format", error=ConfigError,
    unknown="rollout.tool_format={name!r} is not a registered tool format; registered: {names}")


def register_format(fmt: ToolFormat) -> ToolFormat:
    """Add `fmt` under `fmt.name` (idempotent for the same class); returns it."""
    return _FORMATS.register(fmt.name, fmt, same=lambda old, new: type(old) is type(new))


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS.names())


def get_format(name: str) -> ToolFormat:
    """The registered format `name`; ConfigError naming the registered ones otherwise."""
    return _FORMATS.get(name)


from aepo.formats import hermes, tags  # noqa: F401  (registration)
