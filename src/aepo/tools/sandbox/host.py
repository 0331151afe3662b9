"""The sandbox's host side: what Python needs bound into the minimal root, the scratch
directories of runs (and removal of dead runs' leftovers), and the unprivileged host uid a run's
program gets under a root trainer (`aepo.tools.sandbox`)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger("aepo.tools.sandbox")  # one logger for the whole boundary

SCRATCH_PREFIX = "aepo-sandbox-"
_SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32",
                        "/usr/libx32")
_STALE_AFTER_S = 60.0


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a failure of the program it was given)."""


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
