"""The sandbox's child side: build the walls, then run the program (see `aepo.tools.sandbox`).

Run by the parent as `python -I -S child.py SETTINGS_JSON`, with the program's source
on standard input and a private status pipe. Standard library only: it runs before (and, after
`pivot_root`, without) the host's file system. Process layout in "strict" mode:

    parent (trainer)
      └─ setup      new user, mount, PID, network, IPC, UTS and cgroup namespaces; waits
          │         (as the host's root, a short-lived "mapper" child maps the namespace's
          │         uids from outside: inside 0 -> host 0 for setup, PROGRAM_UID -> the run's
          │         unprivileged host uid)
          └─ init   PID 1 of the new PID namespace: builds the minimal root, pivots into it,
              │     sets the namespace's limits, drops every capability, supervises
              │     (wall-clock watchdog on a pidfd, no signal handler) and reports
              └─ program   own session, rlimits, then (host root) PROGRAM_UID, seccomp filter,
                           then `python -I -c <runner>`

Every link dies with the one above it (`PR_SET_PDEATHSIG`), and when init dies the kernel
kills everything left in its PID namespace: a killed trainer leaves no process behind. In
"limits-only" mode there are no namespaces: setup supervises the program directly in a scratch
directory on the host.

Status lines written to the status pipe: `setup failed: <why>` or
`{"returncode": int, "timed_out": bool}`; in probe mode the program prints a JSON report of
what it could and could not do instead of running code.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import os
import platform
import resource
import select
import signal
import socket
import struct
import sys
import time
from types import ModuleType

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _sibling(name: str) -> ModuleType:
    """A module of this folder: imported from the package when the child is imported (tests),
    loaded by path when it runs as a script (`python -I -S child.py`: no package, no sys.path
    entry for this folder)."""
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"aepo_sandbox_{name}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


seccomp = _sibling("seccomp")
SetupError = seccomp.SetupError
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = (seccomp.CLONE_NEWNS, seccomp.CLONE_NEWCGROUP,
                                                            seccomp.CLONE_NEWUTS, seccomp.CLONE_NEWIPC)
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = seccomp.CLONE_NEWUSER, seccomp.CLONE_NEWPID, seccomp.CLONE_NEWNET


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 0x4000
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
MNT_DETACH = 2
PROC_MASKED = ("kcore", "kpageflags", "kpagecount", "kpagecgroup", "slabinfo", "pagetypeinfo", "key-users",
               "vmallocinfo", "sysrq-trigger", "timer_list", "sched_debug", "kmsg", "config.gz")
"""/proc files hidden behind /dev/null (with every other top-level /proc file that only root may
read): kernel memory maps, allocator state and key accounting of the whole host."""
NAMESPACE_SYSCTLS = {
    # the user namespace's own counters: each is also charged to the host user that made it
    "user/max_inotify_instances": "8", "user/max_inotify_watches": "1024",
    "user/max_fanotify_groups": "0", "user/max_fanotify_marks": "0",
    "user/max_user_namespaces": "0", "user/max_mnt_namespaces": "0", "user/max_pid_namespaces": "0",
    "user/max_net_namespaces": "0", "user/max_ipc_namespaces": "0", "user/max_uts_namespaces": "0",
    "user/max_cgroup_namespaces": "0", "user/max_time_namespaces": "0",
    # the IPC namespace's System V and POSIX IPC: shared memory that no rlimit counts
    "kernel/shmmax": "0", "kernel/shmall": "0", "kernel/shmmni": "0", "kernel/msgmni": "0",
    "kernel/sem": "0 0 0 0", "fs/mqueue/queues_max": "0",
}
"""Limits of the sandbox's own namespaces, written before the program starts; /proc/sys is then
read-only."""
OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 24, 38, 22
SECCOMP_MODE_FILTER = 2

WRITABLE_DIRS = ("/tmp", "/run", "/var", "/home", "/root", "/dev/shm")
"""Fresh directories of one size-limited tmpfs (the program's only writable storage), with the
working directory: the first of WORKDIRS that holds none of the read-only binds."""
WORKDIRS = ("/work", "/sandbox", "/aepo-work")
DEVICES = ("null", "zero", "full", "random", "urandom")
PROGRAM_UID = 1000
"""Inside uid the program switches to when the trainer is the host's root (mapped to the run's
own unprivileged host uid, so the kernel's checks against host uid 0 never see the program)."""
ETC_FILES = {
    "passwd": f"root:x:0:0:sandbox:/root:/sbin/nologin\nsandbox:x:{PROGRAM_UID}:{PROGRAM_UID}:sandbox:/root:"
              "/sbin/nologin\n",
    "group": f"root:x:0:\nsandbox:x:{PROGRAM_UID}:\n",
    "hosts": "127.0.0.1 localhost\n::1 localhost\n",
}


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def prctl(option: int, arg: int, what: str) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise SetupError(f"{what}: {_errno_text()}")


def die_with_parent(parent_pid: int | None) -> None:
    """SIGKILL this process when its parent dies; exit now if it already has."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise SetupError(f"mount {source or fstype or ''} on {target}: {_errno_text()}")


def install_filter(deny_fork: bool) -> None:
    """Install the seccomp filter on this process (inherited by everything it starts)."""
    program = seccomp.filter_program(deny_fork)
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program), ctypes.addressof(buf))
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise SetupError("seccomp filter: " + _errno_text())


# --------------------------------------------------------------------------- namespaces, root


def _map_from_outside(child_pid: int, host_id: int) -> None:
    """As the host's root, outside the new user namespace: inside 0 -> host 0 (setup binds
    root-only paths) and PROGRAM_UID -> the run's unprivileged host uid (and gid, the same number)."""
    for name in ("uid_map", "gid_map"):
        text = f"0 0 1\n{PROGRAM_UID} {host_id} 1\n"
        with open(f"/proc/{child_pid}/{name}", "w") as f:
            f.write(text)


def enter_namespaces(host_uid: int | None) -> None:
    """New user, mount, PID, network, IPC, UTS and cgroup namespaces.

    An ordinary user maps its own uid to root inside (the only map it may write). The host's
    root (`host_uid` given) maps from outside, through a child that stays in the host's
    namespace, so that the program can later switch to PROGRAM_UID, an unprivileged host uid.
    """
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    mapper = None
    if host_uid is not None:
        go_read, go_write = os.pipe()
        done_read, done_write = os.pipe()
        me = os.getpid()
        mapper = os.fork()
        if mapper == 0:
            os.close(go_write)
            os.close(done_read)
            code = 1
            try:
                if os.read(go_read, 1) == b"1":
                    _map_from_outside(me, host_uid)
                    code = 0
            except BaseException as exc:  # noqa: BLE001 - reported through the pipe, then exit
                os.write(done_write, str(exc).encode()[:400])
            os._exit(code)
        os.close(go_read)
        os.close(done_write)
    try:
        if libc.unshare(flags | CLONE_NEWCGROUP) != 0 and libc.unshare(flags) != 0:
            raise SetupError("unshare (user namespaces): " + _errno_text())
        if mapper is None:
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            return
        os.write(go_write, b"1")
        why = os.read(done_read, 512).decode(errors="replace")
        _, status = os.waitpid(mapper, 0)
        mapper = None
        if status != 0:
            raise SetupError(f"map the sandbox's uids from outside: {why or 'mapper failed'} (under root the program "
                             f"runs as an unprivileged uid, which needs CAP_SETUID and CAP_SETGID: grant them, or "
                             f"run the trainer as an ordinary user)")
    finally:
        if mapper is not None:  # unshare failed: release the mapper
            os.write(go_write, b"0")
            os.waitpid(mapper, 0)
        if host_uid is not None:
            os.close(go_write)
            os.close(done_read)


def _unescape(path: str) -> str:
    return path.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def _mounts_under(root: str) -> list[tuple[str, int]]:
    """(mount point, its per-mount flags) of every mount at or below `root`, in mount order."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = _unescape(fields[4])
            if target == root or target.startswith(root + "/"):
                flags = 0
                for option in fields[5].split(","):
                    flags |= OPTION_FLAGS.get(option, 0)
                found.append((target, flags))
    return found


def _bind_readonly_source(path: str, root: str) -> None:
    """Mirror host `path` at root+path: a symlink as a symlink, a file or directory as a bind."""
    target = root + path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(path):
        if not os.path.lexists(target):
            os.symlink(os.readlink(path), target)
        return
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    elif os.path.exists(path):
        if not os.path.exists(target):
            open(target, "w").close()
    else:
        return
    mount(path, target, None, MS_BIND | MS_REC)


def build_root(cfg: dict) -> None:
    """Assemble the program's whole file system on a tmpfs at cfg["root"] and pivot into it.

    Read-only: cfg["binds"] (the interpreter, its libraries and packages). Writable, one shared
    size-limited tmpfs: WRITABLE_DIRS. Also a fresh /proc (this PID namespace), a few device
    files and a minimal /etc. Nothing else of the host exists inside.
    """
    root = cfg["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    scratch = root + "/.scratch"
    os.mkdir(scratch)
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dk,mode=0755" % (cfg["scratch_mb"] * 1024))
    workdir = next(w for w in WORKDIRS if not any((b + "/").startswith(w + "/") for b in cfg["binds"]))
    writable = set()
    owner = PROGRAM_UID if cfg["host_uid"] is not None else 0
    for d in (*WRITABLE_DIRS, workdir):
        source = scratch + "/" + d.strip("/").replace("/", "_")
        os.mkdir(source)
        os.chmod(source, 0o1777 if d in ("/tmp", "/dev/shm") else 0o755)
        os.chown(source, owner, owner)
        os.makedirs(root + d, exist_ok=True)
        mount(source, root + d, None, MS_BIND)
        writable.add(root + d)
    for path in cfg["binds"]:
        _bind_readonly_source(path, root)
    os.makedirs(root + "/proc", exist_ok=True)
    for name in DEVICES:
        device = root + "/dev/" + name
        open(device, "w").close()
        mount("/dev/" + name, device, None, MS_BIND)
        writable.add(device)
    try:  # a fresh procfs shows only this PID namespace; without it, there is no /proc at all
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        pass
    else:
        writable.update(_seal_proc(root + "/proc"))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, root + "/dev/" + name)
    os.makedirs(root + "/etc", exist_ok=True)
    for name, text in ETC_FILES.items():
        with open(root + "/etc/" + name, "w") as f:
            f.write(text)
    if libc.umount2(scratch.encode(), MNT_DETACH) != 0:
        raise SetupError("umount scratch: " + _errno_text())
    os.rmdir(scratch)
    for target, flags in _mounts_under(root):
        if target != root and target not in writable:
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)
    os.chdir(root)
    os.mkdir(".old")
    if libc.syscall(_ARCH_PIVOT_ROOT, b".", b".old") != 0:
        raise SetupError("pivot_root: " + _errno_text())
    os.chdir("/")
    if libc.umount2(b"/.old", MNT_DETACH) != 0:
        raise SetupError("detach the host root: " + _errno_text())
    os.rmdir("/.old")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(workdir)


def set_namespace_limits(proc: str) -> None:
    """Write NAMESPACE_SYSCTLS (the sandbox's own namespaces; the host's are never touched)."""
    for key, value in NAMESPACE_SYSCTLS.items():
        path = f"{proc}/sys/{key}"
        if not os.path.exists(path):
            continue  # a kernel without this counter
        with open(path, "w") as f:
            f.write(value)


def _seal_proc(proc: str) -> list[str]:
    """Set the namespace limits, then make `proc`/sys read-only and mask root-only files.
    Returns the /proc mounts that stay as they are (not remounted read-only by the caller)."""
    set_namespace_limits(proc)
    mount(proc + "/sys", proc + "/sys", None, MS_BIND | MS_REC)
    for name in sorted(os.listdir(proc)):
        path = f"{proc}/{name}"
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if os.path.isfile(path) and not os.path.islink(path) and (name in PROC_MASKED or not st.st_mode & 0o004):
            mount("/dev/null", path, None, MS_BIND)
    return [proc]  # the rest (sys, the masks) is remounted read-only with the root's binds


_ARCH_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine(), -1)


def drop_capabilities() -> None:
    """Empty the capability bounding set: the program, exec'd later, gets no capability."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails harmlessly where there are none to drop
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


# --------------------------------------------------------------------------- program, probe


def probe_report(cfg: dict) -> dict:
    """What the program could do, checked from inside (the parent decides what is acceptable)."""
    report: dict = {"root": sorted(os.listdir("/")), "canary_visible": os.path.exists(cfg["canary"])}
    for key, path in (("outside_writable", cfg["canary"] + ".w"), ("root_writable", "/aepo-probe")):
        try:
            with open(path, "w") as f:
                f.write("x")
            report[key] = True
        except OSError:
            report[key] = False
    report["unshare_blocked"] = libc.unshare(CLONE_NEWUSER) != 0
    for key, family in (("unix_socket_blocked", socket.AF_UNIX), ("vsock_blocked", 40)):
        try:
            socket.socket(family, socket.SOCK_STREAM).close()
            report[key] = False
        except OSError:
            report[key] = True
    report["memfd_blocked"] = not hasattr(os, "memfd_create")
    if hasattr(os, "memfd_create"):
        try:
            os.close(os.memfd_create("probe"))
        except OSError:
            report["memfd_blocked"] = True
    try:  # opened for writing only: nothing is written
        with open("/proc/sys/kernel/hostname", "w"):
            pass
        report["proc_sys_writable"] = True
    except OSError:
        report["proc_sys_writable"] = False
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        report["can_fork"] = True
    except OSError:
        report["can_fork"] = False
    return report


def become_program_user() -> None:
    """Switch to PROGRAM_UID (mapped to the run's unprivileged host uid): host-root checks
    (/proc/sys, root-only files) no longer match, RLIMIT_NPROC binds threads and processes, and
    the supervisor (another uid) cannot be signalled. Every capability is gone afterwards."""
    os.setgroups([])
    os.setresgid(PROGRAM_UID, PROGRAM_UID, PROGRAM_UID)
    os.setresuid(PROGRAM_UID, PROGRAM_UID, PROGRAM_UID)


def run_program(cfg: dict, status_fd: int) -> None:
    """In the program's process: own session, limits, uid, filter, then exec the runner (never returns)."""
    try:
        die_with_parent(None)
        os.setsid()  # its own session and group: it can signal nothing of the setup's
        for name, value in cfg["limits"].items():
            resource.setrlimit(getattr(resource, name), tuple(value))
        if cfg["namespaces"] and cfg["host_uid"] is not None:
            become_program_user()
        filtered = True
        try:
            install_filter(cfg["deny_fork"])
        except SetupError:
            if cfg["require_filter"]:
                raise
            filtered = False
        if cfg["probe"]:
            print(json.dumps({**probe_report(cfg), "filter": filtered}), flush=True)
            os._exit(0)
        python = cfg["python"]
        os.execve(python, [python, "-I", "-X", "utf8", "-c", cfg["runner"], cfg["tag"]], cfg["env"])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised past here
        os.write(status_fd, ("setup failed: %s: %s\n" % (type(exc).__name__, exc)).encode())
        os._exit(125)


def _quiet() -> None:
    """Point this process's standard streams at /dev/null: nothing of the supervisor's (a
    traceback with host paths) can reach the program's output, which the model reads."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _wait_until(child: int, deadline: float) -> int | None:
    """The child's wait status, or None at the deadline. Waits on a pidfd, so no signal
    (the program's or anyone's) can cut the wait short or fake a timeout."""
    try:
        pidfd = os.pidfd_open(child)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(remaining, 0.01))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def supervise(cfg: dict, status_fd: int) -> None:
    """Start the program, stop it at the wall-clock limit, end its leftovers, report (never returns).

    As PID 1 of the namespace with no signal handler, the kernel drops every signal the
    program sends it; it is also not dumpable, so the program cannot read or write its memory."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    deadline = time.monotonic() + cfg["timeout"]
    child = os.fork()
    if child == 0:
        run_program(cfg, status_fd)
    _quiet()

    def end_all() -> None:
        try:
            if cfg["namespaces"]:
                os.kill(-1, signal.SIGKILL)  # as PID 1: every other process of the namespace
            else:
                os.killpg(child, signal.SIGKILL)
        except OSError:
            pass

    wait_status = _wait_until(child, deadline)
    timed_out = wait_status is None
    end_all()  # the program at the deadline, or the background processes it left running
    if timed_out:
        _, wait_status = os.waitpid(child, 0)
    status = {"returncode": os.waitstatus_to_exitcode(wait_status), "timed_out": timed_out}
    os.write(status_fd, (json.dumps(status) + "\n").encode())
    os._exit(0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the program never sees it (close-on-exec)
    try:
        die_with_parent(cfg["parent_pid"])
        if cfg["namespaces"]:
            enter_namespaces(cfg["host_uid"])
            die_with_parent(cfg["parent_pid"])
            init = os.fork()  # the first child is PID 1 of the new PID namespace
            if init:
                _quiet()
                _, wait_status = os.waitpid(init, 0)
                code = os.waitstatus_to_exitcode(wait_status)
                os._exit(code if code >= 0 else 128 - code)
            die_with_parent(None)
            build_root(cfg)
        else:
            os.chdir(cfg["root"])
        os.umask(0o077)
        drop_capabilities()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        os.write(status_fd, ("setup failed: %s: %s\n" % (type(exc).__name__, exc)).encode())
        os._exit(125)
    supervise(cfg, status_fd)


if __name__ == "__main__":
    main()
