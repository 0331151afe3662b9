"""The metrics catalogue (`aepo.catalogue`): a new reported metric is one emission plus one row;
every key the trainer emits has a row; docs/metrics.md is the generated reference."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from aepo import catalogue
from aepo.catalogue import Metric, register_metric, shown
from aepo.console import format_metrics
from aepo.demo.compare import compare_table
from aepo.eval.plots import panels, plot_curves
from aepo.eval.report import metrics_reference, training_table
from aepo.rollout.analyses import analysis_stats
from aepo.rollout.metrics import rollout_metrics
from aepo.types import SegmentRecord, ToolCall, Trajectory

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


@pytest.fixture
def probe_metric():
    """One catalogue row for a metric no code knows, removed afterwards."""
    rows = [register_metric(Metric("rollout/probe_share", "share of probes", "A test metric.",
                                   ("console", "report", "plot", "compare", "run"), short="pr", scale=100)),
            register_metric(Metric("probe_share", "probes (%)", "Its run-level mean.", ("table",), scale=100,
                                   where="result.json"))]
    yield rows
    for m in rows:
        catalogue.METRICS.remove(m)


def test_a_new_metric_is_one_emission_plus_one_row(probe_metric, tmp_path):
    # the emission: a step's metrics holding the new key (as rollout_metrics would return it)
    steps = [{"step": 1, "reward/mean": 0.5, "rollout/probe_share": 0.25},
             {"step": 2, "reward/mean": 0.75, "rollout/probe_share": 0.125}]
    # console line, scaled by the row's scale (100 x 0.25)
    assert format_metrics(steps[0]) == "R=0.5 pr=25"
    # the demo report's training table: first and last step
    assert "| rollout/probe_share | 25 | 12.5 |" in training_table(steps[0], steps[-1])
    # plot panels of the demo and of compare; the plot is drawn with it
    assert ("rollout/probe_share", "share of probes") in panels("plot")
    assert ("rollout/probe_share", "share of probes") in panels("compare")
    assert plot_curves({"a": steps}, tmp_path / "c.png").stat().st_size > 0
    # averaged over the run (result.json) and a column of compare's table
    assert analysis_stats(steps)["probe_share"] == pytest.approx(0.1875)
    table = compare_table({"aepo": [{"probe_share": 0.1875}, {"probe_share": 0.0625}]}, k=4)
    assert "probes (%)" in table.splitlines()[0]
    assert "12.5 ± 8.8" in table  # mean 0.125, sd (ddof 1) 0.0884 -> 12.5 ± 8.8 points


def test_console_line_keeps_its_order_and_format():
    m = {"actor/grad_norm": 2.0, "reward/mean": 0.123456, "rollout/branches": 3, "loss": 1.5, "other/x": 9}
    assert format_metrics(m) == "loss=1.5 R=0.123 br=3 |g|=2"


def test_bad_rows_and_views_are_refused_by_name():
    with pytest.raises(ValueError, match="'bogus'"):
        shown("bogus")
    with pytest.raises(ValueError, match="needs `short`"):
        Metric("x/y", "y", "doc", ("console",))
    with pytest.raises(ValueError, match=r"\['graph'\]"):
        Metric("x/y", "y", "doc", ("graph",))
    with pytest.raises(ValueError, match="'reward/mean' is already"):
        register_metric(Metric("reward/mean", "again", "doc"))
    with pytest.raises(KeyError, match="'nope/x'"):
        catalogue.get_metric("nope/x")


def _pattern(key: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"<[^>]+>", "[^/]+", re.escape(key).replace(r"\<", "<").replace(r"\>", ">")) + "$")


def test_every_emitted_rollout_key_has_a_row():
    def row(i: int, parent: int | None) -> Trajectory:
        t = Trajectory("p", i, [1], [5, 6, 7, 8], [1, 1, 0, 1], logprobs=[0.0] * 4, entropies=[0.5, 0.2, 0.0, 0.1],
                       text="x", score={"acc": 1.0, "f1": 1.0, "format_ok": True}, reward=1.0 - i)
        t.segments = [SegmentRecord("model", 0, 2, entropy=0.3), SegmentRecord("tool", 2, 3),
                      SegmentRecord("model", 3, 4, entropy=0.6)]
        t.tool_calls = [ToolCall("search", "q", "Page 1: x", seconds=0.5)]
        t.finish_reason = "answer"
        t.parent_row_id, t.branch_position = parent, (None if parent is None else 0)
        return t

    stats = {"m": [2], "decisions": [{"dH": 0.3, "branched": True, "row_id": 0}], "h_root": [0.5], "h_tool": [0.2],
             "branches": 1, "mean_l": 1.0, "unique_rows": 2, "dynamic_sampling_kept": 1.0,
             "prefix_cache_hit_rate": 0.5}
    emitted = rollout_metrics([row(0, None), row(1, 0)], stats)
    assert len(emitted) > 40
    patterns = [_pattern(m.key) for m in catalogue.METRICS]
    missing = [k for k in emitted if not any(p.match(k) for p in patterns)]
    assert not missing, f"emitted without a catalogue row: {missing}"


def test_docs_metrics_md_is_the_generated_reference():
    assert DOCS.read_text(encoding="utf-8") == metrics_reference(), (
        "docs/metrics.md is stale: python -c \"from aepo.eval.report import metrics_reference; "
        "print(metrics_reference(), end='')\" > docs/metrics.md")
    for m in catalogue.METRICS:
        assert f"| `{m.key}` |" in metrics_reference()
