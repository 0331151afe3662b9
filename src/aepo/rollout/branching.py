"""The branching formulas of ARPO and AEPO (docs/algorithms.md sections 3.2, 3.3): the branch
score and decision rule, AEPO's penalty on consecutive branches, and the global budget m from
entropy pre-monitoring. The strategies (`aepo.rollout.strategies`) call these; nothing here
keeps state.
"""
from __future__ import annotations

import math
import random

from aepo.rollout.config import RolloutConfig

__all__ = [
    "BRANCH_DECISIONS",
    "aepo_branch_probability",
    "aepo_global_budget",
    "arpo_branch_probability",
    "branch_decision",
    "default_global_budget",
]


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def arpo_branch_probability(alpha: float, beta: float, delta_h: float) -> float:
    """ARPO: P = clip(alpha + beta * dH, 0, 1), dH = H_now - H_init."""
    return _clip01(alpha + beta * delta_h)


def _penalty_factor(penalty: float, l: int) -> float:
    """1 - lambda_pen * l, floored at 0: a long run of branches can stop branching, never invert
    the sign of the score (only reachable when lambda_pen * l > 1)."""
    return max(0.0, 1.0 - penalty * l)


def aepo_branch_probability(alpha: float, gamma: float, delta_h: float, penalty: float, l: int) -> float:
    """AEPO: P = clip((alpha + gamma * dH) * (1 - lambda_pen * l), 0, 1), l = consecutive
    branched tool steps."""
    return _clip01((alpha + gamma * delta_h) * _penalty_factor(penalty, l))


BRANCH_DECISIONS = ("threshold", "released", "sample")


def branch_decision(
    rule: str, alpha: float, coef: float, delta_h: float, penalty: float, l: int, tau: float,
    rng: random.Random,
) -> tuple[float, bool]:
    """The branch decision of ARPO and AEPO (docs/algorithms.md section 3.2, 3.3) -> (p, branch).

    `coef` is ARPO's beta or AEPO's gamma; ARPO passes penalty = 0, l = 0. With the penalty
    factor f = max(0, 1 - lambda_pen * l):

    - "threshold" (the paper): p = (alpha + coef * dH) * f, branch when p > tau. Deterministic
      given dH; for ARPO (f = 1) it branches when coef * dH > tau - alpha, i.e. dH > 0.5 at the
      defaults alpha = 0.4, coef = 0.2, tau = 0.5 (with alpha = tau it would be dH > 0 whatever
      coef is, docs/algorithms.md section 3.2).
    - "released" (the authors' code): p = (U + coef * dH) * f with U = rng.random() ~ U(0, 1),
      branch when p >= tau (tau = 0.5 is the released constant).
    - "sample": p = clip((alpha + coef * dH) * f, 0, 1), branch when rng.random() < p.

    `p` is the score the rule compared (a probability only for "sample"). "released" and
    "sample" draw one rng.random() each; "threshold" draws nothing. The budget is not checked
    here: a decision that wants to branch on a prompt with no budget left does not branch.

    The default is `threshold`, chosen from demo measurements (docs/algorithms.md section 3.3,
    "Choices and differences"): dH is a useful signal there, and under `sample` and `released`
    the entropy term is nearly inert against their coin of 0.5.
    """
    f = _penalty_factor(penalty, l)
    if rule == "threshold":
        p = (alpha + coef * delta_h) * f
        return p, p > tau
    if rule == "released":
        p = (rng.random() + coef * delta_h) * f
        return p, p >= tau
    if rule == "sample":
        p = _clip01((alpha + coef * delta_h) * f)
        return p, rng.random() < p
    raise ValueError(f"rollout.branch_decision must be one of {', '.join(BRANCH_DECISIONS)}, got {rule!r}")


def aepo_global_budget(n: int, h_root: float, h_tool: float, beta_pm: float, compat: bool = False) -> int:
    """AEPO pre-monitoring: m = clamp(round(n * sigmoid(beta_pm * (H_root - H_tool))), 1, n).

    `round` is half-up (2.5 -> 3). `compat` reproduces the released code: int(n * sigmoid) + 1,
    clamped to [1, n].
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    x = beta_pm * (h_root - h_tool)
    sig = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    share = n * sig
    m = int(share) + 1 if compat else math.floor(share + 0.5)
    return max(1, min(n, m))


def default_global_budget(cfg: RolloutConfig) -> int:
    """m without pre-monitoring: rollout.initial_rollouts, or n // 2 when it is 0 (at least 1)."""
    return max(1, min(cfg.n, cfg.initial_rollouts or cfg.n // 2))
