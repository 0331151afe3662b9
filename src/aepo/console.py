"""A live console view of a training run: a progress bar with the metrics that matter."""
from __future__ import annotations

import sys
import time
import unicodedata
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

SHOWN = [("loss", "loss"), ("accuracy", "acc"), ("reward/mean", "R"), ("reward/accuracy", "acc"), ("rollout/entropy", "H"),
         ("rollout/tool_calls", "tools"), ("rollout/branches", "br"), ("actor/pg_loss", "loss"),
         ("actor/grad_norm", "|g|")]

console = Console(stderr=True)


_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """`text` safe for the operator's terminal: control characters other than newline and tab
    (escape sequences, C1 controls, carriage return, bidirectional overrides) are shown as
    escapes (`\\x1b`, `\\u202e`), so model- or tool-written text cannot drive the terminal."""
    out = []
    for ch in text:
        if ch in "\n\t" or (unicodedata.category(ch) != "Cc" and ch not in _BIDI_CONTROLS):
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def format_metrics(m: dict[str, Any]) -> str:
    parts = []
    for key, short in SHOWN:
        v = m.get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{short}={v:.3g}")
    return " ".join(parts)


class StepProgress:
    """`with StepProgress(total, start) as bar: bar.advance(metrics)`; plain lines when not a TTY."""

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, title: str = "train") -> None:
        self.total, self.done, self.enabled, self.title = total, start, enabled, title
        self.tty = console.is_terminal
        self._progress: Progress | None = None
        self._last_print = 0.0

    def __enter__(self) -> StepProgress:
        if self.enabled and self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=console, transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.total, completed=self.done, info="")
        return self

    def advance(self, metrics: dict[str, Any]) -> None:
        self.done += 1
        info = format_metrics(metrics)
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=info)
        elif self.enabled and (time.time() - self._last_print > 10 or self.done == self.total):
            # not a terminal (a log file, CI): a line every 10 s at most
            self._last_print = time.time()
            print(f"[{self.title}] step {self.done}/{self.total} {info}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
