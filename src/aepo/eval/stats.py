"""Statistics for comparing training runs over seeds (docs/algorithms.md section 8, "Comparing algorithms").

Runs of two algorithms with the same seed share the SFT start, the prompt order and the
evaluation questions, so they are compared in pairs: d_s = x_A(seed s) - x_B(seed s).

- `bootstrap_mean_ci`: the percentile bootstrap interval of the mean of d. For n <= 10 values
  it is exact (every resample, as a multiset with its multinomial probability); above that a
  seeded Monte-Carlo bootstrap. The interval is [q_lo, q_hi] with q_p the smallest resample
  mean m whose cumulative probability P(mean <= m) >= p.
- `min_detectable_effect`: the paired difference a two-sided test at level alpha detects with
  the given power, normal approximation: MDE = (z_{1-alpha/2} + z_power) sd_d / sqrt(n).
- `verdict`: "not detected" when the interval holds 0, else which side is higher.
- `eval_noise`: the sampling standard error of one run's pass@1 from its evaluation samples,
  the noise a re-evaluation of the same model would show, to set beside the seed-to-seed sd.
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

__all__ = ["bootstrap_mean_ci", "eval_noise", "mean_sd", "min_detectable_effect", "paired_comparison", "verdict"]


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (n - 1; 0 for one value; nan, nan for none) of the finite values."""
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _quantile(dist: list[tuple[float, float]], p: float) -> float:
    """Smallest value whose cumulative probability reaches p, of (value, probability) pairs."""
    acc = 0.0
    for value, prob in sorted(dist):
        acc += prob
        if acc >= p - 1e-12:
            return value
    return max(v for v, _ in dist)


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 20000, seed: int = 0,
                      exact_max_n: int = 10) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` at `level` (module docstring):
    exact for len(values) <= exact_max_n, else `n_boot` seeded resamples. One value gives
    (value, value); ValueError for none or a level outside (0, 1)."""
    x = [float(v) for v in values]
    if not x:
        raise ValueError("bootstrap_mean_ci: no values")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_mean_ci: level must be in (0, 1), got {level}")
    n = len(x)
    lo_p, hi_p = (1 - level) / 2, 1 - (1 - level) / 2
    if n <= exact_max_n:
        dist: dict[float, float] = {}
        log_nfact = math.lgamma(n + 1)
        for combo in itertools.combinations_with_replacement(range(n), n):
            counts: dict[int, int] = {}
            for i in combo:
                counts[i] = counts.get(i, 0) + 1
            log_p = log_nfact - sum(math.lgamma(c + 1) for c in counts.values()) - n * math.log(n)
            mean = round(sum(x[i] * c for i, c in counts.items()) / n, 12)
            dist[mean] = dist.get(mean, 0.0) + math.exp(log_p)
        pairs = list(dist.items())
        return _quantile(pairs, lo_p), _quantile(pairs, hi_p)
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(x) for _ in range(n)) / n for _ in range(n_boot))
    w = 1.0 / n_boot
    pairs = [(m, w) for m in means]
    return _quantile(pairs, lo_p), _quantile(pairs, hi_p)


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """MDE = (z_{1-alpha/2} + z_power) * sd / sqrt(n): the smallest true mean difference that a
    two-sided paired test at level alpha finds with probability `power` (normal approximation;
    2.80 sd / sqrt(n) at the defaults). nan for n < 2."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * sd / math.sqrt(n)


def verdict(lo: float, hi: float, a: str = "A", b: str = "B") -> str:
    """'not detected' when [lo, hi] holds 0 (ends included), else which is higher."""
    if lo <= 0 <= hi:
        return "not detected"
    return f"{a} higher" if lo > 0 else f"{b} higher"


def paired_comparison(a: Mapping[Any, float], b: Mapping[Any, float], name_a: str = "A", name_b: str = "B",
                      level: float = 0.95, power: float = 0.8) -> dict[str, Any]:
    """Paired differences a[s] - b[s] over the seeds s both hold: n, mean, sd, the bootstrap
    interval, the MDE at `power` and the verdict. With fewer than 2 pairs the interval and
    MDE are nan and the verdict says so."""
    seeds = sorted(set(a) & set(b), key=str)
    d = [float(a[s]) - float(b[s]) for s in seeds]
    m, sd = mean_sd(d)
    out: dict[str, Any] = {"a": name_a, "b": name_b, "seeds": seeds, "n": len(d), "mean": m, "sd": sd,
                           "level": level, "power": power}
    if len(d) < 2:
        out.update(ci_low=float("nan"), ci_high=float("nan"), mde=float("nan"),
                   verdict="too few paired seeds")
        return out
    lo, hi = bootstrap_mean_ci(d, level)
    out.update(ci_low=lo, ci_high=hi, mde=min_detectable_effect(sd, len(d), 1 - level, power),
               verdict=verdict(lo, hi, name_a, name_b))
    return out


def eval_noise(records: Sequence[Mapping[str, Any]]) -> float:
    """Sampling standard error of pass@1 over `records` (one per question, each with
    `samples` holding `acc`): with n >= 2 samples per question,
    SE = sqrt(sum_q p_q (1 - p_q) / (n - 1)) / Q, p_q the question's accuracy (the unbiased
    variance of its mean of n draws); with one sample per question the binomial bound
    sqrt(p (1 - p) / Q) of the mean p. nan without records."""
    recs = [r for r in records if r.get("samples")]
    if not recs:
        return float("nan")
    n = min(len(r["samples"]) for r in recs)
    q = len(recs)
    accs = [[float(s["acc"] > 0.5) for s in r["samples"][:n]] for r in recs]
    if n < 2:
        p = sum(a[0] for a in accs) / q
        return math.sqrt(p * (1 - p) / q)
    var = sum((sum(a) / n) * (1 - sum(a) / n) / (n - 1) for a in accs)
    return math.sqrt(var) / q
