"""The Python sandbox against a hostile program: escapes the policy under training could find.

Each test names a way out (a host unix socket, a host file, the run's own answer key, a nested
namespace, a forbidden system call, surviving a killed trainer) and checks from the host side
that it stays shut. They run on the default "strict" mode, which refuses to start rather than
run weaker, so on a machine that cannot hold it they fail at the probe instead of passing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import sandbox_hostile  # the hostile programs, shared with the ordinary-user run
from typer.testing import CliRunner

import aepo
from aepo.cli import app
from aepo.config import ConfigError, ToolsConfig
from aepo.tools import build_tool_runner
from aepo.tools.sandbox import child as sandbox_child
from aepo.tools.sandbox import seccomp
from aepo.tools import sandbox as sandbox_module
from aepo.tools.sandbox import SCRATCH_PREFIX, PythonSandbox, SandboxError, remove_stale_scratch_dirs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the strict sandbox is Linux-only")


@pytest.fixture(scope="module")
def box() -> PythonSandbox:
    return PythonSandbox(timeout=3.0, cpu_seconds=2, memory_mb=256, max_output_chars=4000)


def test_strict_mode_is_in_force(box):
    isolation = box.isolation
    assert isolation.mode == "strict" and isolation.namespaces and isolation.minimal_root
    assert isolation.process_filter


# ----------------------------------------------------------------------------- unix sockets


def test_host_unix_socket_listener_is_unreachable(box, tmp_path):
    path = tmp_path / "host.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(0.3)
    os.chmod(tmp_path, 0o777)
    os.chmod(path, 0o777)  # file permissions would let anyone connect: only the sandbox stops it
    try:
        code = textwrap.dedent(f"""
            import os, socket
            print('visible', os.path.exists({str(path)!r}))
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect({str(path)!r})
            s.sendall(b'tmux new-window id')
            print('connected')
        """)
        result = box.run(code)
        assert result.stdout.startswith("visible False")
        assert "connected" not in result.stdout and not result.ok
        assert "PermissionError" in result.error  # socket(AF_UNIX) itself is refused
        with pytest.raises(socket.timeout):
            server.accept()  # the host listener never saw a connection
    finally:
        server.close()


def test_abstract_and_paired_unix_sockets(box):
    # An abstract-namespace socket (no file) is refused too; socketpair (asyncio's self-pipe)
    # connects nothing outside and keeps working.
    result = box.run("import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0aepo-test')")
    assert not result.ok and "PermissionError" in result.error
    assert box("import socket\na, b = socket.socketpair()\na.sendall(b'x')\nb.recv(1)") == "b'x'\n"
    assert box("import asyncio\nasync def f():\n    return 7\nasyncio.run(f())") == "7\n"


# ----------------------------------------------------------------------------- host files


def test_host_files_are_not_visible(box, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    secret.chmod(0o644)
    os.chmod(tmp_path, 0o755)
    package_dir = Path(aepo.__file__).resolve().parent
    code = textwrap.dedent(f"""
        import os
        for path in [{str(secret)!r}, {str(tmp_path)!r}, '/etc/shadow', '/etc/hostname',
                     {str(package_dir)!r}, {os.getcwd()!r}, {str(Path.home() / '.bashrc')!r}]:
            try:
                data = open(path).read()
                print(path, 'READ', len(data))
            except OSError as exc:
                print(path, type(exc).__name__)
    """)
    result = box.run(code)
    assert result.ok, result.error
    lines = result.stdout.splitlines()
    assert len(lines) == 7
    assert all("READ" not in line for line in lines), lines
    assert "hunter2" not in result.stdout


def test_root_holds_only_what_python_needs(box):
    result = box.run("import os\nsorted(os.listdir('/'))")
    assert result.ok, result.error
    top = set(eval(result.stdout))  # noqa: S307 - a list of names printed by repr
    allowed = {"etc", "proc", "dev", "tmp", "run", "var", "home", "root", "work", "sandbox", "aepo-work",
               "usr", "lib", "lib64", "lib32", "libx32"}
    # ... plus the top directories of the interpreter's own paths (a venv, pyenv, /opt/python)
    allowed |= {Path(p).parts[1] for p in sandbox_module.python_binds(box.python)}
    assert top <= allowed, top - allowed
    assert box("import os\nsorted(os.listdir('/etc'))") == "['group', 'hosts', 'passwd']\n"
    # a fresh /tmp, not the host's: empty, but for the interpreter's own read-only binds when its
    # environment lives under /tmp (a checkout cloned there)
    under_tmp = sorted({Path(p).parts[2] for p in sandbox_module.python_binds(box.python)
                        if len(Path(p).parts) > 2 and Path(p).parts[1] == "tmp"})
    assert box("import os\nsorted(os.listdir('/tmp'))") == f"{under_tmp}\n"


def test_the_runs_own_answer_key_is_unreadable(tmp_path):
    # The training data (data.train) and the demo world's question files hold the gold answers.
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "Who?", "answer": "GOLD-ANSWER-42"}) + "\n")
    world = tmp_path / "run" / "world"
    world.mkdir(parents=True)
    (world / "test.jsonl").write_text(json.dumps({"question": "When?", "answer": "GOLD-ANSWER-43"}) + "\n")
    runner = build_tool_runner(ToolsConfig(enabled=["python"], timeout=10.0, python_timeout=5.0))
    code = textwrap.dedent(f"""
        import os
        found, paths = [], [{str(train)!r}, {str(world / "test.jsonl")!r}]
        for top, dirs, files in os.walk('/'):  # every file the program can see, libraries aside
            dirs[:] = [d for d in dirs if d not in ('proc', 'usr', 'lib', 'site-packages', 'dev')]
            paths += [os.path.join(top, f) for f in files if f.endswith('.jsonl')]
        for path in paths:
            try:
                found.append(open(path).read())
            except OSError:
                pass
        print('GOLD' in ''.join(found), len(found))
    """)
    call = runner.run_one("python", code)
    assert call.ok and call.result.startswith("False"), call.result


# ----------------------------------------------------------------------------- system calls

_SYSCALL_PROBES = {  # name -> (x86_64 nr, aarch64 nr, args): unfiltered, these do NOT give EPERM
    "unshare": (272, 97, (0,)),  # unshare(0) succeeds
    "unshare-user": (272, 97, (0x10000000,)),
    "clone-newuser": (56, 220, (0x10000000 | 17, 0, 0, 0, 0)),
    "setns": (308, 268, (-1, 0)),  # EBADF
    "ptrace": (101, 117, (0, 0, 0, 0)),  # PTRACE_TRACEME succeeds
    "keyctl": (250, 219, (0, -3, 0)),  # KEYCTL_GET_KEYRING_ID succeeds
    "perf_event_open": (298, 241, (0, 0, -1, -1, 0)),  # EFAULT
    "io_uring_setup": (425, 425, (1, 0)),  # EFAULT
    "mount_setattr": (442, 442, (-1, 0, 0, 0, 0)),  # EBADF / EINVAL
    "process_vm_readv": (310, 270, (1, 0, 0, 0, 0, 0)),
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="syscall numbers for x86_64/aarch64")
def test_forbidden_system_calls_are_refused(box):
    column = 0 if platform.machine() == "x86_64" else 1
    lines = []
    for name, entry in _SYSCALL_PROBES.items():
        args = ", ".join(str(a) for a in entry[2])
        lines.append(f"print({name!r}, libc.syscall({entry[column]}, {args}), ctypes.get_errno())")
    code = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n" + "\n".join(lines)
    result = box.run(code)
    assert result.ok, result.error
    got = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in result.stdout.splitlines()}
    assert got == {name: (-1, 1) for name in _SYSCALL_PROBES}  # every one: EPERM


def test_nested_user_namespace_is_refused(box):
    code = textwrap.dedent("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.unshare(0x10000000), ctypes.get_errno())
        import os
        print(os.path.exists('/proc/self/ns/user'))
    """)
    result = box.run(code)
    assert result.ok, result.error
    assert result.stdout.splitlines()[0] == "-1 1"


def test_filter_numbers_match_the_kernel_headers():
    """The filter's system-call table against the C headers installed on this machine."""
    headers = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
               "aarch64": Path("/usr/include/asm-generic/unistd.h")}
    checked = 0
    for machine, header in headers.items():
        if not header.exists():
            continue
        defined = dict(re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", header.read_text()))
        table = {**seccomp._ARCH[machine][1], **seccomp._COMMON}
        for name, number in table.items():
            if name in defined:
                assert int(defined[name]) == number, (machine, name)
                checked += 1
    if not checked:
        pytest.skip("no kernel headers installed")
    assert checked >= 30


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
@pytest.mark.parametrize("deny_fork", [False, True])
def test_filter_program_is_well_formed(monkeypatch, machine, deny_fork):
    monkeypatch.setattr(seccomp.platform, "machine", lambda: machine)
    program = seccomp.filter_program(deny_fork)
    assert len(program) < 256
    denied = {seccomp._ARCH[machine][1].get(n, seccomp._COMMON.get(n)) for n in seccomp.DENIED}
    compared = {k for op, _, _, k in program if op == 0x15}
    assert denied - {None} <= compared
    for i, (op, jt, jf, _) in enumerate(program):
        if op in (0x15, 0x35, 0x45):
            assert i + 1 + jt < len(program) and i + 1 + jf < len(program)
    assert program[-1][0] == 0x06  # ends on a return


# ----------------------------------------------------------------------------- no leftovers


def _sandbox_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def test_killed_trainer_leaves_no_process_and_no_scratch_dir(tmp_path):
    script = textwrap.dedent("""
        import sys
        from aepo.tools.sandbox import PythonSandbox
        PythonSandbox(timeout=120, cpu_seconds=120).run("import time\\nprint('up', flush=True)\\ntime.sleep(120)")
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    trainer = subprocess.Popen([sys.executable, "-c", script], env=env)
    marker = f"{SCRATCH_PREFIX}{trainer.pid}-"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the program itself runs (its exec'd runner)
        if any(_argv(p)[1:4] == [b"-I", b"-X", b"utf8"] for p in _sandbox_processes(marker)):
            break
        time.sleep(0.05)
    else:
        trainer.kill()
        pytest.fail("the sandboxed program never started")
    assert len(_sandbox_processes(marker)) >= 3  # setup, init, program
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 5
    while _sandbox_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes(marker) == []  # every process of the run died with the trainer
    stale = list(tmp_path.glob(marker + "*"))
    assert len(stale) == 1  # nobody was left to remove it ...
    assert remove_stale_scratch_dirs(tmp_path) == stale  # ... until the next sandbox starts
    assert list(tmp_path.glob(SCRATCH_PREFIX + "*")) == []


def test_scratch_dir_in_use_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with sandbox_module._ScratchDir() as live:
        assert remove_stale_scratch_dirs(tmp_path) == []
        assert live.exists()
    other = tmp_path / f"{SCRATCH_PREFIX}999999999-x"  # no such process, no lock
    other.mkdir()
    assert remove_stale_scratch_dirs(tmp_path) == [other]


def test_sleeping_program_is_stopped_by_the_watchdog_inside(box):
    # The inner watchdog fires at `timeout`; the parent's backstop would come 2 s later.
    start = time.monotonic()
    result = box.run("import time\ntime.sleep(60)")
    elapsed = time.monotonic() - start
    assert result.timed_out and elapsed < box.timeout + 1.0
    _, watchdog_fired, _ = sandbox_module._parse_status(json.dumps({"returncode": -9, "timed_out": True}))
    assert watchdog_fired


def test_background_process_is_ended_with_the_program():
    box = PythonSandbox(timeout=3.0)
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('parent done')"
    start = time.monotonic()
    result = box.run(code)
    assert time.monotonic() - start < 2.0
    if box.isolation.process_limit == "seccomp":
        assert not result.ok and "BlockingIOError" in result.error  # no new process at all
    else:
        assert result.ok and result.stdout == "parent done\n"


# ----------------------------------------------------------------------------- the trainer as root
# Each case of tests/sandbox_hostile.py aims at one wall (host sysctls, threads past the process
# limit, root-only /proc files, non-IP sockets such as the hypervisor's vsock, shared memory
# outside the memory limit, signals to the supervisor, the setup process's group, the host
# user's inotify instances). Here they run as whoever runs the tests (root in CI); below, the
# same cases as an ordinary host user.


@pytest.fixture(scope="module")
def hostile_box():
    return sandbox_hostile.make_box()


@pytest.mark.parametrize("case", sandbox_hostile.ALL_CASES)
def test_hostile_program_is_held(hostile_box, case):
    assert sandbox_hostile.run_case(hostile_box, case) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the trainer is not root here")
def test_a_root_trainers_program_runs_as_an_unprivileged_host_uid(hostile_box):
    code = "import os\nprint(os.getuid(), open('/proc/self/uid_map').read().split())"
    out = hostile_box(code).split(maxsplit=1)
    assert out[0] == str(sandbox_child.PROGRAM_UID)
    uid_map = eval(out[1], {})
    host_uid = int(uid_map[uid_map.index(str(sandbox_child.PROGRAM_UID)) + 1])
    assert sandbox_module.PROGRAM_UID_BASE <= host_uid < sandbox_module.PROGRAM_UID_BASE + 256
    # fork works again (RLIMIT_NPROC binds a non-root uid), unlike under the no-fork fallback
    assert hostile_box(sandbox_hostile.FORK_STILL_WORKS) == "7\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="the trainer is not root here")
def test_concurrent_runs_hold_different_host_uids():
    with sandbox_module._UidSlot() as first, sandbox_module._UidSlot() as second:
        assert first != second
    done = subprocess.run(  # another process sees the slot as taken while this one holds it
        [sys.executable, "-c", "from aepo.tools.sandbox import _UidSlot\nwith _UidSlot() as u: print(u)"],
        capture_output=True, text=True, timeout=60)
    with sandbox_module._UidSlot() as held:
        other = subprocess.run(
            [sys.executable, "-c", "from aepo.tools.sandbox import _UidSlot\nwith _UidSlot() as u: print(u)"],
            capture_output=True, text=True, timeout=60)
        assert int(other.stdout) != held, other.stderr
    assert done.returncode == 0, done.stderr


def test_a_dead_supervisor_is_one_line_for_the_model_and_the_details_go_to_the_log(caplog):
    box = PythonSandbox()
    traceback_text = ('Traceback (most recent call last):\n  File "/home/me/aepo/src/aepo/tools/sandbox_child.py", '
                      'line 9, in supervise\nKeyboardInterrupt\n')
    launch = sandbox_module._Launch(stdout="partial\n", stderr=traceback_text, status="", exit_code=1,
                                    timed_out=False)
    with caplog.at_level("WARNING", logger="aepo.tools.sandbox"):
        result = box._result(launch)
    assert not result.ok and result.error == "Error: the sandbox stopped before the program finished"
    text = box.format(result)
    assert "/home/me" not in text and "Traceback" not in text
    assert "sandbox_child.py" in caplog.text  # the operator still sees what happened


def test_a_tool_exception_reaches_the_model_as_one_line(caplog):
    from aepo.tools.runner import ToolRunner

    def broken(argument: str) -> str:
        raise SandboxError("cannot start the sandbox process '/root/secret/venv/bin/python': boom\n"
                           "Traceback (most recent call last):\n  File \"/root/secret/x.py\"")

    broken.name = "python"
    with caplog.at_level("WARNING", logger="aepo.tools.runner"):
        [call] = ToolRunner([broken], timeout=5).run([("python", "1")])
    assert not call.ok and "\n" not in call.result and "x.py" not in call.result
    assert call.result.startswith("Error: SandboxError: cannot start the sandbox process")
    assert "x.py" in caplog.text


def test_cli_escapes_terminal_control_characters():
    from aepo.console import printable

    hostile = "a\x1b]52;c;aGk=\x07b\x1b[2Jc\x9bd\re\u202ef\x00g\tok\nline2"
    assert printable(hostile) == "a\\x1b]52;c;aGk=\\x07b\\x1b[2Jc\\x9bd\\x0de\\u202ef\\x00g\tok\nline2"
    assert printable("plain text, ümlaut, 中文\n") == "plain text, ümlaut, 中文\n"
    code = "print('\\x1b]52;c;aGk=\\x07 title \\x1b]0;owned\\x07 clear \\x1b[2J c1 \\x9b end')"
    done = CliRunner().invoke(app, ["tools", "python", code])
    assert done.exit_code == 0, done.output
    assert not any(ch in done.output for ch in "\x1b\x07\x9b")
    assert "\\x1b]52;c;aGk=\\x07" in done.output and done.output.rstrip().endswith("end")
    calc = CliRunner().invoke(app, ["tools", "calc", "1 +\x1b[2J 1"])
    assert "\x1b" not in calc.output


def _ordinary_user_python() -> list[str] | None:
    """A command that runs this test environment's code as an ordinary host user (nobody): the
    system interpreter of the same version (the venv's own may sit under root's home) with this
    environment's packages on its path. None where that cannot be arranged."""
    import sysconfig

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    paths = [sysconfig.get_paths()["purelib"], str(Path(aepo.__file__).resolve().parents[1])]
    env = ["env", "-i", f"PYTHONPATH={os.pathsep.join(paths)}"]
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}", shutil.which(version) or ""):
        if not candidate:
            continue
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", *env, candidate]
        check = subprocess.run([*command, "-c", "import aepo.tools.sandbox"], capture_output=True, cwd="/tmp")
        if check.returncode == 0:
            return command
    return None


def test_hostile_programs_are_held_for_an_ordinary_user_too():
    command = _ordinary_user_python()
    if command is None:
        pytest.skip("needs root (to become nobody), setpriv, and a system Python of this version that "
                    "nobody can run with this environment's packages")
    script = Path(__file__).with_name("sandbox_hostile.py")
    done = subprocess.run([*command, str(script)], capture_output=True, text=True, timeout=300, cwd="/tmp")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report.pop("uid") == 65534
    assert "program runs as the trainer's uid; process limit=rlimit" in report.pop("describe")
    assert report == {case: None for case in sandbox_hostile.ALL_CASES}


# ----------------------------------------------------------------------------- other users, kernels


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True).returncode == 0


_CHECK_SCRIPT = textwrap.dedent("""
    import os, sys
    from aepo.tools.sandbox import PythonSandbox, SandboxError
    box = PythonSandbox(timeout=5, mode=sys.argv[1])
    try:
        print(box.isolation.describe())
    except SandboxError as exc:
        print('REFUSED', exc)
        sys.exit(3)
    print(box('import os, socket\\nprint(os.path.exists(sys_path))'.replace('sys_path', repr(sys.argv[2]))).strip())
    print(box('import socket\\nsocket.socket(socket.AF_UNIX)').splitlines()[-1])
    print(os.geteuid())
""")


@pytest.mark.skipif(not _unshare_available(), reason="needs util-linux unshare and user namespaces")
def test_non_root_user_gets_the_same_protection(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    os.chmod(tmp_path, 0o755)
    done = subprocess.run(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c", _CHECK_SCRIPT,
         "strict", str(secret)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    describe, visible, unix, euid = done.stdout.splitlines()
    assert euid == "1000"  # not root, no capabilities
    assert "mode=strict" in describe and "minimal root (host files hidden)=yes" in describe
    assert "system-call filter" in describe and "=NO" not in describe
    assert visible == "False" and unix.startswith("PermissionError")


@pytest.mark.skipif(not _unshare_available(), reason="needs util-linux unshare and user namespaces")
def test_strict_refuses_where_user_namespaces_are_off_and_limits_only_is_named(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    no_userns = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c",
                 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]
    strict = subprocess.run([*no_userns, sys.executable, "-c", _CHECK_SCRIPT, "strict", str(secret)],
                            capture_output=True, text=True, timeout=120)
    if "REFUSED" not in strict.stdout and strict.returncode != 3:
        pytest.skip(f"could not switch user namespaces off here: {strict.stdout} {strict.stderr}")
    assert strict.returncode == 3
    assert "user namespaces" in strict.stdout and "limits-only" in strict.stdout
    weak = subprocess.run([*no_userns, sys.executable, "-W", "ignore", "-c", _CHECK_SCRIPT, "limits-only",
                           str(secret)], capture_output=True, text=True, timeout=120)
    assert weak.returncode == 0, weak.stdout + weak.stderr
    describe, visible, unix, _ = weak.stdout.splitlines()
    assert "mode=limits-only" in describe and "minimal root (host files hidden)=NO" in describe
    assert visible == "True"  # what limits-only does not protect, said plainly above


def test_a_run_refuses_to_start_with_a_sandbox_that_cannot_hold(monkeypatch):
    def refuse(python, mode):
        raise SandboxError("cannot start the strict Python sandbox (unshare: Operation not permitted)")

    monkeypatch.setattr(sandbox_module, "_isolation_cache", {})
    monkeypatch.setattr(sandbox_module, "_probe", refuse)
    with pytest.raises(ConfigError, match="tools.enabled has 'python' but cannot start the strict"):
        build_tool_runner(ToolsConfig(enabled=["python"]))
    done = CliRunner().invoke(app, ["tools", "python", "print(1)"])
    assert done.exit_code != 0 and "cannot start the strict Python sandbox" in done.output


def test_cli_verbose_reports_the_isolation():
    done = CliRunner().invoke(app, ["tools", "python", "--verbose", "print(6 * 7)"])
    assert done.exit_code == 0
    assert "mode=strict" in done.output and "minimal root (host files hidden)=yes" in done.output
    assert done.output.strip().endswith("42")
    bad = CliRunner().invoke(app, ["tools", "python", "--isolation", "off", "print(1)"])
    assert bad.exit_code == 2 and "error: --isolation" in bad.output and "strict, limits-only" in bad.output


def test_libc_is_still_usable_inside(box):
    # The walls must not break ordinary programs: ctypes, threads, files, numbers.
    code = textwrap.dedent("""
        import ctypes, threading, json, math
        out = []
        t = threading.Thread(target=lambda: out.append(math.factorial(10)))
        t.start(); t.join()
        open('/tmp/a.json', 'w').write(json.dumps(out))
        print(json.load(open('/tmp/a.json')), ctypes.CDLL(None).getpid() > 0)
    """)
    assert box(code) == "[3628800] True\n"



@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_root_trainer_without_setuid_is_refused_with_the_reason():
    """Under root the program must become an unprivileged uid; a root without CAP_SETUID (a
    container that dropped it) gets strict refused, saying so, never a program left as root."""
    code = ("from aepo.tools.sandbox import PythonSandbox, SandboxError\n"
            "try:\n    PythonSandbox().isolation\nexcept SandboxError as e:\n    print(e)\n")
    done = subprocess.run(["setpriv", "--bounding-set=-setuid,-setgid", "--inh-caps=-setuid,-setgid",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "needs CAP_SETUID and CAP_SETGID" in done.stdout, done.stdout + done.stderr
