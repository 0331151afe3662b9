"""Plots are written atomically under unique temporary names, so the runs of
`aepo compare --jobs N`, which each write the same compare plots, never break each other."""
from __future__ import annotations

import matplotlib.figure
import pytest

from aepo.eval import plots

CURVES = {"grpo": [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.3}],
          "aepo": [{"step": 1, "reward/mean": 0.2}, {"step": 2, "reward/mean": 0.5}]}
BARS = {"grpo": {"pass@1": 0.25}, "aepo": {"pass@1": 0.5}}


@pytest.mark.parametrize("kind", ["curves", "bars"])
def test_a_second_writer_finishing_mid_write_breaks_neither(tmp_path, monkeypatch, kind):
    """Writer 2 runs start to end right after writer 1 has rendered its figure: with one fixed
    temporary name, writer 2 moved writer 1's file away and writer 1's rename failed."""
    out = tmp_path / "compare_curves.png"

    def write():
        if kind == "curves":
            return plots.plot_curves(CURVES, out, keys=[("reward/mean", "reward")])
        return plots.plot_bars(BARS, out)

    real = matplotlib.figure.Figure.savefig
    nested = []

    def savefig_then_other_writer(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if not nested:
            nested.append(None)  # writer 2 itself saves normally
            nested[0] = write()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_then_other_writer)
    assert write() == out
    assert nested == [out]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["compare_curves.png"]  # no temporary file left behind
