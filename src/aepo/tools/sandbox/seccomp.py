"""The sandbox's system-call filter (seccomp, classic BPF), built by the child (`child.py`) for
the program: standard library only, loaded by path when the child runs as a script.

Refused with EPERM: new namespaces, mounts, tracing, kernel keyrings, BPF, perf, io_uring,
modules, anonymous memory files (DENIED); sockets of any family but AF_INET/AF_INET6; signals and
limits aimed at PID 1 (the supervisor); with `deny_fork`, new processes (threads still work).
"""

from __future__ import annotations

import platform

__all__ = ["CLONE_THREAD", "DENIED", "NAMESPACE_FLAGS", "PID_TARGETED", "SOCKET_FAMILIES", "SetupError",
           "filter_program"]

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x80
CLONE_THREAD = 0x00010000
NAMESPACE_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                   | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME)


class SetupError(RuntimeError):
    """A wall of the sandbox could not be built (reported to the parent as `setup failed: ...`)."""



# --------------------------------------------------------------------------- system calls
# Per architecture: (seccomp audit arch, {name: number}). Numbers from the kernel's unistd tables.
_ARCH = {
    "x86_64": (0xC000003E, {
        "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "ptrace": 101, "syslog": 103,
        "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167,
        "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175,
        "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "kexec_load": 246,
        "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310,
        "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
        "userfaultfd": 323, "memfd_create": 319, "prlimit64": 302, "kill": 62, "tkill": 200,
        "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    }),
    "aarch64": (0xC00000B7, {
        "socket": 198, "clone": 220, "lookup_dcookie": 18, "umount2": 39, "mount": 40,
        "pivot_root": 41, "chroot": 51, "quotactl": 60, "acct": 89, "unshare": 97, "kexec_load": 104,
        "init_module": 105, "delete_module": 106, "syslog": 116, "ptrace": 117, "reboot": 142,
        "add_key": 217, "request_key": 218, "keyctl": 219, "swapon": 224, "swapoff": 225,
        "perf_event_open": 241, "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "finit_module": 273, "bpf": 280,
        "userfaultfd": 282, "kexec_file_load": 294, "memfd_create": 279, "prlimit64": 261, "kill": 129,
        "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240,
    }),
}
# Numbered alike on every architecture (added after the tables were unified).
_COMMON = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
           "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
           "pidfd_send_signal": 424, "pidfd_open": 434, "clone3": 435, "mount_setattr": 442,
           "memfd_secret": 447}
DENIED = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "ptrace", "process_vm_readv",
    "process_vm_writev", "bpf", "keyctl", "add_key", "request_key", "perf_event_open",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "name_to_handle_at",
    "open_by_handle_at", "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog",
    "lookup_dcookie", "iopl", "ioperm", "memfd_create", "memfd_secret",
)
"""Refused with EPERM: namespaces, mounts, tracing, kernel keyrings, BPF, perf, io_uring,
modules and other administration (the usual kernel-exploit surface), and anonymous memory
files (memfd: shared memory that the address-space limit does not count)."""
SOCKET_FAMILIES = (2, 10)
"""The only socket families allowed: AF_INET and AF_INET6 (in an empty network namespace). Unix,
netlink, packet, vsock (the hypervisor's, shared with the host) and every other family: EPERM."""
PID_TARGETED = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "prlimit64")
"""Calls refused when their first argument is PID 1 (the sandbox's supervisor); prlimit64 is
also refused for any process but the caller (pid 0)."""


def filter_program(deny_fork: bool) -> list[tuple[int, int, int, int]]:
    """Classic BPF for seccomp: deny DENIED, clone3 and namespace flags in clone, sockets of any
    family but SOCKET_FAMILIES, signals and limits aimed at the supervisor (PID_TARGETED), and
    (`deny_fork`) every new process; allow the rest of the native ABI."""
    machine = platform.machine()
    if machine not in _ARCH:
        raise SetupError(f"no system-call filter for architecture {machine}")
    arch, table = _ARCH[machine]
    nr = {**table, **_COMMON}
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|..|K, BPF_RET|K
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    EPERM, EAGAIN, ENOSYS = ERRNO | 1, ERRNO | 11, ERRNO | 38
    code: list[tuple] = []  # (op, jt, jf, k); jt/jf may be labels, resolved below

    def jump_if(op: int, k: int, label: str) -> None:
        code.append((op, label, 0, k))

    code += [(LD, 0, 0, 4)]  # seccomp_data.arch
    code += [(JEQ, 1, 0, arch), (RET, 0, 0, ENOSYS)]  # another ABI (e.g. 32-bit calls): refused
    code += [(LD, 0, 0, 0)]  # seccomp_data.nr
    if machine == "x86_64":
        jump_if(JGE, 0x40000000, "enosys")  # the x32 ABI
    for name in DENIED:
        if name in nr:
            jump_if(JEQ, nr[name], "eperm")
    jump_if(JEQ, nr["clone3"], "enosys")  # its flags are out of reach: libc falls back to clone
    if deny_fork:
        for name in ("fork", "vfork"):
            if name in nr:
                jump_if(JEQ, nr[name], "eagain")
    jump_if(JEQ, nr["socket"], "socket")
    jump_if(JEQ, nr["clone"], "clone")
    jump_if(JEQ, nr["prlimit64"], "prlimit")
    for name in PID_TARGETED:
        if name != "prlimit64":
            jump_if(JEQ, nr[name], "pid_arg")
    code += [(RET, 0, 0, ALLOW)]
    labels = {"socket": len(code)}
    code += [(LD, 0, 0, 16)]  # args[0] (low half): the address family
    for family in SOCKET_FAMILIES:
        jump_if(JEQ, family, "allow")
    code += [(RET, 0, 0, EPERM)]
    labels["clone"] = len(code)
    code += [(LD, 0, 0, 16)]  # args[0]: clone flags
    jump_if(JSET, NAMESPACE_FLAGS, "eperm")
    if deny_fork:
        code += [(JSET, 1, 0, CLONE_THREAD), (RET, 0, 0, EAGAIN)]  # a thread is fine
    code += [(RET, 0, 0, ALLOW)]
    # A pid is an int: the kernel reads only the low half of the argument, and so does the filter.
    labels["prlimit"] = len(code)  # only the caller's own limits (pid 0)
    code += [(LD, 0, 0, 16)]
    jump_if(JEQ, 0, "allow")
    code += [(RET, 0, 0, EPERM)]
    labels["pid_arg"] = len(code)  # pid 1: the supervisor
    code += [(LD, 0, 0, 16)]
    jump_if(JEQ, 1, "eperm")
    code += [(RET, 0, 0, ALLOW)]
    for name, value in (("eperm", EPERM), ("eagain", EAGAIN), ("enosys", ENOSYS), ("allow", ALLOW)):
        labels[name] = len(code)
        code.append((RET, 0, 0, value))
    resolved = []
    for i, (op, jt, jf, k) in enumerate(code):
        if isinstance(jt, str):
            jt = labels[jt] - i - 1
            if not 0 <= jt < 256:
                raise SetupError("system-call filter jump out of range")
        resolved.append((op, jt, jf, k))
    return resolved

