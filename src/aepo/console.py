"""A live console view of a training run: a progress bar with the metrics that matter."""
from __future__ import annotations

import sys
import threading
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

from aepo.catalogue import format_value, shown

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
    """The progress line's `short=value` parts: the catalogue's console metrics present in `m`."""
    return " ".join(f"{c.short}={format_value(c, v)}" for c in shown("console")
                    if isinstance(v := m.get(c.key), (int, float)))


class StepProgress:
    """`with StepProgress(total, start) as bar: bar.advance(metrics)`; plain lines when not a TTY.

    Without a terminal (a log file, CI) a line is printed when a step ends, at most every
    `interval` seconds (and for the last step), and a heartbeat thread prints
    `[title] step 3/7, 42 s elapsed, still working` whenever `interval` seconds pass without a
    line, so a slow step never leaves the log silent. Nothing is printed after `__exit__`.

    An "accuracy" metric is shown as the running mean over the steps so far, weighted by each
    step's `weight` (e.g. its number of samples): `acc(mean so far)=0.41`. Every other metric
    (training's per-step "reward/accuracy", losses, ...) is shown as the step's own value."""

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, title: str = "train",
                 interval: float = 10.0) -> None:
        self.total, self.done, self.enabled, self.title = total, start, enabled, title
        self.interval = interval
        self.tty = console.is_terminal
        self._progress: Progress | None = None
        self._last_print: float | None = None  # monotonic time of the last plain line
        self._t0 = time.monotonic()
        self._acc_sum = 0.0
        self._acc_weight = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> StepProgress:
        self._t0 = time.monotonic()
        self._closed = False
        self._stop.clear()
        if self.enabled and self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=console, transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.total, completed=self.done, info="")
        elif self.enabled:
            self._heartbeat = threading.Thread(target=self._beat, name=f"progress {self.title}", daemon=True)
            self._heartbeat.start()
        return self

    @property
    def mean_accuracy(self) -> float | None:
        """The weighted running mean of the "accuracy" values passed so far (None before any)."""
        with self._lock:
            return self._acc_sum / self._acc_weight if self._acc_weight > 0 else None

    def advance(self, metrics: dict[str, Any], weight: float = 1.0) -> None:
        """One step done. `weight` (default 1) weighs this step's "accuracy" in the running mean."""
        with self._lock:
            self.done += 1
            shown = dict(metrics)
            acc = shown.pop("accuracy", None)
            if isinstance(acc, (int, float)) and weight > 0:
                self._acc_sum += float(acc) * weight
                self._acc_weight += weight
            info = format_metrics(shown)
            if self._acc_weight > 0:
                mean = f"acc(mean so far)={self._acc_sum / self._acc_weight:.3g}"
                info = f"{mean} {info}" if info else mean
            if self._progress is not None:
                self._progress.update(self._task, advance=1, info=info)
            elif self.enabled and not self._closed:
                now = time.monotonic()
                due = self._last_print is None or now - self._last_print > self.interval
                if due or self.done == self.total:
                    # not a terminal (a log file, CI): a line every `interval` s at most
                    self._last_print = now
                    print(f"[{self.title}] step {self.done}/{self.total} {info}", file=sys.stderr, flush=True)

    def _beat(self) -> None:
        """The heartbeat: a line whenever `interval` seconds pass without one, until `__exit__`."""
        while True:
            with self._lock:
                last = self._t0 if self._last_print is None else self._last_print
                wait = max(last + self.interval - time.monotonic(), 0.01)
            if self._stop.wait(wait):
                return
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                last = self._t0 if self._last_print is None else self._last_print
                if now - last >= self.interval:
                    self._last_print = now
                    print(f"[{self.title}] step {self.done}/{self.total}, {now - self._t0:.0f} s elapsed, "
                          "still working", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closed = True  # under the lock: a heartbeat line is either out already or never
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._progress is not None:
            self._progress.__exit__(*exc)
