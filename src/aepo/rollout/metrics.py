"""One rollout batch's step metrics, under the keys metrics.jsonl stores them by.

`rollout_metrics` gives `reward/` (mean, std, accuracy, f1, format_ok, dynamic_sampling_kept),
`rollout/` (entropy of the sampled tokens, tool calls, length, m and dH spread, branching and the
paper's analyses of `aepo.rollout.analyses`, finish/<reason>) and, through `tool_metrics`,
`tools/<name>/` (calls, error and timeout rates, seconds). `audit_metrics` gives `audit/<check>`.
Every key is written here once, in its final form; `aepo.catalogue.METRICS` labels the ones
reports show (docs/metrics.md).
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Any

import numpy as np

from aepo.protocol import MALFORMED_CALL
from aepo.rewards.metrics import mean_diversity
from aepo.rollout.analyses import rollout_analyses
from aepo.rollout.audit import audit_rows
from aepo.tools.runner import is_timeout
from aepo.types import ToolCall, Trajectory

__all__ = ["FAILING_TOOL_MIN_CALLS", "FAILING_TOOL_RATE", "MALFORMED_CALL_PREFIX", "audit_metrics",
           "is_malformed_call", "own_tool_calls", "rollout_metrics", "tool_metrics", "warn_failing_tool"]

_log = logging.getLogger(__name__)

# The result text every tool format gives a call the environment could not act on (a closing
# tag without its opening tag, an empty argument, invalid JSON, an unknown tool): aepo.protocol's.
MALFORMED_CALL_PREFIX = MALFORMED_CALL
# A tool failing on more than this share of at least FAILING_TOOL_MIN_CALLS calls in a step is logged.
FAILING_TOOL_RATE = 0.5
FAILING_TOOL_MIN_CALLS = 4
# figures a strategy or sampler backend reports in its stats, passed through when numeric
_STAT_KEYS = {"branches": "rollout/branches", "mean_l": "rollout/mean_l", "unique_rows": "rollout/unique_rows",
              "dynamic_sampling_kept": "reward/dynamic_sampling_kept",
              "prefix_cache_hit_rate": "rollout/prefix_cache_hit_rate", "decode_steps": "rollout/decode_steps",
              "mean_active_rows": "rollout/mean_active_rows",
              "critical_path_tokens": "rollout/critical_path_tokens",
              "speculative_dropped_tokens": "rollout/speculative_dropped_tokens",
              "batch_cache_gib": "rollout/batch_cache_gib"}


def rollout_metrics(trajs: list[Trajectory], stats: dict) -> dict[str, float]:
    """Reward, accuracy, entropy, tool use, length and branching figures of one rollout batch,
    with per-tool call counts, error and timeout rates (`tool_metrics`)."""
    if not trajs:
        return {}
    rewards = np.array([t.reward for t in trajs], dtype=float)
    acc = np.array([float(t.score.get("acc", 0.0)) for t in trajs])
    ents = [e for t in trajs for e, m in zip(t.entropies, t.response_mask) if m]
    out: dict[str, float] = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "reward/accuracy": float(acc.mean()),
        "reward/f1": float(np.mean([float(t.score.get("f1", 0.0)) for t in trajs])),
        "reward/format_ok": float(np.mean([float(bool(t.score.get("format_ok", False))) for t in trajs])),
        "rollout/entropy": float(np.mean(ents)) if ents else 0.0,
        "rollout/tool_calls": float(np.mean([t.n_tool_calls for t in trajs])),
        "rollout/response_length": float(np.mean([len(t.response_ids) for t in trajs])),
        "rollout/rows": float(len(trajs)),
        # tokens the sampler generated: a branch row's copied prefix was generated once, by its parent
        "rollout/generated_tokens": float(sum(sum(t.response_mask[t.branch_position or 0:]) for t in trajs)),
    }
    groups: dict[str, list[Trajectory]] = {}
    for t in trajs:
        groups.setdefault(t.prompt_id, []).append(t)
    out["rollout/diversity"] = float(mean_diversity([[t.text for t in g] for g in groups.values()]))
    for k, key in _STAT_KEYS.items():
        v = stats.get(k)
        if isinstance(v, (int, float)):
            out[key] = float(v)
    out.update(branching_metrics(stats))
    for reason, c in Counter(t.finish_reason for t in trajs).items():
        out[f"rollout/finish/{reason}"] = c / len(trajs)
    # the paper's analyses: consecutive high-entropy steps, concentration
    out.update({f"rollout/{k}": v for k, v in rollout_analyses(trajs).items()})
    out.update(tool_metrics(trajs))
    return out


def branching_metrics(stats: dict) -> dict[str, float]:
    """Whether the entropy mechanisms are live (docs/algorithms.md section 1, 3.3 item 3): the
    spread of m over the prompts, of dH over the branch decisions, branch_rate = branched
    decisions / decisions (one on a prompt without budget left counts as not branched), and for
    AEPO the spread of H_root - H_tool over the pre-monitored prompts; std is the population
    std, and a figure whose population is empty is left out."""
    out: dict[str, float] = {}
    m_values = [float(x) for x in stats.get("m") or [] if isinstance(x, (int, float))]
    if m_values:
        out.update({"rollout/m_mean": float(np.mean(m_values)), "rollout/m_min": min(m_values),
                    "rollout/m_max": max(m_values), "rollout/m_std": float(np.std(m_values))})
    decisions = [d for d in stats.get("decisions") or [] if isinstance(d, dict)]
    if decisions:
        dh = [float(d["dH"]) if d.get("dH") is not None else float(d["h_now"]) - float(d["h_init"])
              for d in decisions]
        out.update({"rollout/dH_mean": float(np.mean(dh)), "rollout/dH_std": float(np.std(dh)),
                    "rollout/dH_min": min(dh), "rollout/dH_max": max(dh), "rollout/decisions": float(len(decisions)),
                    "rollout/branch_rate": sum(bool(d.get("branched")) for d in decisions) / len(decisions)})
    gap = [float(r) - float(t) for r, t in zip(stats.get("h_root") or [], stats.get("h_tool") or [])
           if r is not None and t is not None]
    if gap:
        out.update({"rollout/h_gap_mean": float(np.mean(gap)), "rollout/h_gap_std": float(np.std(gap))})
    return out


def own_tool_calls(traj: Trajectory) -> list[ToolCall]:
    """The tool calls `traj` made itself, without those it inherited from its parent.

    A branch row starts as a copy of its parent's first `branch_position` response tokens,
    including the tool calls whose result segment ends there (fork_row_state); those calls ran
    once, and the parent row (also in the batch) reports them. Counting per row would count a
    call once per branch that copied it, overstating the busiest calls.
    """
    if traj.branch_position is None:
        return list(traj.tool_calls)
    inherited = traj.tool_results_before(traj.branch_position)
    return traj.tool_calls[inherited:]


def is_malformed_call(call: ToolCall) -> bool:
    """A call the protocol rejected before any tool ran (see MALFORMED_CALL_PREFIX)."""
    return not call.ok and call.result.startswith(MALFORMED_CALL_PREFIX)


def tool_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Per tool name: `tools/<name>/calls`, `error_rate`, `timeout_rate` and mean `seconds`.

    Each call is counted once (`own_tool_calls`). A call failed when it is not ok or timed out,
    so error_rate >= timeout_rate. Malformed calls never reached a tool, so they do not count
    against the tool whose tag they used: they are `tools/malformed_calls` (a count) and
    `tools/malformed_rate` (their share of all calls). Calls made by an AEPO probe row that is
    not kept in the batch are not seen here. A tool that fails on most of a step's calls is
    logged as a warning (`warn_failing_tool`).
    """
    calls = [c for t in trajs for c in own_tool_calls(t)]
    if not calls:
        return {}
    malformed = [c for c in calls if is_malformed_call(c)]
    out = {"tools/malformed_calls": float(len(malformed)),
           "tools/malformed_rate": len(malformed) / len(calls)}
    by_name: dict[str, list[ToolCall]] = {}
    for c in calls:
        if not is_malformed_call(c):
            by_name.setdefault(c.name, []).append(c)
    for name, group in sorted(by_name.items()):
        failed = [c for c in group if not c.ok or is_timeout(c)]
        n = len(group)
        out[f"tools/{name}/calls"] = float(n)
        out[f"tools/{name}/error_rate"] = len(failed) / n
        out[f"tools/{name}/timeout_rate"] = sum(1 for c in group if is_timeout(c)) / n
        out[f"tools/{name}/seconds"] = float(np.mean([c.seconds for c in group]))
        warn_failing_tool(name, n, failed)
    return out


def warn_failing_tool(name: str, n_calls: int, failed: list[ToolCall]) -> None:
    """Log a warning when tool `name` failed on most (> FAILING_TOOL_RATE) of at least
    FAILING_TOOL_MIN_CALLS calls, with one error text, so a broken tool does not go unseen."""
    if n_calls < FAILING_TOOL_MIN_CALLS or len(failed) <= FAILING_TOOL_RATE * n_calls:
        return
    example = " ".join(failed[0].result.split())
    if len(example) > 300:
        example = example[:300] + " ..."
    _log.warning("tool %r failed on %d of %d calls (%.0f%%) in this step's rollout; e.g. %s",
                 name, len(failed), n_calls, 100 * len(failed) / n_calls, example)


def audit_metrics(trajs: list[Trajectory], tokenizer: Any, tool_format: str, *,
                  warn: bool) -> tuple[dict[str, float], bool]:
    """`audit/<check>`: the rows that break a token-level check (`aepo.rollout.audit`), and
    whether a warning naming the first violation (row and problem) was issued; with `warn`
    False (the run warned already) none is."""
    found = audit_rows(trajs, tokenizer, tool_format)
    first = next(((c, v[0]) for c, v in found.items() if v), None) if warn else None
    if first is not None:
        warnings.warn(f"rollout audit: {first[0]} violated ({first[1]}); the metrics audit/* count such "
                      "rows every step (warned once)", RuntimeWarning, stacklevel=2)
    return {f"audit/{c}": float(len(v)) for c, v in found.items()}, first is not None
