"""Take each wall of the Python sandbox away in turn and show which hostile case then breaks.

    python tests/tools/sandbox_walls.py [MUTATION ...]      # as root; also runs the cases as nobody

Each mutation edits a copy of the package (never the checkout) and runs tests/tools/sandbox_hostile.py
against it, as the current user and (when root, with setpriv) as nobody. A wall whose removal
breaks no case would be untested; the walls overlap on purpose (under a root trainer the uid
switch alone also keeps /proc/sys and root-only files shut), so some mutations remove two.
Not a pytest file: about 12 s per mutation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parents[1] / "src" / "aepo"

MUTATIONS = {
 "no_uid_switch": [("sandbox/host.py", "return _UidSlot() if _host_root() else _NoSlot()", "return _NoSlot()")],
 "no_proc_sys_ro": [("sandbox/child.py", '    mount(proc + "/sys", proc + "/sys", None, MS_BIND | MS_REC)\n', ""),
                    ("sandbox/__init__.py", '("proc_sys_writable", True, "/proc/sys is writable"),', "")],
 "no_ns_sysctls": [("sandbox/child.py", "    set_namespace_limits(proc)\n", "")],
 "no_mask_no_uid_switch": [("sandbox/child.py", 'and (name in PROC_MASKED or not st.st_mode & 0o004)', 'and False'),
                           ("sandbox/host.py", "return _UidSlot() if _host_root() else _NoSlot()", "return _NoSlot()")],
 "socket_denylist": [("sandbox/seccomp.py", "SOCKET_FAMILIES = (2, 10)", "SOCKET_FAMILIES = tuple(f for f in range(64) if f != 1)"),
                     ("sandbox/__init__.py", '("vsock_blocked", False, "vsock sockets are not refused"),', "")],
 "memfd_allowed": [("sandbox/seccomp.py", '"iopl", "ioperm", "memfd_create", "memfd_secret",', '"iopl", "ioperm",'),
                   ("sandbox/__init__.py", '("memfd_blocked", False, "memfd_create is not refused"),', "")],
 "no_ro_no_uid_switch": [("sandbox/child.py", '    mount(proc + "/sys", proc + "/sys", None, MS_BIND | MS_REC)\n', ""),
                    ("sandbox/__init__.py", '("proc_sys_writable", True, "/proc/sys is writable"),', ""),
                    ("sandbox/host.py", "return _UidSlot() if _host_root() else _NoSlot()", "return _NoSlot()")],
 "no_setsid": [("sandbox/child.py", "        os.setsid()  # its own session", "        pass  # its own session")],
 "init_handlers_no_pid1_filter": [("sandbox/child.py", '        signal.signal(signum, signal.SIG_DFL)', '        signal.signal(signum, signal.default_int_handler)'),
                     ("sandbox/seccomp.py", '    jump_if(JEQ, 1, "eperm")\n', '')],
}


def _run_cases(src: Path) -> dict[str, object]:
    site = sysconfig.get_paths()["purelib"]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    users = {"current": [sys.executable, str(HERE / "sandbox_hostile.py")]}
    if shutil.which("setpriv") and Path(f"/usr/bin/{version}").exists():
        users["nobody"] = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "env",
                           "-i", f"PYTHONPATH={src}:{site}", f"/usr/bin/{version}", str(HERE / "sandbox_hostile.py")]
    out: dict[str, object] = {}
    for who, command in users.items():
        env = {"PYTHONPATH": f"{src}:{site}", "PATH": "/usr/bin:/bin"}
        done = subprocess.run(command, capture_output=True, text=True, cwd="/tmp", env=env)
        try:
            report = json.loads(done.stdout)
            out[who] = {k: v for k, v in report.items() if v and k not in ("uid", "describe")}
        except ValueError:
            out[who] = "refused to start: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return out


def main() -> None:
    chosen = sys.argv[1:] or list(MUTATIONS)
    for name in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp).chmod(0o755)  # nobody reads the copy too
            src = Path(tmp, "src")
            shutil.copytree(PACKAGE, src / "aepo", ignore=shutil.ignore_patterns("__pycache__"))
            for path, old, new in MUTATIONS[name]:
                target = src / "aepo" / "tools" / path
                text = target.read_text()
                if old not in text:
                    raise SystemExit(f"{name}: the wall's code changed; update this script ({old!r})")
                target.write_text(text.replace(old, new))
            print(name, json.dumps(_run_cases(src), indent=1), flush=True)


if __name__ == "__main__":
    main()
