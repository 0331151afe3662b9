"""Run untrusted Python (model-written code) in an isolated, resource-limited child process.

The policy under training is optimised to find any path to reward, so the program is treated
as hostile. In the default mode, "strict", every run gets (`aepo.tools.sandbox_child` builds it):

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

import fcntl
import functools
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aepo.errors import ConfigError
from aepo.tools.registry import ToolSpec, register_tool
from aepo.tools.runner import truncate_result

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
SCRATCH_PREFIX = "aepo-sandbox-"

_CHILD = Path(__file__).with_name("sandbox_child.py")
_RUNNER = Path(__file__).with_name("sandbox_runner.py")
_SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32",
                        "/usr/libx32")
_PROBE_TIMEOUT_S = 20.0
_BACKSTOP_S = 2.0  # the parent kills the whole tree this long after the inner watchdog should have
_DRAIN_AFTER_KILL_S = 1.0
_GRACE_AFTER_EXIT_S = 0.25  # output still in flight when the program has exited
_STDERR_TAIL_CHARS = 800
_STALE_AFTER_S = 60.0
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


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a failure of the program it was given)."""


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


def _host_root() -> bool:
    """True when this process is the host's root (uid 0 mapped to uid 0 of the first namespace):
    then the sandbox can map its program to an unprivileged host uid."""
    return os.geteuid() == 0 and _nproc_does_not_bind()


def _nproc_does_not_bind() -> bool:
    """True when RLIMIT_NPROC cannot stop a fork bomb: the caller is (mapped to) the host's root."""
    uid = os.geteuid()
    if uid == 0:
        return True
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, outside, count = map(int, line.split())
                if inside <= uid < inside + count:
                    return outside + (uid - inside) == 0
    except (OSError, ValueError):
        pass
    return False


# ----------------------------------------------------------------------------- what Python needs

_LAYOUT_SCRIPT = r"""
import json, os, site, sys, sysconfig
paths = {os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
paths.update(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
paths.update(site.getsitepackages())
paths.update(p for p in sys.path if p.endswith("lib-dynload"))
libdir = sysconfig.get_config_var("LIBDIR") or ""
if libdir and os.path.exists(os.path.join(libdir, sysconfig.get_config_var("LDLIBRARY") or "-")):
    paths.add(libdir)
cfg = os.path.join(sys.prefix, "pyvenv.cfg")
if os.path.exists(cfg):
    paths.add(cfg)
print(json.dumps(sorted(p for p in paths if p and os.path.exists(p))))
"""
_layout_cache: dict[str, list[str]] = {}


def _minimal_cover(paths: list[str]) -> list[str]:
    """The paths that are not inside another one of them (binding those binds them all)."""
    kept: list[str] = []
    for p in sorted({os.path.normpath(p) for p in paths}):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return kept


def python_binds(python: str) -> list[str]:
    """Host paths bound read-only into the strict sandbox for interpreter `python`."""
    if python not in _layout_cache:
        try:
            done = subprocess.run([python, "-I", "-c", _LAYOUT_SCRIPT], capture_output=True, text=True,
                                  timeout=60, env={})
            paths = json.loads(done.stdout) if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            paths = None
        if not isinstance(paths, list):
            raise SandboxError(f"cannot ask the interpreter {python!r} where its files are")
        system = [d for d in _SYSTEM_LIBRARY_DIRS if os.path.lexists(d)]
        # A symlinked system directory (/lib -> usr/lib) is recreated as a link to its target.
        targets = [os.path.realpath(d) for d in system if os.path.islink(d)]
        links = [d for d in system if os.path.islink(d)]
        _layout_cache[python] = links + _minimal_cover([d for d in system if not os.path.islink(d)]
                                                      + targets + paths)
    return _layout_cache[python]


# ----------------------------------------------------------------------------- scratch directories


def _owner_pid(name: str) -> int | None:
    parts = name[len(SCRATCH_PREFIX):].split("-", 1)
    return int(parts[0]) if parts and parts[0].isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch_dirs(directory: str | Path | None = None) -> list[Path]:
    """Remove this user's sandbox scratch directories left by runs that were killed.

    A directory is in use while its owner holds an flock on it; one whose lock is free is stale
    when its owner process is gone (or, for a reused PID, when it is older than a minute).
    Returns the removed paths.
    """
    removed = []
    base = Path(directory or tempfile.gettempdir())
    try:
        entries = list(base.glob(SCRATCH_PREFIX + "*"))
    except OSError:
        return removed
    for path in entries:
        try:
            st = path.lstat()
            if not path.is_dir() or path.is_symlink() or st.st_uid != os.geteuid():
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use
            owner = _owner_pid(path.name)
            if (owner is not None and not _pid_alive(owner)) or time.time() - st.st_mtime > _STALE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d stale sandbox scratch directories under %s", len(removed), base)
    return removed


class _ScratchDir:
    """A host directory for one run, locked (flock) while in use and removed afterwards."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


# ----------------------------------------------------------------------------- program uids

PROGRAM_UID_BASE = int(os.environ.get("AEPO_SANDBOX_UID_BASE", "1900000000"))
"""Under a root trainer, run k's program runs as host uid PROGRAM_UID_BASE + slot (and the same
gid), a uid no account or file of the host has; AEPO_SANDBOX_UID_BASE moves the range."""
PROGRAM_UID_SLOTS = 256
_SLOT_DIR = Path("/run/aepo-sandbox-slots")


class _UidSlot:
    """An unprivileged host uid held by one sandbox run at a time across every process of the
    host (an flock on a slot file), so no two concurrent programs share one process budget."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self._fd: int | None = None

    def __enter__(self) -> int:
        directory = _SLOT_DIR if os.access("/run", os.W_OK) else Path(tempfile.gettempdir(), "aepo-sandbox-slots")
        directory.mkdir(mode=0o700, exist_ok=True)
        st = directory.lstat()
        if not directory.is_dir() or directory.is_symlink() or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise SandboxError(f"{directory} must be a directory of this user that no one else can write; "
                               "remove it and run again")
        start = (os.getpid() * 31 + threading.get_ident()) % PROGRAM_UID_SLOTS
        order = [(start + i) % PROGRAM_UID_SLOTS for i in range(PROGRAM_UID_SLOTS)]
        for i, slot in enumerate(order):
            fd = os.open(directory / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if i == len(order) - 1 else fcntl.LOCK_NB))
            except OSError:
                os.close(fd)
                continue
            self._fd, self.uid = fd, PROGRAM_UID_BASE + slot
            return self.uid
        raise SandboxError("no sandbox uid slot could be locked")  # pragma: no cover - the last one blocks

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


class _NoSlot:
    """An ordinary user's sandbox: the program keeps the user's own uid (the only one it may map)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass


def _uid_slot() -> _UidSlot | _NoSlot:
    return _UidSlot() if _host_root() else _NoSlot()


# ----------------------------------------------------------------------------- one launch


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
    """Start the child (`sandbox_child.py`), feed it `code`, collect bounded output; the parent
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
    return _RUNNER.read_text(encoding="utf-8")


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
