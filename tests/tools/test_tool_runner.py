"""ToolRunner: concurrency, order, timeouts, failures as text; truncate_result."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aepo.tools.runner import TRUNCATION_MARK, ToolRunner, is_timeout, truncate_result
from aepo.types import ToolCall


class FnTool:
    """A named tool around a plain function."""

    def __init__(self, name, fn):
        self.name = name
        self.fn = fn

    def __call__(self, argument: str) -> str:
        return self.fn(argument)


def sleeper(argument: str) -> str:
    time.sleep(float(argument))
    return f"slept {argument}"


@pytest.fixture
def release():
    """An event hung tools wait on; set at teardown so abandoned threads end."""
    event = threading.Event()
    yield event
    event.set()


def test_results_keep_call_order_and_run_concurrently():
    runner = ToolRunner([FnTool("sleep", sleeper), FnTool("echo", lambda a: a.upper())], timeout=5)
    calls = [("sleep", "0.3"), ("echo", "hi"), ("sleep", "0.1"), ("sleep", "0.2")]
    start = time.monotonic()
    results = runner.run(calls)
    elapsed = time.monotonic() - start
    assert [r.result for r in results] == ["slept 0.3", "HI", "slept 0.1", "slept 0.2"]
    assert all(isinstance(r, ToolCall) and r.ok for r in results)
    assert [(r.name, r.argument) for r in results] == calls
    assert results[0].seconds >= 0.29 and results[2].seconds >= 0.09
    assert elapsed < 0.55, f"calls ran one after another ({elapsed:.2f}s)"


def test_max_workers_bounds_concurrency_and_timeout_counts_from_start():
    # Three 0.15 s calls, one at a time: 0.45 s in all, yet none exceeds its 0.3 s timeout.
    runner = ToolRunner([FnTool("sleep", sleeper)], timeout=0.3, max_workers=1)
    start = time.monotonic()
    results = runner.run([("sleep", "0.15")] * 3)
    assert time.monotonic() - start >= 0.44
    assert all(r.ok for r in results), [r.result for r in results]


def test_max_workers_bounds_calls_over_concurrent_runs():
    # Many trees share one runner per process (the verl agent loop): 6 threads each run 3 calls,
    # yet at most max_workers calls are ever in flight, and every call still completes.
    lock, live, peak = threading.Lock(), [0], [0]

    def counted(argument: str) -> str:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return argument

    runner = ToolRunner([FnTool("work", counted)], timeout=2.0, max_workers=3)
    out: dict[int, list[str]] = {}

    def tree(t: int) -> None:
        out[t] = [r.result for r in runner.run([("work", f"{t}-{j}") for j in range(3)])]

    threads = [threading.Thread(target=tree, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert out == {t: [f"{t}-{j}" for j in range(3)] for t in range(6)}
    assert peak[0] == 3, f"{peak[0]} calls ran at once with max_workers=3"


def test_waiting_for_a_worker_of_another_run_is_not_timed(release):
    # One run holds the only worker for 0.3 s; a second run's call waits for it without timing
    # out (its 0.2 s limit counts from when it starts), and slots of timed-out calls come back.
    runner = ToolRunner([FnTool("sleep", sleeper), FnTool("echo", lambda a: a)], timeout=0.5, max_workers=1)
    first = threading.Thread(target=runner.run, args=([("sleep", "0.3")],))
    first.start()
    time.sleep(0.05)
    runner.timeout = 0.2
    start = time.monotonic()
    (call,) = runner.run([("echo", "after")])
    first.join(5)
    assert call.ok and call.result == "after"
    assert time.monotonic() - start >= 0.2
    hang = FnTool("hang", lambda a: (release.wait(), "late")[1])
    hung = ToolRunner([hang, FnTool("echo", lambda a: a)], timeout=0.1, max_workers=2)
    assert all(r.timed_out for r in hung.run([("hang", "")] * 2))
    assert [r.result for r in hung.run([("echo", "a"), ("echo", "b")])] == ["a", "b"]


def test_unknown_tool_names_the_valid_tools():
    runner = ToolRunner({"calc": lambda a: a, "search": lambda a: a})
    (call,) = runner.run([("python", "print(1)")])
    assert not call.ok
    assert call.result == "Error: unknown tool 'python'; valid tools: calc, search"
    assert call.name == "python" and call.argument == "print(1)"


def test_exception_becomes_error_text():
    def boom(argument: str) -> str:
        raise ValueError(f"bad argument {argument!r}")

    runner = ToolRunner([FnTool("boom", boom), FnTool("echo", lambda a: a)])
    failed, fine = runner.run([("boom", "x"), ("echo", "y")])
    assert not failed.ok and failed.result == "Error: ValueError: bad argument 'x'"
    assert fine.ok and fine.result == "y"


def test_sys_exit_and_non_string_results_do_not_escape():
    runner = ToolRunner([FnTool("exit", lambda a: sys.exit(3)), FnTool("number", lambda a: 42)])
    exited, number = runner.run([("exit", ""), ("number", "")])
    assert not exited.ok and exited.result == "Error: SystemExit: 3"
    assert not number.ok and number.result == "Error: tool returned int, expected str"


def test_hung_tool_times_out_without_blocking(release):
    hang = FnTool("hang", lambda a: (release.wait(), "late")[1])
    runner = ToolRunner([hang, FnTool("echo", lambda a: a)], timeout=0.2, max_workers=2)
    start = time.monotonic()
    hung, fine = runner.run([("hang", "q"), ("echo", "ok")])
    assert time.monotonic() - start < 1.0
    assert not hung.ok and hung.result == "Error: hang timed out after 0.2s"
    assert hung.seconds >= 0.2
    assert fine.ok and fine.result == "ok"
    assert hung.timed_out and is_timeout(hung)
    assert not fine.timed_out and not is_timeout(fine)
    # The abandoned thread holds no worker slot: with one worker, later calls still run.
    runner_one = ToolRunner([hang, FnTool("echo", lambda a: a)], timeout=0.2, max_workers=1)
    first = runner_one.run([("hang", "")])[0]
    assert not first.ok
    assert runner_one.run([("echo", "again")])[0].result == "again"


def test_many_hung_tools_all_time_out_together(release):
    hang = FnTool("hang", lambda a: (release.wait(), "late")[1])
    runner = ToolRunner([hang], timeout=0.2, max_workers=8)
    start = time.monotonic()
    results = runner.run([("hang", str(i)) for i in range(8)])
    assert time.monotonic() - start < 1.0
    assert [r.argument for r in results] == [str(i) for i in range(8)]
    assert all(not r.ok and "timed out" in r.result for r in results)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="timeout"):
        ToolRunner([], timeout=0)
    with pytest.raises(ValueError, match="max_workers"):
        ToolRunner([], max_workers=0)
    with pytest.raises(ValueError, match="unique"):
        ToolRunner([FnTool("a", str), FnTool("a", str)])
    with pytest.raises(ValueError, match="name"):
        ToolRunner([lambda a: a])
    with pytest.raises(ValueError, match="not callable"):
        ToolRunner({"x": 3})
    with pytest.raises(ValueError, match=r"calls\[0\]"):
        ToolRunner({"x": str}).run(["x"])


def test_close_and_context_manager():
    with ToolRunner({"echo": lambda a: a}) as runner:
        assert runner.run_one("echo", "1").result == "1"
        assert runner.names == ["echo"]
    with pytest.raises(RuntimeError, match="close"):
        runner.run([("echo", "1")])


def test_empty_batch():
    assert ToolRunner({"echo": lambda a: a}).run([]) == []


def test_truncate_result_values():
    assert truncate_result("short", 10) == "short"
    assert truncate_result("x" * 10, 10) == "x" * 10
    cut = truncate_result("abcdefghij" * 10, 40)
    assert cut == "abcdefghij" * 2 + "abcde" + TRUNCATION_MARK
    assert len(cut) == 40
    assert truncate_result("abcdefghij", 5) == "abcde"  # too small for the mark
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_chars"):
            truncate_result("text", bad)


@given(st.text(max_size=300), st.integers(min_value=1, max_value=200))
def test_truncate_result_properties(text, max_chars):
    out = truncate_result(text, max_chars)
    assert len(out) <= max_chars
    if len(text) <= max_chars:
        assert out == text
    else:
        kept = out.removesuffix(TRUNCATION_MARK)
        assert text.startswith(kept)


def test_only_timeouts_are_flagged_as_timeouts():
    def boom(argument):
        raise ValueError("bad input")

    runner = ToolRunner([FnTool("boom", boom), FnTool("echo", lambda a: a)], timeout=5)
    failed, unknown, echoed = runner.run([("boom", "x"), ("nope", "x"), ("echo", "timed out after 3s")])
    assert not failed.ok and not failed.timed_out and not is_timeout(failed)
    assert not unknown.ok and not unknown.timed_out and not is_timeout(unknown)
    assert echoed.ok and not is_timeout(echoed)  # the words alone, not an error line, are no timeout


@pytest.mark.parametrize("result, expected", [
    ("Error: search timed out after 5s", True),  # the runner's text, flag lost in a copy
    ("Error: timed out after 2.5s", True),  # the Python sandbox's limit
    ("partial output\nmore\nError: timed out after 2s", True),  # ... after what it printed
    ("Error: SearchBackendError: retriever http://x unreachable: timed out", False),
    ("print('Error: timed out after')", False),
    ("Page 1: the request timed out after 3 tries", False),
])
def test_is_timeout_reads_the_known_timeout_texts(result, expected):
    assert is_timeout(ToolCall("python", "code", result, ok=False)) is expected
    assert is_timeout(ToolCall("python", "code", "fine", timed_out=True))
