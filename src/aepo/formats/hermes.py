"""The `hermes` format: tool calls in the model's own chat format (Qwen2.5/Qwen3, Hermes, and the
many templates that copied them; docs/algorithms.md section 2.1).

- **Tools** are declared as OpenAI-style JSON schemas built from the tool registry (one string
  argument each, `ToolSpec.argument`) and passed to the chat template's `tools=`. A template that
  ignores `tools` (renders the same text with and without) gets them in the system message
  instead, in the Hermes wording.
- **A call** is `<tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>`;
  generation stops at `</tool_call>`. Invalid JSON, an unknown tool or a missing argument is
  answered with an error result (and fails the format gate), never a crash.
- **A result** is a `tool` message: its ids are the template's rendering of that message after
  the assistant's call (the text between the call's end and the next assistant turn, measured
  once per tokenizer on a probe conversation), with the tool output in it escaped. So the
  sampled ids are never re-tokenised, whatever the template does to history.
- **The answer** is the assistant's last message (after its last tool result), ended by the
  end-of-turn token: an `<answer>` block or `\\boxed{}` in it if there is one (the benchmark's
  extraction), else the message itself without its `<think>` block.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

from aepo import protocol
from aepo.formats import ToolFormat, register_format
from aepo.formats.tags import strip_eos
from aepo.protocol import MALFORMED_CALL, Action, Part, checked_role
from aepo.tools import get_tool_spec

__all__ = ["CALL_CLOSE", "CALL_OPEN", "HermesFormat", "system_text", "tool_schemas"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
MARKERS = (CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE)
_PROBE_CALL = '<tool_call>\n{"name": "probe", "arguments": {}}\n</tool_call>'
_PROBE_RESULT = "AEPO_PROBE_RESULT_7f3a"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)


def tool_schemas(tools: Sequence[str]) -> list[dict[str, Any]]:
    """OpenAI-style function schemas of the registered `tools` (one required string argument)."""
    out = []
    for name in tools:
        spec = get_tool_spec(name)
        out.append({"type": "function", "function": {
            "name": name, "description": spec.description or spec.usage,
            "parameters": {"type": "object", "properties": {spec.argument: {"type": "string"}},
                           "required": [spec.argument]}}})
    return out


def system_text(tools: Sequence[str], max_tool_calls: int, *, with_schemas: bool) -> str:
    """The system message: the task, and the schemas when the template does not render `tools`."""
    text = ("You answer questions by reasoning step by step and calling tools. Think inside <think> </think>. "
            f"Call tools as often as you need (at most {max_tool_calls} times), then reply with the final answer "
            "alone as your last message; for math put it in \\boxed{}.")
    if with_schemas and tools:
        listing = "\n".join(json.dumps(s) for s in tool_schemas(tools))
        text += ("\n\nYou may call one function at a time. Function signatures are inside <tools></tools>:\n"
                 f"<tools>\n{listing}\n</tools>\nFor each call, return a JSON object with the function name and "
                 "arguments inside <tool_call></tool_call>:\n"
                 '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    return text


def _render(tokenizer: Any, messages: list[dict], *, tools: list[dict] | None = None, generation: bool) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": generation}
    if tools is not None:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(messages, **kwargs)


def _check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("rollout.tool_format=hermes renders prompts and tool results with the tokenizer's chat "
                         "template, and this tokenizer has none; use rollout.tool_format=tags")


@functools.lru_cache(maxsize=16)
def _uses_tools(tokenizer: Any) -> bool:
    msgs = [{"role": "user", "content": "q"}]
    return _render(tokenizer, msgs, tools=_probe_schemas(), generation=True) != _render(
        tokenizer, msgs, generation=True)


@functools.lru_cache(maxsize=1)
def _probe_schemas() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "probe", "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}]


def _probe_messages(result: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE_CALL}]
    if result is not None:
        msgs.append({"role": "tool", "content": result})
    return msgs


@functools.lru_cache(maxsize=16)
def _markers(tokenizer: Any) -> tuple[str, ...]:
    """What tool output must not contain unescaped: the format's markers and the tokenizer's
    special and added tokens (`<|im_end|>`, ...), which would open or close a turn."""
    specials = [t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t.startswith("<")]
    added = [t for t in (getattr(tokenizer, "get_added_vocab", dict)() or {}) if t.startswith("<")]
    return (*MARKERS, *specials, *added)


@functools.lru_cache(maxsize=16)
def _wrapper(tokenizer: Any) -> tuple[str, str]:
    """(before, after) the tool output in what the template appends after a call: from the end of
    the assistant's call text to the next assistant turn's generation prompt."""
    full = _render(tokenizer, _probe_messages(_PROBE_RESULT), generation=True)
    call_end = full.find(_PROBE_CALL)
    body = full.find(_PROBE_RESULT)
    if call_end < 0 or body < 0 or body < call_end:
        raise ValueError("rollout.tool_format=hermes: this chat template does not render an assistant message "
                         "followed by a tool message as text (its tool message was not found); use "
                         "rollout.tool_format=tags")
    call_end += len(_PROBE_CALL)
    return full[call_end:body], full[body + len(_PROBE_RESULT):]


class HermesFormat(ToolFormat):
    name = "hermes"

    def prompt_ids(self, question: str, tokenizer: Any, *, tools: Sequence[str], max_tool_calls: int,
                   chat_template: bool) -> list[int]:
        _check_template(tokenizer)
        native = _uses_tools(tokenizer)
        messages = [{"role": "system", "content": system_text(tools, max_tool_calls, with_schemas=not native)},
                    {"role": "user", "content": question.strip()}]
        text = _render(tokenizer, messages, tools=tool_schemas(tools) if native else None, generation=True)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def stop_strings(self) -> tuple[str, ...]:
        return (CALL_CLOSE,)

    def parse_action(self, segment_text: str, finish: str) -> Action:
        text = segment_text.rstrip()
        if text.endswith(CALL_CLOSE):
            body = text[: -len(CALL_CLOSE)]
            start = body.rfind(CALL_OPEN)
            if start < 0:
                return Action("malformed", "tool_call", error=f"{MALFORMED_CALL}: {CALL_CLOSE} without {CALL_OPEN}.")
            return _parse_call(body[start + len(CALL_OPEN):])
        if finish == "eos":
            return Action("answer", protocol.ANSWER_TAG, text)
        return Action("none")

    def wrapper(self, tokenizer: Any) -> tuple[str, str]:
        _check_template(tokenizer)
        return _wrapper(tokenizer)

    def escape(self, tokenizer: Any, text: str) -> str:
        return protocol.escape_strings(protocol.escape_protocol_tags(text), _markers(tokenizer))

    def demo_segments(self, segments: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for role, text in segments:
            if role != "model":
                out.append((role, text))
                continue
            calls = protocol.tool_calls_in(text)
            answer = protocol.answer_in(text)
            think = " ".join(m.group(0) for m in _THINK_RE.finditer(text))
            if calls:
                name, arg = calls[-1]
                payload = json.dumps({"name": name, "arguments": {get_tool_spec(name).argument: arg}})
                out.append(("model", f"{think}\n{CALL_OPEN}\n{payload}\n{CALL_CLOSE}".lstrip()))
            elif answer is not None:
                out.append(("model", f"{think}\n{answer}".lstrip()))
            else:
                out.append(("model", text))
        return out

    def demo_ends_with_eos(self) -> bool:
        return True

    def check_format_parts(self, parts: Sequence[Part]) -> tuple[bool, str]:
        parts = [(checked_role(r), t) for r, t in parts]
        if not parts or parts[-1][0] != "model":
            return False, "no final message"
        for k, (role, text) in enumerate(parts):
            if role == "tool":
                if k == 0 or parts[k - 1][0] != "model" or not parts[k - 1][1].rstrip().endswith(CALL_CLOSE):
                    return False, "a tool result not preceded by a tool call"
                continue
            for marker in (RESPONSE_OPEN, RESPONSE_CLOSE):
                if marker in text:
                    return False, f"{marker} written by the model"
            last = k == len(parts) - 1
            calls = _CALL_RE.findall(text)
            if last:
                if CALL_OPEN in text or CALL_CLOSE in text:
                    return False, "the last message is a tool call without a result"
            else:
                if len(calls) != 1 or not text.rstrip().endswith(CALL_CLOSE):
                    return False, "a message before a tool result must end with one tool call"
                if _parse_call(calls[0]).kind != "tool":
                    return False, "invalid tool call"
        found = self.answer_span(parts[-1][1])
        if found is None or not found[1].strip():
            return False, "empty final message"
        return True, "ok"

    def answer_span(self, own_text: str) -> tuple[int, str] | None:
        end = own_text.rfind(CALL_CLOSE)
        start = 0 if end < 0 else end + len(CALL_CLOSE)
        final = own_text[start:]
        found = protocol.answer_span(final)
        if found is not None:
            return start + found[0], found[1]
        body = _THINK_RE.sub(lambda m: " " * len(m.group(0)), final)
        stripped = strip_eos(body)
        if not stripped.strip():
            return None
        lead = len(stripped) - len(stripped.lstrip())
        return start + lead, stripped.strip()

    def tool_calls_in(self, own_text: str) -> list[tuple[str, str]]:
        out = []
        for payload in _CALL_RE.findall(own_text):
            action = _parse_call(payload)
            if action.kind == "tool":
                out.append((action.tag or "", action.argument))
        return out

    def append_only(self, tokenizer: Any) -> bool:
        _check_template(tokenizer)
        turns = [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": f"<think>p</think>\n{_PROBE_CALL}"},
                 {"role": "tool", "content": _PROBE_RESULT},
                 {"role": "assistant", "content": "<think>p</think>\na"}]
        renders = [_render(tokenizer, turns[:k], generation=False) for k in range(2, len(turns) + 1)]
        return all(b.startswith(a) for a, b in zip(renders, renders[1:]))


def _parse_call(payload: str) -> Action:
    """A `<tool_call>` body -> Action("tool", name, argument) or Action("malformed", error=...)."""
    usage = f'write {CALL_OPEN}{{"name": <tool>, "arguments": {{...}}}}{CALL_CLOSE}'
    try:
        obj = json.loads(payload.strip())
    except json.JSONDecodeError as e:
        return Action("malformed", "tool_call", error=f"{MALFORMED_CALL}: not valid JSON ({e.msg}); {usage}.")
    if not isinstance(obj, dict):
        return Action("malformed", "tool_call", error=f"{MALFORMED_CALL}: not a JSON object; {usage}.")
    name, args = obj.get("name"), obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = None
    from aepo.tools import tool_names

    if not isinstance(name, str) or name not in tool_names():
        return Action("malformed", "tool_call",
                      # not the registry's names: a run declares only its enabled tools, and a
                      # registered but disabled name parses, to be refused by the runner with the run's list
                      error=f"{MALFORMED_CALL}: unknown tool {name!r}; call one of the functions declared "
                            f"in the system message.")
    if not isinstance(args, dict):
        return Action("malformed", name, error=f"{MALFORMED_CALL}: 'arguments' must be a JSON object; {usage}.")
    key = get_tool_spec(name).argument
    value = args.get(key)
    if value is None and len(args) == 1:
        value = next(iter(args.values()))
    if not isinstance(value, (str, int, float)) or not str(value).strip():
        return Action("malformed", name, error=f"{MALFORMED_CALL}: {name} needs a non-empty {key!r} argument.")
    return Action("tool", name, str(value).strip())


register_format(HermesFormat())
