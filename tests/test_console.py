"""StepProgress without a terminal: the heartbeat keeps a log file alive during a slow step and
stops with the block; an "accuracy" metric is shown as a weighted running mean."""
from __future__ import annotations

import threading
import time

import pytest

from aepo.console import StepProgress, format_metrics


def _plain(total: int, **kw) -> StepProgress:
    bar = StepProgress(total, 0, title="eval t", **kw)
    bar.tty = False  # as in a log file or CI, whatever runs the tests
    return bar


def test_heartbeat_prints_during_a_step_longer_than_the_interval(capsys):
    with _plain(3, interval=0.2) as bar:
        bar.advance({"accuracy": 1.0})
        capsys.readouterr()
        time.sleep(0.9)  # one slow step: no advance for 4.5 intervals
        during = capsys.readouterr().err
        bar.advance({"accuracy": 0.0})
    lines = [ln for ln in during.splitlines() if ln]
    assert len(lines) >= 2, during
    assert all(ln.startswith("[eval t] step 1/3, ") and ln.endswith(" s elapsed, still working") for ln in lines)


def test_no_heartbeat_while_steps_keep_printing(capsys):
    with _plain(100, interval=0.5) as bar:
        for _ in range(10):
            bar.advance({"loss": 1.0})
            time.sleep(0.02)
    assert "still working" not in capsys.readouterr().err


def test_nothing_is_printed_after_exit(capsys):
    with _plain(5, interval=0.05) as bar:
        time.sleep(0.2)
    assert "still working" in capsys.readouterr().err
    assert not any(t.name.startswith("progress ") and t.is_alive() for t in threading.enumerate())
    time.sleep(0.3)
    assert capsys.readouterr().err == ""
    bar.advance({"accuracy": 0.5})  # a stray advance after the block prints nothing either
    assert capsys.readouterr().err == ""


def test_disabled_progress_prints_nothing_and_starts_no_thread(capsys):
    before = threading.active_count()
    with _plain(3, enabled=False, interval=0.05) as bar:
        assert threading.active_count() == before
        time.sleep(0.2)
        bar.advance({"accuracy": 1.0})
    assert capsys.readouterr().err == ""


def test_accuracy_is_a_weighted_running_mean(capsys):
    with _plain(4, interval=60) as bar:
        bar.advance({"accuracy": 0.5}, weight=8)   # 4 of 8 right
        assert bar.mean_accuracy == pytest.approx(0.5)
        bar.advance({"accuracy": 0.25}, weight=4)  # 1 of 4: (4 + 1) / 12
        assert bar.mean_accuracy == pytest.approx(5 / 12)
        bar.advance({"accuracy": 0.0}, weight=0)   # an empty batch changes nothing
        assert bar.mean_accuracy == pytest.approx(5 / 12)
        bar.advance({"accuracy": 1.0})             # weight 1 by default: 6 / 13
        assert bar.mean_accuracy == pytest.approx(6 / 13)
    err = capsys.readouterr().err
    first, last = err.splitlines()[0], err.splitlines()[-1]
    assert first == "[eval t] step 1/4 acc(mean so far)=0.5"
    assert last == f"[eval t] step 4/4 acc(mean so far)={6 / 13:.3g}"
    assert "acc=" not in err


def test_other_metrics_are_shown_per_step():
    with _plain(2, interval=60) as bar:
        assert bar.mean_accuracy is None
        bar.advance({"reward/accuracy": 0.25, "loss": 2.0}, weight=5)
        assert bar.mean_accuracy is None  # training's per-step reward/accuracy is not averaged
    assert format_metrics({"reward/accuracy": 0.25, "loss": 2.0}) == "loss=2 acc=0.25"
