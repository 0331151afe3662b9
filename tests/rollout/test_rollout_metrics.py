"""Per-step branching metrics of `rollout_metrics`: spread of m, of dH over the branch decisions,
branch rate and H_root - H_tool (docs/algorithms.md sections 1 and 3.3), on hand-built batches and on
a scripted rollout."""
from __future__ import annotations

import random

import numpy as np
import pytest
from scripted_sampler import CharTokenizer, FakeTools, Reply, ScriptedSampler, nats

from aepo.config import RolloutConfig
from aepo.rollout import rollout
from aepo.rollout.metrics import rollout_metrics
from aepo.types import Trajectory

TOK = CharTokenizer()
BRANCH_KEYS = {f"rollout/{k}" for k in ("m_mean", "m_min", "m_max", "m_std", "dH_mean", "dH_std", "dH_min",
                                        "dH_max", "branch_rate", "decisions", "h_gap_mean", "h_gap_std")}


def rows(n=2):
    return [Trajectory(f"p{i // 2}", i % 2, [1], text="x", score={"acc": 0.0}) for i in range(n)]


def test_branching_metrics_on_a_hand_built_batch():
    stats = {
        "m": [2, 4, 6, 4],
        "decisions": [
            {"dH": 0.5, "branched": True},
            {"dH": -0.25, "branched": False},
            {"dH": 1.0, "branched": True},
            {"h_init": 0.5, "h_now": 0.25, "branched": False},  # no "dH": H_now - H_init = -0.25
        ],
        "h_root": [1.0, 0.5, 0.75, None],
        "h_tool": [0.25, 1.0, 0.75, None],  # gaps 0.75, -0.5, 0.0; the last prompt was not probed
    }
    m = rollout_metrics(rows(), stats)
    assert m["rollout/m_mean"] == 4.0 and m["rollout/m_min"] == 2.0 and m["rollout/m_max"] == 6.0
    assert m["rollout/m_std"] == pytest.approx(np.sqrt(2.0))  # deviations -2, 0, 2, 0
    assert m["rollout/dH_mean"] == pytest.approx(0.25) and m["rollout/dH_min"] == -0.25 and m["rollout/dH_max"] == 1.0
    assert m["rollout/dH_std"] == pytest.approx(np.std([0.5, -0.25, 1.0, -0.25]))
    assert m["rollout/branch_rate"] == 0.5 and m["rollout/decisions"] == 4.0
    assert m["rollout/h_gap_mean"] == pytest.approx(0.25 / 3) and m["rollout/h_gap_std"] == pytest.approx(np.std([0.75, -0.5, 0.0]))


def test_branching_metrics_absent_without_their_population():
    m = rollout_metrics(rows(), {"m": [4, 4], "decisions": [], "h_root": [None, None], "h_tool": [None, None]})
    assert m["rollout/m_mean"] == 4.0 and m["rollout/m_std"] == 0.0 and m["rollout/m_min"] == m["rollout/m_max"] == 4.0
    assert not ({"rollout/dH_mean", "rollout/branch_rate", "rollout/h_gap_mean", "rollout/decisions"} & set(m))
    assert not (BRANCH_KEYS & set(rollout_metrics(rows(), {})))


def test_branching_metrics_of_a_scripted_aepo_rollout():
    def script(ctx, draw):
        k = ctx.count("<result>")
        text = f"<search>{ctx[0]}{k}.{draw}</search>" if k < 3 else f"<answer>{draw}</answer>"
        fraction = 0.5 if k == 0 else [0.1, 0.5, 0.9][(k + 2 * draw) % 3]
        return Reply(text, nats(fraction / 20, TOK))  # segment entropy = fraction (n_probe 20)

    prompts = [(f"p{i}", TOK.encode(t)) for i, t in enumerate(["A", "B", "C"])]
    cfg = RolloutConfig(n=6, branch_decision="sample")
    trajs, stats = rollout("aepo", prompts, ScriptedSampler(TOK, script), TOK, FakeTools(), cfg, random.Random(1))
    m = rollout_metrics(trajs, stats)
    assert BRANCH_KEYS <= set(m)
    assert m["rollout/m_mean"] == pytest.approx(np.mean(stats["m"])) and m["rollout/m_max"] == max(stats["m"])
    # the rows' own decisions are the step's decisions
    own = [d for t in trajs for d in t.decisions if d["row_id"] == t.row_id]
    assert m["rollout/decisions"] == len(own) == len(stats["decisions"])
    assert m["rollout/branch_rate"] == pytest.approx(sum(d["branched"] for d in own) / len(own))
    assert m["rollout/branch_rate"] == pytest.approx(stats["branches"] / len(own))
    assert m["rollout/dH_mean"] == pytest.approx(np.mean([d["dH"] for d in own]))
    assert m["rollout/dH_min"] == pytest.approx(min(d["dH"] for d in own))
    gaps = [r - t for r, t in zip(stats["h_root"], stats["h_tool"])]
    assert m["rollout/h_gap_mean"] == pytest.approx(np.mean(gaps)) and m["rollout/h_gap_std"] == pytest.approx(np.std(gaps))
