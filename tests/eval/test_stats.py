"""aepo.eval.stats: the paired bootstrap interval, the minimal detectable effect, the verdict and
the evaluation noise, against values computed by hand."""
from __future__ import annotations

import math
import random

import pytest

from aepo.eval.stats import (
    bootstrap_mean_ci,
    eval_noise,
    mean_sd,
    min_detectable_effect,
    paired_comparison,
    verdict,
)


def test_exact_bootstrap_interval_of_known_paired_data():
    # two values: resample means d1, (d1+d2)/2, d2 with 1/4, 1/2, 1/4 -> the interval is [d1, d2]
    assert bootstrap_mean_ci([-1.0, 3.0]) == (-1.0, 3.0)
    # (0, 0, 0, 0, 1): mean = K/5, K ~ Binomial(5, 0.2); P(K = 0) = 0.328 >= 0.025 -> 0;
    # P(K <= 2) = 0.942 < 0.975 <= P(K <= 3) = 0.993 -> 3/5
    lo, hi = bootstrap_mean_ci([0.0, 0.0, 0.0, 0.0, 1.0])
    assert (lo, hi) == (0.0, pytest.approx(0.6))
    # at level 0.5: P(K <= 0) = 0.328 >= 0.25 -> 0; P(K <= 1) = 0.737 < 0.75 <= 0.942 -> 2/5
    assert bootstrap_mean_ci([0.0, 0.0, 0.0, 0.0, 1.0], level=0.5) == (0.0, pytest.approx(0.4))
    # the same shifted by 2: the interval shifts; constant data give a point
    assert bootstrap_mean_ci([2.0, 2.0, 2.0, 2.0, 3.0]) == (pytest.approx(2.0), pytest.approx(2.6))
    assert bootstrap_mean_ci([1.5] * 7) == (1.5, 1.5)


def test_monte_carlo_bootstrap_agrees_with_the_normal_interval_for_many_seeds():
    rng = random.Random(1)
    d = [rng.gauss(1.0, 2.0) for _ in range(40)]
    m, sd = mean_sd(d)
    lo, hi = bootstrap_mean_ci(d)
    half = 1.96 * sd * math.sqrt((len(d) - 1) / len(d)) / math.sqrt(len(d))  # the bootstrap's plug-in sd
    assert lo == pytest.approx(m - half, abs=0.12 * half) and hi == pytest.approx(m + half, abs=0.12 * half)
    assert bootstrap_mean_ci(d, seed=5) != (lo, hi) and bootstrap_mean_ci(d) == (lo, hi)  # seeded


def test_min_detectable_effect_by_hand():
    # (z_0.975 + z_0.8) = 1.959964 + 0.841621 = 2.801585; sd 1, n 4 -> 1.4008
    assert min_detectable_effect(1.0, 4) == pytest.approx(2.801585 / 2, rel=1e-5)
    assert min_detectable_effect(2.0, 16, power=0.9) == pytest.approx((1.959964 + 1.281552) * 0.5, rel=1e-5)
    assert math.isnan(min_detectable_effect(1.0, 1))


def test_verdict_says_not_detected_when_the_interval_holds_zero():
    assert verdict(-0.5, 1.0) == "not detected"
    assert verdict(0.0, 0.6) == "not detected"  # an end at 0 still holds it
    assert verdict(0.1, 0.6, "aepo", "grpo") == "aepo higher"
    assert verdict(-0.6, -0.1, "aepo", "grpo") == "grpo higher"


def test_paired_comparison_pairs_by_seed():
    a = {0: 0.30, 1: 0.25, 2: 0.40, 3: 0.10}
    b = {0: 0.20, 1: 0.25, 3: 0.05, 4: 0.9}  # seed 2 and 4 have no pair
    out = paired_comparison(a, b, "aepo", "grpo")
    assert out["seeds"] == [0, 1, 3] and out["n"] == 3
    d = [0.10, 0.0, 0.05]
    assert out["mean"] == pytest.approx(0.05) and out["sd"] == pytest.approx(0.05)
    # exact bootstrap of (0.1, 0, 0.05): P(mean = 0) = 1/27 >= 0.025 -> 0; P(mean = 0.1) = 1/27,
    # so P(mean < 0.1) = 26/27 < 0.975 -> 0.1
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(min(d)), pytest.approx(max(d)))
    assert out["verdict"] == "not detected"
    assert out["mde"] == pytest.approx(2.801585 * 0.05 / math.sqrt(3), rel=1e-5)
    shifted = paired_comparison({s: v + 1 for s, v in a.items()}, b, "aepo", "grpo")
    assert shifted["verdict"] == "aepo higher"
    assert paired_comparison({0: 1.0}, {0: 0.0})["verdict"] == "too few paired seeds"


def test_eval_noise_by_hand():
    rec = lambda accs: {"samples": [{"acc": a} for a in accs]}
    # two questions, 4 samples: p = 0.5 and 1.0; var of each mean = p(1-p)/(n-1) = 1/12 and 0
    assert eval_noise([rec([1, 0, 1, 0]), rec([1, 1, 1, 1])]) == pytest.approx(math.sqrt(1 / 12) / 2)
    # one sample per question: the binomial bound sqrt(p(1-p)/Q), p = 1/4, Q = 4
    assert eval_noise([rec([1]), rec([0]), rec([0]), rec([0])]) == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert math.isnan(eval_noise([]))


def test_compare_report_states_the_paired_statistics(tmp_path):
    """write_compare_report on hand-made finished runs: per algorithm mean / sd / eval noise /
    tokens / seconds, and the paired interval and verdict of the known differences."""
    import json

    from aepo.demo.compare import compare_statistics, write_compare_report

    p1 = {"grpo": [0.20, 0.25, 0.30], "aepo": [0.30, 0.25, 0.35]}  # aepo - grpo = 0.10, 0, 0.05
    for algo, vals in p1.items():
        for seed, v in enumerate(vals):
            rd = tmp_path / "runs" / f"{algo}_seed{seed}"
            (rd / "rl").mkdir(parents=True)
            (rd / "result.json").write_text(json.dumps({"algo": algo, "seed": seed, "pass@1": v, "pass@2": v,
                                                        "wall_seconds": 10.0 * (seed + 1)}))
            steps = [{"step": 1, "rollout/generated_tokens": 100.0}, {"step": 2, "rollout/generated_tokens": 50.0}]
            (rd / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
            samples = [{"id": "q1", "samples": [{"acc": 1.0}, {"acc": 0.0}]},
                       {"id": "q2", "samples": [{"acc": 1.0}, {"acc": 1.0}]}]
            (rd / "eval_rl_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    md = write_compare_report(tmp_path, ["grpo", "aepo"], [0, 1, 2], 2, "aepo compare test").read_text()
    # per algorithm: mean 25.0, sd 5.0 over seeds; eval noise sqrt(0.5 * 0.5 / 1) / 2 = 25.0 points
    assert "| grpo | 3 | 25.0 | 5.0 | 25.0 | 150 | 20 |" in md
    assert "| aepo | 3 | 30.0 | 5.0 | 25.0 | 150 | 20 |" in md
    # paired: d = (10, 0, 5) points, mean 5.0, sd 5.0, exact bootstrap interval [0, 10]: not detected
    assert "| aepo − grpo | 3 | 5.0 | 5.0 | [0.0, 10.0] | 8.1 | not detected |" in md
    st = json.loads((tmp_path / "compare_stats.json").read_text())
    assert st["pairs"][0]["verdict"] == "not detected" and st["algorithms"]["grpo"]["tokens"] == 150.0
    # a consistent gain is detected
    res = {"a": [{"seed": s, "pass@1": 0.1 * s} for s in range(4)],
           "b": [{"seed": s, "pass@1": 0.1 * s + 0.05 + 0.01 * s} for s in range(4)]}
    pair = compare_statistics(res)["pairs"][0]
    # d = (0.05, 0.06, 0.07, 0.08): P(mean <= 0.0525) = 1/256 + 4/256 < 0.025 <= + P(mean = 0.055) = 10/256
    assert pair["a"] == "b" and pair["verdict"] == "b higher" and pair["ci_low"] == pytest.approx(0.055)
