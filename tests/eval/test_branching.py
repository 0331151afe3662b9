"""`aepo analyze branching`: the generalised AUROC, continuations from decision states, and the
whole analysis on a scripted policy with a planted informative / uninformative entropy signal."""
from __future__ import annotations

import math
import random

import pytest
from scripted_sampler import CharTokenizer, FakeTools, Reply, ScriptedSampler, nats

from aepo.config import RolloutConfig
from aepo.eval.branching import analyze_branching, arm_metrics, concordance_auroc, continuations

TOK = CharTokenizer()


def test_concordance_auroc_on_planted_signals():
    rng = random.Random(0)
    u = [rng.random() * 0.25 for _ in range(300)]
    informative = [x + rng.gauss(0, 0.005) for x in u]
    uninformative = [rng.random() for _ in u]
    assert concordance_auroc(informative, u) > 0.95
    assert concordance_auroc(uninformative, u) == pytest.approx(0.5, abs=0.05)
    assert concordance_auroc([-x for x in u], u) == 0.0
    # binary targets: the ordinary AUROC (3 of the 4 positive-negative pairs ordered, a tie counts 1/2)
    assert concordance_auroc([0.9, 0.4, 0.5, 0.4], [1, 1, 0, 0]) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert math.isnan(concordance_auroc([1.0, 2.0], [0.3, 0.3]))
    with pytest.raises(ValueError, match="one length"):
        concordance_auroc([1.0], [1.0, 2.0])


def planted(informative: bool):
    """Each question searches once (calm first segment). After the result, an 'U' question's
    answer is a coin (right on even draws: q = 1/2) and a 'C' question's is always right (q = 1).
    Informative: the segment after the result is uncertain exactly on 'U' questions (dH 1.4
    against 0). Uninformative: the same entropy everywhere."""
    def script(ctx, draw):
        if ctx.count("<result>") == 0:
            return Reply(f"<search>{ctx[0]}</search>", nats(0.1 / 20, TOK))
        uncertain = ctx.startswith("U")
        h = (1.5 if uncertain else 0.1) if informative else 0.8
        right = (draw % 2 == 0) if uncertain else True
        return Reply("<answer>yes</answer>" if right else "<answer>no</answer>", nats(h / 20, TOK))
    return script


def score(t):
    ok = float("<answer>yes</answer>" in t.text)
    return {"reward": ok, "acc": ok}


def run_analysis(informative: bool, k=4, c=4):
    sampler = ScriptedSampler(TOK, planted(informative))
    prompts = [(f"{kind}{i}", TOK.encode(f"{kind}{i}?")) for i in range(3) for kind in "UC"]
    cfg = RolloutConfig(n_probe=20, branch_alpha=0.5)  # branch when dH > 0
    return analyze_branching(sampler, TOK, FakeTools(), prompts, score, cfg, k=k, continuations_per_state=c,
                             seed=0, lambdas=(0.05, 0.2), batch_prompts=4), sampler


def test_planted_informative_signal_gives_auroc_one():
    report, sampler = run_analysis(True)
    assert not sampler.live_rows  # every row (trees, continuations) released
    assert report["states"] > 0
    assert report["auroc_dH_vs_uncertainty"] == pytest.approx(1.0)
    assert report["auroc_interval"] == (pytest.approx(1.0), pytest.approx(1.0))
    assert len(report["state_records"]) == report["states"]
    assert {r["tree"] for r in report["state_records"]} == {"arpo", "aepo"}
    assert report["q"]["uncertain_share"] > 0
    arms = report["arms"]
    assert set(arms) == {"independent", "arpo", "aepo", "random", "oracle"}
    for a in arms.values():
        assert a["prompts"] == 6
    assert arms["independent"]["branches_per_prompt"] == 0 and arms["independent"]["sibling_disagreement"] is None
    # the oracle spends the k - m branches at decision states (one tool call deep here)
    assert arms["oracle"]["branches_per_prompt"] == 2  # k - m = 4 - 2
    assert arms["oracle"]["branch_depth"] == 1.0
    assert set(report["penalty_at_fixed_m"]) == {"0.05", "0.2"}


def test_planted_uninformative_signal_gives_auroc_one_half():
    report, _ = run_analysis(False)
    assert report["auroc_dH_vs_uncertainty"] == pytest.approx(0.5)


def test_continuations_fork_the_state_and_run_to_the_end():
    sampler = ScriptedSampler(TOK, planted(True))
    cfg = RolloutConfig(n_probe=20)
    from aepo.rollout import rollout

    trajs, stats = rollout("arpo", [("U0", TOK.encode("U0?"))], sampler, TOK, FakeTools(), cfg, random.Random(0))
    d = stats["decisions"][0]
    row = trajs[d["row_id"]]
    conts = continuations(sampler, TOK, FakeTools(), cfg, [(row, d["position"])], 4)[0]
    assert len(conts) == 4
    for t in conts:
        assert t.response_ids[:d["position"]] == row.response_ids[:d["position"]]
        assert t.branch_position == d["position"] and t.parent_row_id == row.row_id
        assert t.finish_reason == "answer" and t.text.endswith("</answer>")
    assert sum(score(t)["acc"] for t in conts) == 2  # the coin: right on even draws
    assert not sampler.live_rows


def test_arm_metrics_by_hand():
    from aepo.types import SegmentRecord, ToolCall, Trajectory

    def row(acc, calls, parent=None, pos=None, gen=5):
        t = Trajectory("p", 0, [1], [7] * gen, [1] * gen, parent_row_id=parent, branch_position=pos)
        t.tool_calls = [ToolCall("search", c, "r") for c in calls]
        t.segments = [SegmentRecord("tool", 1, 2)]
        return t, {"reward": acc, "acc": acc}

    g1 = [(*row(1.0, ["a"]), None), (*row(0.0, ["A "]), None), (*row(1.0, ["b"], 0, 2), 0)]
    g2 = [(*row(1.0, ["a"]), None), (*row(1.0, ["a"]), None), (*row(1.0, ["a"], 0, 2), 0)]
    m = arm_metrics([g1, g2])
    assert m["learnable_groups"] == 0.5
    assert m["sibling_disagreement"] == 0.0  # both branches as right as their parents
    assert m["distinct_tool_paths"] == 1.5  # 'a' and 'A ' normalise alike; g1 has 'a', 'b'
    assert m["tokens"] == 5 + 5 + 3  # the branch generated 3 of its 5 tokens
    assert m["branch_depth"] == 1.0 and m["branches_per_prompt"] == 1.0
    assert m["pass@1"] == pytest.approx(5 / 6)


def test_auroc_interval_resamples_whole_questions():
    from aepo.eval.branching import auroc_interval

    rng = random.Random(2)
    groups, scores, targets = [], [], []
    for q in range(30):
        for _ in range(5):
            u = rng.random() * 0.25
            groups.append(q)
            targets.append(u)
            scores.append(u + rng.gauss(0, 0.05))
    lo, hi = auroc_interval(groups, scores, targets, n_boot=300)
    point = concordance_auroc(scores, targets)
    assert lo < point < hi and 0.7 < lo and hi < 1.0
    lo0, hi0 = auroc_interval(groups, [rng.random() for _ in scores], targets, n_boot=300)
    assert lo0 < 0.5 < hi0
    assert auroc_interval([0, 0], [1.0, 2.0], [0.1, 0.1]) is None  # no usable pair
