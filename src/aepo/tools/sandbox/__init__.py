"""Run untrusted Python (model-written code) in an isolated, resource-limited child process.

The policy under training is optimised to find any path to reward, so the program is treated
as hostile. In the default mode, "strict", every run gets (`child.py` builds it):

- **Its own file system.** A minimal root on a tmpfs: read-only binds of what Python needs (the
  interpreter, its standard library, the installed packages of its environment and the
  system's shared libraries), fresh empty /tmp, /run, /var, /home, /root, /dev/shm and the
  working directory /work (one size-limited tmpfs, `scratch_mb`), a new /proc with /proc/sys
  read-only and root-only files masked, /dev/null and friends, and a small /etc. No other host
  file exists inside: not the user's home, not the training data or its gold answers, not
  other runs' scratch, not a socket file.
- **Namespaces**: user, mount, PID (the program sees only its own processes), network (empty:
  not even loopback), IPC (System V and POSIX IPC limits set to 0), UTS. The user namespace
  allows 8 inotify instances and no further namespaces.
- **Not the host's root**: under a root trainer the program runs as an unprivileged host uid of
  its own (`PROGRAM_UID_BASE` + a slot held by one run at a time, `_UidSlot`), so the kernel's
  checks against host uid 0 (sysctls, root-only files) never match it, RLIMIT_NPROC binds its
  threads and processes, and it cannot signal its supervisor. Under an ordinary user it keeps
  that user's uid (the only one an unprivileged process may map).
- **A system-call filter** (seccomp), for every user: no new namespaces (`unshare`, `setns`,
  `clone` with namespace flags, `clone3`), no `mount`/`pivot_root`/`chroot`, no `ptrace` or
  `process_vm_*`, no `bpf`, `keyctl`, `perf_event_open`, `io_uring_*`, `userfaultfd`,
  `memfd_create`, kernel modules; sockets only of the IPv4/IPv6 families (no unix, netlink,
  packet, vsock, ...); no signal or `prlimit` aimed at PID 1. Where RLIMIT_NPROC cannot bind
  (the program would be the host's root, e.g. limits-only under root), the filter also refuses
  new processes; threads still work.
- **Limits**: wall clock (a watchdog inside that waits on a pidfd, so no signal can cut it short,
  and the parent as a backstop), CPU seconds, address space, file size, open files, processes,
  POSIX message queues, locked memory.
- **Its own session**: the program cannot signal the setup process's group; the supervisor has
  no signal handler (PID 1 of its namespace, so the kernel drops the program's signals) and is
  not dumpable. Should it die anyway, the model reads one line and the log gets the details.
- **No leftovers**: each link of the process chain dies with its parent, so a killed trainer
  (even `kill -9`) leaves no process; host-side scratch directories of dead runs are removed
  when the next sandbox starts.
- **Environment**: nothing is inherited (`CHILD_ENVIRONMENT` is all it sees).

When the kernel does not allow this (no unprivileged user namespaces, no seccomp), strict mode
refuses to run and says why. `mode="limits-only"` runs anyway, with resource limits, an empty
environment, a scratch directory and (where possible) the filter; the program can then read
every file the user can, use the network and signal the user's processes. It is a named,
loud opt-in (`tools.python_isolation=limits-only`), never a silent fallback.
`PythonSandbox.isolation` and `aepo tools python --verbose` report what is in force.

The program runs like a REPL cell: when its last statement is an expression whose value is not
None, the value's repr is printed (`sys.displayhook`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aepo.errors import ConfigError
from aepo.tools.registry import ToolSpec, register_tool
from aepo.tools.runner import truncate_result
from aepo.tools.sandbox.host import (
    PROGRAM_UID_BASE,
    SCRATCH_PREFIX,  # noqa: F401 - part of this package's interface (tests, `aepo tools python`)
    SandboxError,
    _nproc_does_not_bind,
    _ScratchDir,
    _uid_slot,
    _UidSlot,  # noqa: F401 - the uid slots are tested through this package
    python_binds,
    remove_stale_scratch_dirs,
)
from aepo.tools.sandbox.launch import _Launch, _launch, _parse_status, _runner_source

logger = logging.getLogger(__name__)

CHILD_ENVIRONMENT: dict[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "OMP_NUM_THREADS": "1",  # numerical libraries: one thread, so memory limits hold
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""The whole environment of the sandboxed program: fixed values, nothing from the parent."""

SandboxMode = Literal["strict", "limits-only"]
SANDBOX_MODES: tuple[str, ...] = ("strict", "limits-only")
_PROBE_TIMEOUT_S = 20.0
_STDERR_TAIL_CHARS = 800
_UNAVAILABLE_HINT = (
    "The strict sandbox needs Linux user namespaces and seccomp. Enable unprivileged user "
    "namespaces (sysctl user.max_user_namespaces > 0 and kernel.unprivileged_userns_clone=1; on "
    "Ubuntu 24.04 and later also kernel.apparmor_restrict_unprivileged_userns=0); in a container, "
    "start it with --security-opt seccomp=unconfined --security-opt apparmor=unconfined (Docker's "
    "default profiles refuse new namespaces) or, on Kubernetes, a securityContext with an "
    "Unconfined seccompProfile; or accept a weaker sandbox that does NOT "
    "hide host files or block the network by name: tools.python_isolation=limits-only "
    "(`aepo tools python --isolation limits-only`)."
)


@dataclass(frozen=True)
class Isolation:
    """What protects the host during a sandbox run (probed once per process)."""

    mode: str  # "strict" or "limits-only"
    namespaces: bool  # user, mount, PID, network, IPC, UTS namespaces
    minimal_root: bool  # the program sees only its own root: no host file outside the binds
    process_filter: bool  # the seccomp filter is installed
    process_limit: str  # "rlimit" (RLIMIT_NPROC, threads included) or "seccomp" (no new processes at all)
    program_uid: str = "the trainer's uid"  # who the program is on the host
    proc_sealed: bool = False  # /proc/sys read-only, root-only /proc files masked
    memory_walls: bool = False  # memfd refused, System V / POSIX IPC limits 0 in its own namespace

    @property
    def network_isolated(self) -> bool:
        return self.namespaces

    @property
    def pid_namespace(self) -> bool:
        return self.namespaces

    @property
    def readonly_filesystem(self) -> bool:
        return self.minimal_root

    def describe(self) -> str:
        """What is and is not in force, for logs and `aepo tools python --verbose`."""
        yes = lambda flag: "yes" if flag else "NO"  # noqa: E731
        return (
            f"sandbox mode={self.mode}; namespaces (user, mount, pid, net, ipc, uts)={yes(self.namespaces)}; "
            f"minimal root (host files hidden)={yes(self.minimal_root)}; "
            f"network isolated={yes(self.network_isolated)}; "
            f"system-call filter (no namespaces, mount, ptrace, bpf, keyctl, perf, io_uring, memfd; "
            f"sockets: IPv4/IPv6 only; no signal or limit aimed at the supervisor)={yes(self.process_filter)}; "
            f"program runs as {self.program_uid}; process limit={self.process_limit}; "
            f"/proc/sys read-only and root-only /proc files masked={yes(self.proc_sealed)}; "
            f"shared memory bounded (no memfd, System V / POSIX IPC off; /dev/shm in the scratch "
            f"tmpfs)={yes(self.memory_walls)}; own session, supervisor unsignalable={yes(self.namespaces)}; "
            f"inotify instances per run={8 if self.namespaces else 'host user limit'}; "
            f"memory limit=address space per program (no memory cgroup)"
        )


@dataclass
class SandboxResult:
    """The outcome of one program run. `error` is None exactly when the program succeeded."""

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def _check_mode(mode: str) -> str:
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox mode must be one of {', '.join(SANDBOX_MODES)}, got {mode!r}")
    return mode


def _limits(cpu_seconds: int, memory_mb: int, max_processes: int, max_file_mb: int) -> dict[str, list[int]]:
    memory = memory_mb * 1024 * 1024
    return {
        "RLIMIT_CPU": [cpu_seconds, cpu_seconds + 1],
        "RLIMIT_AS": [memory, memory],
        "RLIMIT_DATA": [memory, memory],
        "RLIMIT_NPROC": [max_processes, max_processes],
        "RLIMIT_FSIZE": [max_file_mb * 1024 * 1024] * 2,
        "RLIMIT_CORE": [0, 0],
        "RLIMIT_NOFILE": [256, 256],
        "RLIMIT_MSGQUEUE": [0, 0],  # POSIX message queues: kernel memory no other limit counts
        "RLIMIT_MEMLOCK": [0, 0],
    }


# ----------------------------------------------------------------------------- probe


def _settings(mode: str, python: str, root: Path, scratch_mb: int, limits: dict, *, probe: bool,
              host_uid: int | None, canary: str = "", tag: str = "") -> dict:
    strict = mode == "strict"
    host_uid = host_uid if strict else None
    return {
        "namespaces": strict,
        "binds": python_binds(python) if strict else [],
        "root": str(root),
        "scratch_mb": scratch_mb,
        "limits": limits,
        "host_uid": host_uid,
        # where RLIMIT_NPROC cannot bind (the program would be the host's root), no new processes
        "deny_fork": _nproc_does_not_bind() and host_uid is None,
        "require_filter": strict,
        "probe": probe,
        "canary": canary,
        "python": python,
        "runner": _runner_source(),
        "env": CHILD_ENVIRONMENT,
        "tag": tag,
    }


def _probe(python: str, mode: str) -> Isolation:
    """Run the child in probe mode and check, from inside, every wall the mode promises."""
    remove_stale_scratch_dirs()
    strict = mode == "strict"
    with _ScratchDir() as root, tempfile.TemporaryDirectory(prefix="aepo-probe-canary-") as outside, \
            _uid_slot() as host_uid:
        os.chmod(outside, 0o777)  # only the sandbox, not file permissions, may stop the write
        canary = Path(outside, "canary")
        canary.write_text("host file")
        settings = _settings(mode, python, root, 1, _limits(10, 1024, 64, 1), probe=True, host_uid=host_uid,
                             canary=str(canary))
        launch = _launch(python, settings, "", root, _PROBE_TIMEOUT_S, 65536)
        returncode, _, failure = _parse_status(launch.status)
        try:
            report = json.loads(launch.stdout) if returncode == 0 else None
        except ValueError:
            report = None
    if not isinstance(report, dict):
        detail = failure or (launch.stderr.strip().splitlines() or [f"exit status {launch.exit_code}"])[-1]
        if strict:
            raise SandboxError(f"cannot start the strict Python sandbox ({detail}). {_UNAVAILABLE_HINT}")
        raise SandboxError(f"cannot start a sandboxed Python process: {detail}")
    problems = []
    if strict:
        for key, bad, what in (
            ("canary_visible", True, "a host file is visible inside"),
            ("outside_writable", True, "a host directory is writable inside"),
            ("root_writable", True, "the sandbox root is writable"),
            ("unshare_blocked", False, "new namespaces are not refused"),
            ("unix_socket_blocked", False, "unix sockets are not refused"),
            ("vsock_blocked", False, "vsock sockets are not refused"),
            ("memfd_blocked", False, "memfd_create is not refused"),
            ("proc_sys_writable", True, "/proc/sys is writable"),
            ("filter", False, "the system-call filter is not installed"),
        ):
            if report.get(key, bad) == bad:
                problems.append(what)
    deny_fork, switched = settings["deny_fork"], settings["host_uid"] is not None
    if report.get("filter") and deny_fork and report.get("can_fork", True):
        problems.append("the process filter did not stop fork")
    if problems:
        raise SandboxError(f"the {mode} Python sandbox is not holding on this machine: {'; '.join(problems)}. "
                           + (_UNAVAILABLE_HINT if strict else ""))
    if switched:
        who = f"an unprivileged host uid ({PROGRAM_UID_BASE}+slot, one per concurrent run)"
    else:
        who = "the trainer's uid" + (" (the host's root: no new processes)" if deny_fork else "")
    return Isolation(
        mode=mode, namespaces=strict, minimal_root=strict, process_filter=bool(report.get("filter")),
        process_limit="seccomp" if report.get("filter") and deny_fork else "rlimit",
        program_uid=who, proc_sealed=strict, memory_walls=strict and bool(report.get("memfd_blocked")),
    )


_isolation_cache: dict[tuple[str, str], Isolation] = {}
_isolation_lock = threading.Lock()


def probe_isolation(python: str | None = None, mode: str = "strict") -> Isolation:
    """The isolation of `mode` on this machine, checked on first use, then cached.

    Raises SandboxError (saying why and what to do) when the mode cannot hold here. The
    limits-only mode warns once (RuntimeWarning and log) that it does not isolate the host.
    """
    python = python or sys.executable
    key = (python, _check_mode(mode))
    with _isolation_lock:
        if key not in _isolation_cache:
            isolation = _probe(python, mode)
            if mode == "limits-only":
                message = (
                    "aepo python sandbox in limits-only mode: sandboxed code CAN read every file this "
                    "user can (training data and gold answers included), use the network and signal "
                    "this user's processes. " + isolation.describe()
                )
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                logger.warning(message)
            else:
                logger.info("aepo python sandbox: %s", isolation.describe())
            _isolation_cache[key] = isolation
        return _isolation_cache[key]


def _signal_error(signum: int, cpu_seconds: int) -> str:
    if signum == signal.SIGXCPU:
        return f"Error: CPU time limit exceeded ({cpu_seconds}s)"
    if signum == signal.SIGXFSZ:
        return "Error: file size limit exceeded"
    if signum == signal.SIGKILL:
        return "Error: killed (SIGKILL), probably out of memory"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"Error: killed by {name}"


def _stderr_tail(stderr: str) -> str:
    """The end of stderr, starting on a line boundary: where the traceback's last line is."""
    tail = stderr.strip("\n").rstrip()
    if len(tail) > _STDERR_TAIL_CHARS:
        tail = tail[-_STDERR_TAIL_CHARS:]
        tail = tail[tail.find("\n") + 1 :] if "\n" in tail else tail
    return tail


class PythonSandbox:
    """The "python" tool: run a program in a fresh isolated process and return its output."""

    name = "python"

    def __init__(
        self,
        timeout: float = 5.0,
        cpu_seconds: int = 5,
        memory_mb: int = 512,
        max_processes: int = 32,
        max_output_chars: int = 2000,
        max_file_mb: int = 16,
        scratch_mb: int = 64,
        mode: str = "strict",
        python: str | None = None,
    ) -> None:
        for field, value, low in (
            ("cpu_seconds", cpu_seconds, 1),
            ("memory_mb", memory_mb, 32),
            ("max_processes", max_processes, 1),
            ("max_output_chars", max_output_chars, 1),
            ("max_file_mb", max_file_mb, 1),
            ("scratch_mb", scratch_mb, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{field} must be an int >= {low}, got {value!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.cpu_seconds = cpu_seconds
        self.memory_mb = memory_mb
        self.max_processes = max_processes
        self.max_output_chars = max_output_chars
        self.max_file_mb = max_file_mb
        self.scratch_mb = scratch_mb
        self.mode = _check_mode(mode)
        self.python = os.path.normpath(os.path.abspath(python or sys.executable))

    @property
    def isolation(self) -> Isolation:
        """What isolates the child on this machine (probes on first use; SandboxError if it cannot hold)."""
        return probe_isolation(self.python, self.mode)

    def run(self, code: str) -> SandboxResult:
        """Run `code` as a program. Raises only `SandboxError`, when the sandbox itself cannot start."""
        if not isinstance(code, str):
            raise ValueError(f"code must be a string, got {type(code).__name__}")
        isolation = self.isolation
        limits = _limits(self.cpu_seconds, self.memory_mb, self.max_processes, self.max_file_mb)
        with _ScratchDir() as root, _uid_slot() as host_uid:
            settings = _settings(isolation.mode, self.python, root, self.scratch_mb, limits, probe=False,
                                 host_uid=host_uid, tag=root.name)
            cap = self.max_output_chars * 4 + 1024  # bytes; utf-8 needs at most 4 per character
            launch = _launch(self.python, settings, code, root, self.timeout, cap)
        return self._result(launch)

    def _result(self, launch: _Launch) -> SandboxResult:
        stdout = truncate_result(launch.stdout, self.max_output_chars)
        stderr = truncate_result(launch.stderr, self.max_output_chars)
        returncode, watchdog_fired, failure = _parse_status(launch.status)
        timed_out = launch.timed_out or watchdog_fired
        error: str | None
        if timed_out:
            error = f"Error: timed out after {self.timeout:g}s"
        elif failure is not None:
            raise SandboxError(f"sandbox {failure}")
        elif returncode is None:  # the supervisor died: one line for the model, the rest for the log
            logger.warning("python sandbox: the supervisor exited with status %s before reporting; stderr "
                           "tail: %s", launch.exit_code, _stderr_tail(launch.stderr))
            error = "Error: the sandbox stopped before the program finished"
        elif returncode < 0:
            error = _signal_error(-returncode, self.cpu_seconds)
        elif returncode != 0:
            error = _stderr_tail(stderr) or f"Error: exit status {returncode}"
        else:
            error = None
        return SandboxResult(stdout, stderr, returncode, timed_out, error)

    def format(self, result: SandboxResult) -> str:
        """The tool's result text: stdout, or stdout so far followed by the concise error."""
        if result.ok:
            return result.stdout if result.stdout.strip() else "(no output)"
        assert result.error is not None
        text = f"{result.stdout.rstrip()}\n{result.error}" if result.stdout.strip() else result.error
        return truncate_result(text, self.max_output_chars)

    def __call__(self, code: str) -> str:
        """Tool entry point: run `code` and return the result text."""
        return self.format(self.run(code))


def _build(cfg: Any, **_: Any) -> PythonSandbox:
    """python from `tools.*`; the isolation is checked here, before any work, so a run never
    starts with a sandbox that cannot hold."""
    sandbox = PythonSandbox(timeout=min(cfg.timeout, cfg.python_timeout), memory_mb=cfg.python_memory_mb,
                            mode=cfg.python_isolation)
    try:
        sandbox.isolation
    except SandboxError as e:
        raise ConfigError(f"tools.enabled has 'python' but {e}") from None
    return sandbox


register_tool(ToolSpec("python", usage="to run a program write <python> code </python>", argument="code",
                       description="Run a Python program in a sandbox; returns what it prints (and the value of its last expression).", build=_build))
