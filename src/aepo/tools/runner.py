"""Run tool calls concurrently with a per-call timeout, turning every failure into result text.

A tool is any callable `(argument: str) -> str` with a `name` attribute. The rollout hands a
batch of `(tool name, argument)` pairs to `ToolRunner.run` and gets one `ToolCall` per pair,
in the same order. Nothing a tool does (raise, hang, return garbage) reaches the caller: an
unknown name, an exception or a timeout becomes an `ok=False` call whose result text says what
went wrong, so the model sees it inside `<result>...</result>` and the rollout goes on. A
timeout also sets `timed_out`, so the trainer can report timeouts apart from other errors.

Each call runs on its own daemon thread. `max_workers` bounds the calls in flight across every
`run` of one runner, however many threads call it at once (the verl agent loop runs many trees
per process on one runner, so this is a per-process bound on sandboxes and searches). A thread
that hangs is abandoned when its timeout passes: it no longer counts against `max_workers`, and
as a daemon it cannot keep the interpreter from exiting. (Python threads cannot be killed;
tools that run foreign code, like the Python sandbox, should enforce their own limits in a
child process.)
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from aepo.types import ToolCall

TRUNCATION_MARK = " ...[truncated]"
_SLOT_POLL_S = 0.02  # how often a `run` waiting for workers looks for slots freed by other `run`s
logger = logging.getLogger(__name__)
_ERROR_CHARS = 300  # a tool's exception, as the model sees it: its first line, cut here
# The runner's own timeout text ("Error: search timed out after 5s") and the Python sandbox's
# ("Error: timed out after 5s", after any output the program printed first).
_TIMEOUT_TEXT = re.compile(r"^Error: (?:\S+ )?timed out after \d", re.MULTILINE)


@runtime_checkable
class Tool(Protocol):
    """A named callable from argument text to result text."""

    name: str

    def __call__(self, argument: str) -> str: ...


def truncate_result(text: str, max_chars: int) -> str:
    """Cut `text` to at most `max_chars` characters, ending with a visible truncation mark.

    The mark tells the model that it is not seeing everything; when `max_chars` is too small
    to hold the mark, the text is simply cut.
    """
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars <= 0:
        raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
    if len(text) <= max_chars:
        return text
    if max_chars <= len(TRUNCATION_MARK):
        return text[:max_chars]
    return text[: max_chars - len(TRUNCATION_MARK)].rstrip() + TRUNCATION_MARK


def is_timeout(call: ToolCall) -> bool:
    """Whether `call` hit a time limit: flagged by the runner, or said so in its result text
    (the sandbox's own limit, or a copy of the call that did not keep the flag)."""
    return call.timed_out or bool(_TIMEOUT_TEXT.search(call.result))


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}"


def _tools_by_name(tools: Mapping[str, Tool] | Iterable[Tool]) -> dict[str, Tool]:
    """Normalise the `tools` argument to a name -> callable dict, rejecting bad entries."""
    if isinstance(tools, Mapping):
        named = dict(tools)
    else:
        named = {}
        for tool in tools:
            name = getattr(tool, "name", None)
            if not isinstance(name, str) or not name:
                raise ValueError(f"tool {tool!r} has no non-empty string `name` attribute")
            if name in named:
                raise ValueError(f"two tools are named {name!r}; tool names must be unique")
            named[name] = tool
    for name, tool in named.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool names must be non-empty strings, got {name!r}")
        if not callable(tool):
            raise ValueError(f"tool {name!r} is not callable: {tool!r}")
    return named


class ToolRunner:
    """Run `(tool name, argument)` calls concurrently; every outcome is a `ToolCall`.

    `timeout` is the wall-clock limit of one call, counted from when it starts running (a call
    waiting for a free worker is not timed yet); `max_workers` bounds how many calls are in
    flight at once over all concurrent `run`s of this runner.
    """

    def __init__(
        self,
        tools: Mapping[str, Tool] | Sequence[Tool],
        timeout: float = 10.0,
        max_workers: int = 8,
    ) -> None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.tools: dict[str, Tool] = _tools_by_name(tools)
        self.timeout = float(timeout)
        self.max_workers = max_workers
        self._slots = threading.BoundedSemaphore(max_workers)  # shared by concurrent `run`s
        self._closed = False

    @property
    def names(self) -> list[str]:
        """The valid tool names, sorted."""
        return sorted(self.tools)

    def run_one(self, name: str, argument: str) -> ToolCall:
        """Run a single call (same rules as `run`)."""
        return self.run([(name, argument)])[0]

    def run(self, calls: Sequence[tuple[str, str]]) -> list[ToolCall]:
        """Run all `calls` concurrently and return their `ToolCall`s in the same order."""
        if self._closed:
            raise RuntimeError("ToolRunner.run called after close()")
        calls = list(calls)
        for i, call in enumerate(calls):
            if not (isinstance(call, tuple) and len(call) == 2):
                raise ValueError(f"calls[{i}] must be a (tool name, argument) pair, got {call!r}")
        results: list[ToolCall | None] = [None] * len(calls)
        pending: deque[int] = deque()
        for i, (name, argument) in enumerate(calls):
            if name in self.tools:
                pending.append(i)
            else:
                valid = ", ".join(self.names) or "(none)"
                text = f"Error: unknown tool {name!r}; valid tools: {valid}"
                results[i] = ToolCall(name=str(name), argument=str(argument), result=text, ok=False)

        finished: queue.Queue[tuple[int, str, bool, float]] = queue.Queue()
        started: dict[int, float] = {}  # call index -> monotonic start time, while in flight
        try:
            self._run_pending(calls, pending, started, finished, results)
        finally:
            for _ in started:  # only on an exception (KeyboardInterrupt): give the slots back
                self._slots.release()
        return [r for r in results if r is not None]

    def _run_pending(self, calls: list[tuple[str, str]], pending: deque[int], started: dict[int, float],
                     finished: queue.Queue[tuple[int, str, bool, float]],
                     results: list[ToolCall | None]) -> None:
        """Start calls as worker slots free up (waiting for one only when none of ours is in
        flight) and collect them; every call leaves `started` with its slot given back."""
        while pending or started:
            # Block for a slot only when nothing of ours runs; otherwise take what is free now.
            while pending and self._slots.acquire(blocking=not started):
                i = pending.popleft()
                name, argument = calls[i]
                started[i] = time.monotonic()
                worker = threading.Thread(
                    target=self._call_tool,
                    args=(i, self.tools[name], argument, finished),
                    name=f"aepo-tool-{name}",
                    daemon=True,
                )
                worker.start()
            wait = min(started.values()) + self.timeout - time.monotonic()
            if pending:  # slots freed by other `run`s are noticed within this poll interval
                wait = min(wait, _SLOT_POLL_S)
            try:
                i, text, ok, seconds = finished.get(timeout=max(0.0, wait))
            except queue.Empty:
                now = time.monotonic()
                for j, start in list(started.items()):
                    if now - start >= self.timeout:
                        name, argument = calls[j]
                        text = f"Error: {name} timed out after {_format_seconds(self.timeout)}s"
                        results[j] = ToolCall(name, argument, text, ok=False, seconds=now - start,
                                              timed_out=True)
                        del started[j]  # the thread is abandoned; a late answer is ignored
                        self._slots.release()
                continue
            if i in started:
                del started[i]
                self._slots.release()
                name, argument = calls[i]
                results[i] = ToolCall(name, argument, text, ok=ok, seconds=seconds)

    @staticmethod
    def _call_tool(
        index: int, tool: Tool, argument: str, finished: queue.Queue[tuple[int, str, bool, float]]
    ) -> None:
        """Worker body: call the tool and report (index, text, ok, seconds); never raises."""
        start = time.monotonic()
        try:
            value = tool(argument)
            if isinstance(value, str):
                text, ok = value, True
            else:
                text, ok = f"Error: tool returned {type(value).__name__}, expected str", False
        except BaseException as exc:  # noqa: BLE001 - a tool may even call sys.exit
            # One line for the model; the whole story (host paths, traceback) only in the log.
            logger.warning("tool %r raised %s", tool, type(exc).__name__, exc_info=True)
            lines = str(exc).strip().splitlines()
            message = lines[0][:_ERROR_CHARS] if lines else ""
            text = f"Error: {type(exc).__name__}: {message}" if message else f"Error: {type(exc).__name__}"
            ok = False
        finished.put((index, text, ok, time.monotonic() - start))

    def close(self) -> None:
        """Refuse further calls. Abandoned (hung) daemon threads are left to die with the process."""
        self._closed = True

    def __enter__(self) -> ToolRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
