"""Python sandbox: REPL-style output, and hostile programs that must come back as errors within
their limits while the host stays unharmed; `aepo tools python`."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aepo.cli import app
from aepo.tools import sandbox as sandbox_module
from aepo.tools.runner import TRUNCATION_MARK, ToolRunner
from aepo.tools.sandbox import CHILD_ENVIRONMENT, SCRATCH_PREFIX, PythonSandbox, SandboxResult

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the sandbox needs a POSIX system")


@pytest.fixture(scope="module")
def box() -> PythonSandbox:
    return PythonSandbox(timeout=2.0, cpu_seconds=1, memory_mb=256, max_output_chars=500)


def run_timed(box: PythonSandbox, code: str) -> tuple[SandboxResult, float]:
    start = time.monotonic()
    result = box.run(code)
    return result, time.monotonic() - start


# ----------------------------------------------------------------------------- normal programs


def test_output_and_repl_style_last_expression(box):
    assert box("print('hello')") == "hello\n"
    assert box("x = 6\nx * 7") == "42\n"
    assert box("'text'") == "'text'\n"  # repr, like the REPL
    assert box("x = 1\nx\ny = 2") == "(no output)"  # only a final expression is shown
    assert box("None") == "(no output)"
    assert box("print('a')\n[1, 2]") == "a\n[1, 2]\n"
    assert box("if __name__ == '__main__':\n    print('main')") == "main\n"
    result = box.run("import math\nmath.factorial(20)")
    assert result.ok and result.returncode == 0 and result.stdout == "2432902008176640000\n"
    assert result.error is None and not result.timed_out


def test_exception_gives_the_programs_own_traceback(box):
    result = box.run("def f(x):\n    return 1 / x\nf(0)")
    assert not result.ok and result.returncode == 1
    assert result.error.splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert 'File "<python>", line 2, in f' in result.error
    assert "<string>" not in result.error  # the runner's own frames are hidden
    text = box("print('before')\n1/0")
    assert text.startswith("before\n") and text.endswith("ZeroDivisionError: division by zero")


def test_syntax_error(box):
    result = box.run("def broken(:\n    pass")
    assert not result.ok
    assert result.error.splitlines()[-1].startswith("SyntaxError:")
    assert "<python>" in result.error


def test_sys_exit_status(box):
    result = box.run("import sys\nprint('partial')\nsys.exit(3)")
    assert result.returncode == 3 and not result.ok
    assert result.error == "Error: exit status 3"
    assert box.format(result) == "partial\nError: exit status 3"
    assert box.run("import sys; sys.exit(0)").ok


def test_huge_output_is_truncated(box):
    result, elapsed = run_timed(box, "print('x' * 10**7)")
    assert result.ok
    assert len(result.stdout) == box.max_output_chars and result.stdout.endswith(TRUNCATION_MARK)
    assert elapsed < 5


def test_scratch_directory_is_private_writable_and_removed(box):
    code = "import os\nopen('note.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))"
    result = box.run(code)
    assert result.ok, result.error
    cwd, listing = result.stdout.splitlines()
    assert listing == "['note.txt']"
    assert cwd in ("/work", "/sandbox", "/aepo-work")  # a fresh directory of the sandbox's own root
    second = box.run("import os\nsorted(os.listdir('.'))")
    assert second.stdout == "[]\n"  # nothing survives from one run to the next
    leftovers = list(Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}{os.getpid()}-*"))
    assert leftovers == []  # the host-side directory of each run is removed


def test_parent_environment_is_not_visible(box, monkeypatch):
    monkeypatch.setenv("AEPO_TEST_SECRET", "hunter2-very-secret")
    result = box.run(
        "import os\nprint(sorted(os.environ.items()))\nprint(os.environ.get('AEPO_TEST_SECRET'))"
    )
    assert result.ok, result.error
    assert "hunter2" not in result.stdout
    shown = dict(re.findall(r"\('([A-Z_]+)', '([^']*)'\)", result.stdout.splitlines()[0]))
    assert set(shown) - {"LC_CTYPE"} == set(CHILD_ENVIRONMENT)  # Python may add LC_CTYPE itself
    assert result.stdout.splitlines()[1] == "None"


def test_host_processes_and_their_environments_are_invisible(box, monkeypatch):
    if not box.isolation.pid_namespace:
        pytest.skip("no PID namespace: the caller's /proc/<pid>/environ may be readable")
    monkeypatch.setenv("AEPO_TEST_SECRET", "hunter2-in-proc")
    code = (
        "import os\nfound = []\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    for name in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            data = open(f'/proc/{pid}/{name}', 'rb').read()\n"
        "        except OSError:\n"
        "            continue\n"
        "        found.append(b'hunter2' in data)\n"
        "print(len(found) > 0, any(found), max(map(int, filter(str.isdigit, os.listdir('/proc')))) < 100)"
    )
    assert box(code) == "True False True\n"


# ----------------------------------------------------------------------------- hostile programs


def test_infinite_loop_is_stopped(box):
    result, elapsed = run_timed(box, "while True:\n    pass")
    assert not result.ok
    assert result.error in ("Error: CPU time limit exceeded (1s)", "Error: timed out after 2s")
    assert elapsed < box.timeout + 1.5


def test_sleeping_program_hits_the_wall_clock_timeout():
    box = PythonSandbox(timeout=1.0, cpu_seconds=5)
    result, elapsed = run_timed(box, "import time\nprint('start', flush=True)\ntime.sleep(60)")
    assert result.timed_out and result.error == "Error: timed out after 1s"
    assert result.stdout == "start\n"  # output before the kill is kept
    assert box.format(result) == "start\nError: timed out after 1s"
    assert 0.9 < elapsed < 2.5


def test_closed_output_does_not_hide_a_running_program():
    box = PythonSandbox(timeout=1.0, cpu_seconds=5)
    result, elapsed = run_timed(box, "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)")
    assert result.timed_out and elapsed < 2.5


@pytest.mark.parametrize(
    "code",
    ["x = ' ' * 10**10", "x = []\nwhile True:\n    x.append(' ' * 10**6)"],
    ids=["one-big-string", "growing-list"],
)
def test_memory_bomb_is_stopped(box, code):
    result, elapsed = run_timed(box, code)
    assert not result.ok
    assert "MemoryError" in result.error or "killed" in result.error or "timed out" in result.error
    assert elapsed < box.timeout + 1.5


def test_fork_bomb_is_stopped(box):
    result, elapsed = run_timed(box, "import os\nwhile True:\n    os.fork()")
    assert not result.ok
    assert elapsed < box.timeout + 1.5
    # Nothing of it survives: the host can still start processes at once.
    assert box("print('still fine')") == "still fine\n"


def test_network_is_unreachable(box):
    isolation = box.isolation
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        code = (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'leak')\nprint('connected')"
        )
        result = box.run(code)
        if not isolation.network_isolated:
            pytest.skip("no network namespace on this machine: the sandbox cannot block the network")
        assert not result.ok and "connected" not in result.stdout
        assert "Error" in result.error or "OSError" in result.error
        with pytest.raises(socket.timeout):
            server.accept()  # the listening test server received nothing
    finally:
        server.close()


def test_writing_outside_the_scratch_directory_fails(box, tmp_path):
    target_dir = tmp_path / "outside"
    target_dir.mkdir()
    target_dir.chmod(0o777)  # only the sandbox, not file permissions, may stop the write
    target = target_dir / "pwned.txt"
    result = box.run(f"open({str(target)!r}, 'w').write('x')\nprint('written')")
    assert not result.ok and "written" not in result.stdout
    assert not target.exists()
    for path in ("/usr/lib/pwned", "/pwned", "/etc/passwd"):  # the sandbox's own root is read-only
        result = box.run(f"open({path!r}, 'w').write('x')")
        assert not result.ok and "Read-only file system" in result.error, path


def test_child_has_no_capabilities(box):
    if not box.isolation.namespaces:
        pytest.skip("no namespaces: the child runs with the caller's own credentials")
    result = box.run("print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])")
    assert result.ok and int(result.stdout, 16) == 0


def test_signal_death_is_reported(box):
    result = box.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert not result.ok and result.returncode == -11 and result.error == "Error: killed by SIGSEGV"


# ----------------------------------------------------------------------------- fallback, tool use


def test_limits_only_mode_warns_once_and_still_limits(monkeypatch):
    monkeypatch.setattr(sandbox_module, "_isolation_cache", {})
    box = PythonSandbox(timeout=2.0, cpu_seconds=1, memory_mb=256, mode="limits-only")
    with pytest.warns(RuntimeWarning, match="limits-only mode: sandboxed code CAN read every file"):
        isolation = box.isolation
    assert isolation.mode == "limits-only"
    assert not isolation.namespaces and not isolation.minimal_root and isolation.process_filter
    assert "minimal root (host files hidden)=NO" in isolation.describe()
    monkeypatch.setenv("AEPO_TEST_SECRET", "hunter2")
    assert box("import os\nprint(os.environ.get('AEPO_TEST_SECRET'))") == "None\n"
    assert "MemoryError" in box("x = ' ' * 10**10")
    assert "PermissionError" in box("import socket\nsocket.socket(socket.AF_UNIX)")  # the filter holds
    result, elapsed = run_timed(box, "import os\nwhile True:\n    os.fork()")
    assert not result.ok and elapsed < 3.5
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second use does not warn again
        assert box("1 + 1") == "2\n"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="strict, limits-only"):
        PythonSandbox(mode="none")


def test_sandbox_as_a_tool_in_the_runner(box):
    runner = ToolRunner([box], timeout=10)
    calls = runner.run([("python", "print(2 + 2)"), ("python", "1/0"), ("python", "sum(range(5))")])
    assert [c.ok for c in calls] == [True, True, True]  # a failing program is a result, not a fault
    assert calls[0].result == "4\n" and calls[2].result == "10\n"
    assert calls[1].result.endswith("ZeroDivisionError: division by zero")


def test_concurrent_runs_do_not_interfere(box):
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = box(f"import time\ntime.sleep(0.2)\nprint({i} * {i})")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert results == {i: f"{i * i}\n" for i in range(4)}


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="timeout"):
        PythonSandbox(timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        PythonSandbox(memory_mb=1)
    with pytest.raises(ValueError, match="max_processes"):
        PythonSandbox(max_processes=0)
    with pytest.raises(ValueError, match="code must be a string"):
        PythonSandbox().run(b"print(1)")  # type: ignore[arg-type]


def test_cli_python():
    runner = CliRunner()
    done = runner.invoke(app, ["tools", "python", "print(6 * 7)"])
    assert done.exit_code == 0 and done.output == "42\n"
    from_stdin = runner.invoke(app, ["tools", "python", "-", "--timeout", "2"], input="x = 5\nx + 1\n")
    assert from_stdin.exit_code == 0 and from_stdin.output.strip() == "6"
    failed = runner.invoke(app, ["tools", "python", "raise KeyError('k')", "--memory-mb", "256"])
    assert failed.exit_code == 1 and failed.output.strip().endswith("KeyError: 'k'")
    assert runner.invoke(app, ["tools", "python", "--help"]).exit_code == 0
