"""Does AEPO's branching pay? The mechanism measured on a fixed policy (docs/algorithms.md
section 8, "Branching analysis"; `aepo analyze branching`).

For each prompt, ARPO and AEPO trees of k rows are rolled out. At every branch decision
(the state right after a tool result) the success probability q of that state is estimated by
C Monte-Carlo continuations (each a branch forked there and run to the end, scored like a
training row). Then:

- `auroc_dH_vs_uncertainty`: does dH rank the states by q(1 - q), the variance of a branch's
  reward there (`concordance_auroc`: over pairs of states with different q(1 - q), the share
  where dH orders them the same way; 1 = perfectly, 0.5 = chance), with a 95% interval from
  resampling whole questions (`auroc_interval`); every state is listed in `state_records`.
- arms at equal rows per prompt (k): `independent`, `arpo`, `aepo` (their own rollouts), and
  from the ARPO tree's global rows plus k - m continuation rows placed at its decision states:
  `random` (states drawn uniformly) and `oracle` (states with the highest q(1 - q)). Each arm:
  `learnable_groups` (share of prompts whose k rewards are not all equal), `sibling_disagreement`
  (share of branch rows whose accuracy differs from the row they branched from), `tokens`
  (generated per prompt; a copied prefix counts once), `distinct_tool_paths` (distinct tool-call
  sequences per prompt), `branch_depth` (tool calls before the branch point), pass@1.
- the AEPO penalty at fixed m (no pre-monitoring, m = k / 2) for each lambda_pen given.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from aepo.rollout.agent import Agent, RowState, ToolFn, fork_row_state
from aepo.rollout.config import RolloutConfig
from aepo.rollout.strategies import default_global_budget, rollout
from aepo.types import Sampler, Trajectory

__all__ = ["ARMS", "analyze_branching", "arm_metrics", "auroc_interval", "concordance_auroc", "continuations"]

ARMS = ("independent", "arpo", "aepo", "random", "oracle")

Scorer = Callable[[Trajectory], dict[str, float]]


def concordance_auroc(scores: Sequence[float], targets: Sequence[float]) -> float:
    """AUROC of `scores` against `targets`, generalised to graded targets (Harrell's C): over
    every pair (i, j) with targets[i] > targets[j], 1 when scores[i] > scores[j], 1/2 on a tie
    of scores, 0 otherwise, averaged. With 0/1 targets this is the AUROC. nan without such a pair."""
    s = np.asarray(scores, dtype=float)
    t = np.asarray(targets, dtype=float)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"scores and targets must be two lists of one length, got {s.shape} and {t.shape}")
    dt = t[:, None] - t[None, :]
    ds = s[:, None] - s[None, :]
    pairs = dt > 0
    n = int(pairs.sum())
    if n == 0:
        return float("nan")
    wins = ((ds > 0) & pairs).sum() + 0.5 * ((ds == 0) & pairs).sum()
    return float(wins / n)


def auroc_interval(groups: Sequence[object], scores: Sequence[float], targets: Sequence[float],
                   level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `concordance_auroc` with the units resampled by group
    (the states of one question together, since they share a question and a tree), `n_boot`
    seeded resamples; resamples without a usable pair are skipped. None when none is usable."""
    by_group: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    keys = list(by_group)
    s, t = np.asarray(scores, dtype=float), np.asarray(targets, dtype=float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([by_group[keys[j]] for j in rng.integers(0, len(keys), len(keys))])
        v = concordance_auroc(s[idx], t[idx])
        if not np.isnan(v):
            values.append(v)
    if not values:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _generated(t: Trajectory) -> int:
    return int(sum(t.response_mask[t.branch_position or 0:]))


def _tool_path(t: Trajectory) -> tuple[tuple[str, str], ...]:
    return tuple((c.name, " ".join(c.argument.lower().split())) for c in t.tool_calls)


def continuations(sampler: Sampler, tokenizer: Any, tool_fn: ToolFn, cfg: RolloutConfig,
                  states: Sequence[tuple[Trajectory, int]], c: int, batch_rows: int = 64) -> list[list[Trajectory]]:
    """`c` continuations of each state (trajectory, response position): the row's prefix up to
    `position` is put in a fresh sampler row and forked `c` times (`fork_row_state`), and every
    fork runs to the end under `cfg` (tools, budgets). Returns, per state, its `c` trajectories
    (each a branch of the state's row: parent_row_id and branch_position set)."""
    out: list[list[Trajectory]] = [[] for _ in states]
    agent = Agent(sampler, tokenizer, tool_fn, cfg)
    per_batch = max(1, batch_rows // max(1, c))
    for start in range(0, len(states), per_batch):
        rows: list[tuple[int, RowState]] = []
        for i in range(start, min(len(states), start + per_batch)):
            traj, position = states[i]
            base = sampler.new_row(list(traj.prompt_ids) + list(traj.response_ids[:position]))
            parent = RowState(row=base, group=0, traj=traj)
            for j in range(c):
                rows.append((i, fork_row_state(sampler, parent, position, row_id=j)))
            sampler.release(base)
        try:
            while True:
                active = [s for _, s in rows if not s.finished]
                if not active:
                    break
                agent.step(active)
        finally:
            for _, s in rows:
                sampler.release(s.row)
        for i, s in rows:
            agent.finalize_text(s)
            out[i].append(s.traj)
    return out


def arm_metrics(groups: Sequence[Sequence[tuple[Trajectory, dict[str, float], int | None]]]) -> dict[str, float]:
    """The metrics of one arm from its groups: per prompt, (row, its score, the index in the
    group of the row it branched from or None for a global row)."""
    learnable, disagree, tokens, paths, depth, acc, branches = [], [], [], [], [], [], []
    for g in groups:
        rewards = [s["reward"] for _, s, _ in g]
        learnable.append(float(max(rewards) > min(rewards)))
        tokens.append(sum(_generated(t) for t, _, _ in g))
        paths.append(len({_tool_path(t) for t, _, _ in g}))
        acc += [float(s["acc"]) for _, s, _ in g]
        n_branch = 0
        for t, s, parent in g:
            if parent is None:
                continue
            n_branch += 1
            disagree.append(float((s["acc"] > 0.5) != (g[parent][1]["acc"] > 0.5)))
            pos = t.branch_position or 0
            depth.append(t.tool_results_before(pos))
        branches.append(n_branch)

    def mean(xs: list[float]) -> float | None:
        return float(np.mean(xs)) if xs else None

    return {"prompts": len(groups), "pass@1": mean(acc), "learnable_groups": mean(learnable),
            "sibling_disagreement": mean(disagree), "tokens": mean(tokens), "distinct_tool_paths": mean(paths),
            "branch_depth": mean(depth), "branches_per_prompt": mean(branches)}


def _tree_groups(trajs: Sequence[Trajectory], scores: Sequence[dict[str, float]], k: int) -> list[list]:
    groups = []
    for p in range(len(trajs) // k):
        rows = list(zip(trajs[p * k:(p + 1) * k], scores[p * k:(p + 1) * k]))
        groups.append([(t, s, t.parent_row_id) for t, s in rows])
    return groups


def _states(trajs: Sequence[Trajectory], decisions: Sequence[dict], k: int) -> list[dict[str, Any]]:
    """One state per logged decision: its prompt index, row, position, dH, and whether it branched."""
    return [{"prompt": d["prompt"], "row": trajs[d["prompt"] * k + d["row_id"]], "row_id": d["row_id"],
             "position": d["position"], "dH": float(d["dH"]), "branched": bool(d["branched"])} for d in decisions]


def _placed_arm(global_rows: list[tuple[Trajectory, dict[str, float]]], states: list[dict[str, Any]],
                order: list[int], budget: int, fill: list[tuple[Trajectory, dict[str, float]]]) -> list:
    """m global rows plus `budget` continuation rows taken from `states` in `order` (one per state
    per pass, at most C per state); rows still missing come from `fill` (fresh global rows)."""
    group: list = [(t, s, None) for t, s in global_rows]
    by_id = {t.row_id: i for i, (t, _) in enumerate(global_rows)}
    used = [0] * len(states)
    while budget > 0 and order:
        placed = False
        for i in order:
            if budget == 0:
                break
            st = states[i]
            if used[i] < len(st["conts"]):
                t, s = st["conts"][used[i]]
                used[i] += 1
                group.append((t, s, by_id[st["row_id"]]))
                budget -= 1
                placed = True
        if not placed:
            break
    for t, s in fill[:budget]:
        group.append((t, s, None))
    return group


def analyze_branching(sampler: Sampler, tokenizer: Any, tool_fn: ToolFn, prompts: Sequence[tuple[str, Sequence[int]]],
                      score: Callable[[Trajectory], dict[str, float]], cfg: RolloutConfig, *, k: int,
                      continuations_per_state: int, seed: int = 0, lambdas: Sequence[float] = (0.05, 0.1, 0.2),
                      batch_prompts: int = 16, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The branching analysis of the module docstring on `prompts` ((id, token ids) pairs).
    `score(traj)` returns at least {"reward", "acc"} for a finished row of its prompt (the row's
    prompt_id names it). `cfg` holds the rollout settings (its n is replaced by k). Returns the
    JSON-ready report."""
    if k < 2:
        raise ValueError(f"--k must be >= 2 (rows per prompt, so that a tree can branch), got {k}")
    if continuations_per_state < 2:
        raise ValueError(f"--continuations must be >= 2 (Monte-Carlo samples of q per state), got "
                         f"{continuations_per_state}")
    if not prompts:
        raise ValueError("no prompts to analyse")
    cfg = dataclasses.replace(cfg, n=k)
    rng = random.Random(seed)
    say = progress or (lambda _msg: None)
    arms: dict[str, list] = {a: [] for a in ARMS}
    penalty: dict[str, list] = {f"{lam:g}": [] for lam in lambdas}
    all_states: dict[str, list[dict[str, Any]]] = {"arpo": [], "aepo": []}
    m_fixed = default_global_budget(cfg)
    for b0 in range(0, len(prompts), batch_prompts):
        batch = list(prompts[b0:b0 + batch_prompts])
        say(f"prompts {b0 + 1}-{b0 + len(batch)} of {len(prompts)}")
        runs: dict[str, tuple[list[Trajectory], dict[str, Any], list[dict[str, float]]]] = {}
        for name in ("independent", "arpo", "aepo"):
            trajs, stats = rollout(name, batch, sampler, tokenizer, tool_fn, cfg, rng)
            runs[name] = (trajs, stats, [score(t) for t in trajs])
        for name in ("independent", "arpo", "aepo"):
            trajs, _, scores = runs[name]
            arms[name] += _tree_groups(trajs, scores, k)
        for lam in lambdas:
            pcfg = dataclasses.replace(cfg, premonitor=False, branch_penalty=float(lam))
            trajs, stats = rollout("aepo", batch, sampler, tokenizer, tool_fn, pcfg, rng)
            groups = _tree_groups(trajs, [score(t) for t in trajs], k)
            for g, ls in zip(groups, stats["l_values"]):
                penalty[f"{lam:g}"].append((g, ls))
        # q at every decision state of the two trees
        for name in ("arpo", "aepo"):
            trajs, stats, _ = runs[name]
            states = _states(trajs, stats["decisions"], k)
            conts = continuations(sampler, tokenizer, tool_fn, cfg, [(s["row"], s["position"]) for s in states],
                                  continuations_per_state)
            for st, cs in zip(states, conts):
                scored = [(t, score(t)) for t in cs]
                st["conts"] = scored
                st["q"] = float(np.mean([s["acc"] > 0.5 for _, s in scored]))
                st["prompt"] += b0
            all_states[name] += states
        # random and oracle arms: ARPO's m global rows plus k - m rows placed at its global rows' states
        trajs, _, scores = runs["arpo"]
        ind_trajs, _, ind_scores = runs["independent"]
        for p in range(len(batch)):
            rows = list(zip(trajs[p * k:(p + 1) * k], scores[p * k:(p + 1) * k]))
            glob = [(t, s) for t, s in rows if t.parent_row_id is None and t.row_id < m_fixed]
            mine = [st for st in all_states["arpo"] if st["prompt"] == b0 + p
                    and st["row"].parent_row_id is None and st["row_id"] < m_fixed]
            fill = list(zip(ind_trajs[p * k:(p + 1) * k], ind_scores[p * k:(p + 1) * k]))
            budget = k - len(glob)
            order = list(range(len(mine)))
            rng.shuffle(order)
            arms["random"].append(_placed_arm(glob, mine, order, budget, fill))
            oracle = sorted(range(len(mine)), key=lambda i: -mine[i]["q"] * (1 - mine[i]["q"]))
            arms["oracle"].append(_placed_arm(glob, mine, oracle, budget, fill))
    report: dict[str, Any] = {"prompts": len(prompts), "k": k, "continuations": continuations_per_state,
                              "m_global": m_fixed, "seed": seed}
    states = all_states["arpo"] + all_states["aepo"]
    u = [s["q"] * (1 - s["q"]) for s in states]
    report["states"] = len(states)
    report["auroc_dH_vs_uncertainty"] = concordance_auroc([s["dH"] for s in states], u) if states else None
    report["auroc_interval"] = auroc_interval([s["prompt"] for s in states], [s["dH"] for s in states], u,
                                              seed=seed) if states else None
    report["auroc_by_tree"] = {
        name: (concordance_auroc([s["dH"] for s in st], [s["q"] * (1 - s["q"]) for s in st]) if st else None)
        for name, st in all_states.items()}
    report["q"] = {"mean": float(np.mean([s["q"] for s in states])) if states else None,
                   "uncertain_share": float(np.mean([0 < s["q"] < 1 for s in states])) if states else None,
                   "mean_q_one_minus_q": float(np.mean(u)) if states else None,
                   "dH_mean": float(np.mean([s["dH"] for s in states])) if states else None,
                   "dH_positive_share": float(np.mean([s["dH"] > 0 for s in states])) if states else None}
    branched = [s for s in states if s["branched"]]
    report["q_one_minus_q_where_branched"] = (float(np.mean([s["q"] * (1 - s["q"]) for s in branched]))
                                             if branched else None)
    report["arms"] = {a: arm_metrics(g) for a, g in arms.items()}
    report["state_records"] = [{"tree": name, "question": st["prompt"], "row_id": st["row_id"],
                                "position": st["position"], "dH": st["dH"], "q": st["q"], "branched": st["branched"]}
                               for name, sts in all_states.items() for st in sts]
    report["penalty_at_fixed_m"] = {}
    for lam, items in penalty.items():
        met = arm_metrics([g for g, _ in items])
        all_l = [x for _, ls in items for x in ls]
        met["mean_l"] = float(np.mean(all_l)) if all_l else 0.0
        met["decisions"] = len(all_l)
        report["penalty_at_fixed_m"][lam] = met
    return report
