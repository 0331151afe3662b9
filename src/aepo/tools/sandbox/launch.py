"""One launch of the sandbox's process tree (`child.py`, then the program's cell): the program's
source in, bounded output and the status pipe's report out, the whole tree killed at the backstop
(`aepo.tools.sandbox`)."""
from __future__ import annotations

import functools
import json
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from aepo.tools.sandbox.host import SandboxError

_CHILD = Path(__file__).with_name("child.py")
_CELL = Path(__file__).with_name("cell.py")
_BACKSTOP_S = 2.0  # the parent kills the whole tree this long after the inner watchdog should have
_DRAIN_AFTER_KILL_S = 1.0
_GRACE_AFTER_EXIT_S = 0.25  # output still in flight when the program has exited


class _BoundedReader:
    """Collects a pipe's bytes, keeping the head (stdout) or the tail (stderr) up to a cap."""

    def __init__(self, cap: int, keep_tail: bool) -> None:
        self.cap, self.keep_tail = cap, keep_tail
        self.data = bytearray()

    def feed(self, chunk: bytes) -> None:
        if self.keep_tail:
            self.data += chunk
            if len(self.data) > 2 * self.cap:
                del self.data[: len(self.data) - self.cap]
        elif len(self.data) < self.cap:
            self.data += chunk[: self.cap - len(self.data)]

    def text(self) -> str:
        data = bytes(self.data[-self.cap :] if self.keep_tail else self.data)
        return data.decode("utf-8", errors="replace")


@dataclass
class _Launch:
    """Raw outcome of one sandbox process tree: output, the status pipe's text, whether it was killed."""

    stdout: str
    stderr: str
    status: str
    exit_code: int
    timed_out: bool


def _kill_group(pgid: int) -> None:
    """SIGKILL a process group we created (the PID namespace dies with its first process)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _launch(python: str, settings: dict, code: str, cwd: Path, timeout: float, output_cap: int) -> _Launch:
    """Start the child (`child.py`), feed it `code`, collect bounded output; the parent
    kills the whole tree `_BACKSTOP_S` after `timeout` should the inner watchdog not have."""
    status_read, status_write = os.pipe()
    settings = {**settings, "status_fd": status_write, "parent_pid": os.getpid(), "timeout": timeout}
    command = [python, "-I", "-S", str(_CHILD), json.dumps(settings)]
    try:
        child = subprocess.Popen(
            command, cwd=cwd, env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, pass_fds=(status_write,), start_new_session=True,
        )
    except OSError as exc:
        os.close(status_read)
        raise SandboxError(f"cannot start the sandbox process {python!r}: {exc}") from exc
    finally:
        os.close(status_write)
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    streams = {
        child.stdout.fileno(): _BoundedReader(output_cap, keep_tail=False),
        child.stderr.fileno(): _BoundedReader(output_cap, keep_tail=True),
        status_read: _BoundedReader(4096, keep_tail=True),
    }
    pending = memoryview(code.encode("utf-8"))
    stdin_fd = child.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    timed_out = killed = finished = False
    deadline = time.monotonic() + timeout + _BACKSTOP_S
    try:
        with selectors.DefaultSelector() as selector:
            for fd, reader in streams.items():
                selector.register(fd, selectors.EVENT_READ, reader)
            selector.register(stdin_fd, selectors.EVENT_WRITE, None)
            while any(key.data is not None for key in selector.get_map().values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if killed:  # killed, yet an escaped process holds the pipes: stop reading
                        break
                    # Past the backstop, or the program is done but a leftover process still
                    # holds the output pipes: end them all.
                    timed_out = not finished
                    killed = True
                    _kill_group(child.pid)
                    deadline = time.monotonic() + _DRAIN_AFTER_KILL_S
                    continue
                for key, _ in selector.select(timeout=remaining):
                    if key.data is None:  # the program's source, written as the pipe takes it
                        try:
                            pending = pending[os.write(stdin_fd, pending[:65536]):]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # the child is gone; its status says why
                            pending = pending[:0]
                        if not len(pending):
                            selector.unregister(stdin_fd)
                            child.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        key.data.feed(chunk)
                        continue
                    selector.unregister(key.fd)
                    if key.fd == status_read:  # the program and its supervisor have exited
                        finished = True
                        deadline = min(deadline, time.monotonic() + _GRACE_AFTER_EXIT_S)
        try:  # the program may have closed its output and still be running
            exit_code = child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(child.pid)
            exit_code = child.wait()
    finally:
        _kill_group(child.pid)  # stragglers of a limits-only run
        child.wait()
        for pipe in (child.stdin, child.stdout, child.stderr):
            if not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass
        os.close(status_read)
    out, err, status = (streams[fd].text() for fd in streams)
    return _Launch(out, err, status, exit_code, timed_out)


def _parse_status(status: str) -> tuple[int | None, bool, str | None]:
    """(program return code, timed out by the watchdog, setup failure message) from the status pipe."""
    returncode, timed_out, failure = None, False, None
    for line in status.splitlines():
        if line.startswith("setup failed: "):
            failure = line
        elif line.startswith("{"):
            try:
                report = json.loads(line)
                returncode, timed_out = int(report["returncode"]), bool(report.get("timed_out"))
            except (ValueError, KeyError, TypeError):
                pass
    return returncode, timed_out, failure


# ----------------------------------------------------------------------------- probe


@functools.lru_cache(maxsize=1)
def _runner_source() -> str:
    """The program runner's source, read once per process (it is passed to every run)."""
    return _CELL.read_text(encoding="utf-8")
