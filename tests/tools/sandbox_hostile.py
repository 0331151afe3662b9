"""Hostile programs for the Python sandbox, each aimed at one wall, with what the host must see.

Used by tests/test_sandbox_security.py twice: in the test process (as whoever runs the tests,
root in CI) and, through `python tests/sandbox_hostile.py`, as an ordinary host user. Each case
is `(program, check)`; `check(result)` returns None when the wall held, else what went wrong.
Run as a script, it prints one JSON object: {case: failure or null}.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Callable

from aepo.tools.sandbox import PythonSandbox, SandboxResult

MAX_PROCESSES = 32
MEMORY_MB = 1024
TIMEOUT_S = 4.0


def make_box() -> PythonSandbox:
    return PythonSandbox(timeout=TIMEOUT_S, cpu_seconds=3, memory_mb=MEMORY_MB, max_processes=MAX_PROCESSES,
                         max_output_chars=4000)


def _lines(result: SandboxResult) -> list[str]:
    return result.stdout.splitlines()


def _expect_ok(result: SandboxResult) -> str | None:
    return None if result.ok else f"the program failed: {result.error}"


# Every file under /proc/sys, opened for writing. The kernel checks the permission at open;
# nothing is written, so even a wall that failed changes nothing on the host.
SYSCTL = textwrap.dedent("""
    import os
    writable = []
    for d, _, files in os.walk('/proc/sys'):
        for f in files:
            p = os.path.join(d, f)
            try:
                os.close(os.open(p, os.O_WRONLY))
                writable.append(p)
            except OSError:
                pass
    print(len(writable), writable[:5])
""")


def _check_sysctl(result: SandboxResult) -> str | None:
    if not result.ok:
        return f"the program failed: {result.error}"
    return None if result.stdout.startswith("0 ") else f"sysctls writable: {result.stdout.strip()}"


THREAD_BOMB = textwrap.dedent("""
    import threading
    threading.stack_size(65536)
    stop = threading.Event()
    started = 0
    try:
        for _ in range(300):
            threading.Thread(target=stop.wait, daemon=True).start()
            started += 1
    except RuntimeError:
        pass
    stop.set()
    print(started)
""")


def _check_threads(result: SandboxResult) -> str | None:
    if not result.ok:
        return f"the program failed: {result.error}"
    started = int(result.stdout.split()[0])
    return None if started < MAX_PROCESSES else f"{started} threads started against max_processes={MAX_PROCESSES}"


ROOT_ONLY_PROC = textwrap.dedent("""
    readable = []
    for name in ('kpageflags', 'kpagecount', 'slabinfo', 'pagetypeinfo', 'key-users', 'vmallocinfo', 'kcore'):
        try:
            if open('/proc/' + name, 'rb').read(64):
                readable.append(name)
        except OSError:
            pass
    print(readable)
""")


def _check_root_only(result: SandboxResult) -> str | None:
    if not result.ok:
        return f"the program failed: {result.error}"
    return None if result.stdout.strip() == "[]" else f"root-only /proc files readable: {result.stdout.strip()}"


SOCKET_FAMILIES = textwrap.dedent("""
    import socket
    opened = []
    for name, family, kind in (('AF_VSOCK', 40, socket.SOCK_STREAM), ('AF_NETLINK', 16, socket.SOCK_RAW),
                               ('AF_PACKET', 17, socket.SOCK_DGRAM), ('AF_UNIX', 1, socket.SOCK_STREAM),
                               ('AF_ALG', 38, socket.SOCK_SEQPACKET), ('AF_BLUETOOTH', 31, socket.SOCK_STREAM),
                               ('AF_INET', 2, socket.SOCK_STREAM), ('AF_INET6', 10, socket.SOCK_STREAM)):
        try:
            socket.socket(family, kind).close()
            opened.append(name)
        except OSError:
            pass
    print(opened)
""")


def _check_sockets(result: SandboxResult) -> str | None:
    if not result.ok:
        return f"the program failed: {result.error}"
    got = result.stdout.strip()
    return None if got == "['AF_INET', 'AF_INET6']" else f"socket families open: {got}"


# Shared memory outside the address-space limit: memfd, System V segments and message queues,
# POSIX shared memory in /dev/shm. Each tries to hold MEMORY_MB / 2; the sum must stay far
# below the limit, so no combination reaches it.
SHARED_MEMORY = textwrap.dedent(f"""
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    held = {{'memfd': 0}}
    try:  # 8 MiB files (each under the file-size limit), written, so the memory is real
        for _ in range({MEMORY_MB // 16}):
            fd = os.memfd_create('x')
            for _ in range(8):
                os.write(fd, b'x' * (1 << 20))
            held['memfd'] += 8
    except OSError:
        pass
    shmid = libc.shmget(0, {MEMORY_MB // 2} << 20, 0o1000 | 0o600)
    held['sysv_shm'] = {MEMORY_MB // 2} if shmid >= 0 else 0
    if shmid >= 0:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
    held['sysv_msg'] = 1 if libc.msgget(0, 0o1000 | 0o600) >= 0 else 0
    written = 0
    try:
        with open('/dev/shm/fill', 'wb') as f:
            for _ in range({MEMORY_MB // 2}):
                f.write(b'x' * (1 << 20))
                written += 1
    except OSError:
        pass
    held['dev_shm'] = written
    print(held)
""")


def _check_shared_memory(result: SandboxResult) -> str | None:
    if not result.ok:
        return f"the program failed: {result.error}"
    held = eval(result.stdout.strip(), {})  # a dict literal of ints the program printed
    bad = {k: v for k, v in held.items() if (k == "dev_shm" and v > 64) or (k != "dev_shm" and v)}
    return None if not bad else f"shared memory beyond the limits: {bad}"


SIGNAL_SUPERVISOR = textwrap.dedent("""
    import os, resource, signal
    refused = []
    for name, call in (('SIGINT', lambda: os.kill(1, signal.SIGINT)), ('SIGALRM', lambda: os.kill(1, signal.SIGALRM)),
                       ('SIGTERM', lambda: os.kill(1, signal.SIGTERM)),
                       ('prlimit', lambda: resource.prlimit(1, resource.RLIMIT_CPU, (1, 1)))):
        try:
            call()
        except OSError:
            refused.append(name)
    import time
    time.sleep(0.3)  # a supervisor that took a signal would have acted by now
    print('alive', os.getsid(0) == os.getpid(), refused)
""")


def _check_signal_supervisor(result: SandboxResult) -> str | None:
    if not result.ok:
        return f"the run did not survive signals to its supervisor: {result.error}"
    first = result.stdout.splitlines()[0] if result.stdout else ""
    if not first.startswith("alive True"):
        return f"the program is not alone in its session, or died: {result.stdout!r}"
    if "'prlimit'" not in first:
        return f"prlimit on the supervisor was allowed: {first}"
    return None


STOP_OWN_GROUP = "import os, signal\nos.killpg(0, signal.SIGSTOP)\nprint('not stopped')"


def _check_stop_group(result: SandboxResult, seconds: float) -> str | None:
    # It can stop only itself: the watchdog inside ends it at the limit. Had it stopped the
    # setup process outside its namespace, only the parent's backstop, 2 s later, would end it.
    if not result.timed_out:
        return f"expected the watchdog to end a stopped program, got {result.error or result.stdout!r}"
    return None if seconds < TIMEOUT_S + 1.5 else f"took {seconds:.1f}s: the setup process was stopped"


INOTIFY = textwrap.dedent("""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    held = 0
    while held < 300 and libc.inotify_init() >= 0:
        held += 1
    print(held)
""")


def _check_inotify(result: SandboxResult) -> str | None:
    if not result.ok:
        return f"the program failed: {result.error}"
    held = int(result.stdout.split()[0])
    return None if held <= 8 else f"{held} inotify instances held (the host user's limit is shared)"


FORK_STILL_WORKS = "import os\npid = os.fork()\nif pid == 0:\n    os._exit(7)\nprint(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"


CASES: dict[str, tuple[str, Callable[[SandboxResult], str | None]]] = {
    "sysctl": (SYSCTL, _check_sysctl),
    "threads": (THREAD_BOMB, _check_threads),
    "root_only_proc": (ROOT_ONLY_PROC, _check_root_only),
    "socket_families": (SOCKET_FAMILIES, _check_sockets),
    "shared_memory": (SHARED_MEMORY, _check_shared_memory),
    "signal_supervisor": (SIGNAL_SUPERVISOR, _check_signal_supervisor),
    "inotify": (INOTIFY, _check_inotify),
}


def run_case(box: PythonSandbox, name: str) -> str | None:
    """Run one case; None when its wall held."""
    if name == "stop_own_group":
        start = time.monotonic()
        result = box.run(STOP_OWN_GROUP)
        return _check_stop_group(result, time.monotonic() - start)
    code, check = CASES[name]
    return check(box.run(code))


ALL_CASES = (*CASES, "stop_own_group")


def main() -> None:
    box = make_box()
    print(json.dumps({"uid": __import__("os").geteuid(), "describe": box.isolation.describe(),
                      **{name: run_case(box, name) for name in ALL_CASES}}))


if __name__ == "__main__":
    sys.exit(main())
