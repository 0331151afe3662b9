"""The metrics catalogue: one row per reported metric (key, label, scale, format, where it shows).

The console line, the demo report, `aepo compare` and the plots read their metrics from here,
so a new reported metric is one emission (where it is computed, under its final key) plus one
row. docs/metrics.md is generated from this table (`aepo.eval.report.metrics_reference`).

Views (`Metric.views`), each listing its rows in catalogue order:
- `console`: on the progress line as `short=value`;
- `report`: a row of the demo report's training table (first and last step);
- `plot`: a panel of the demo's training curves;
- `compare`: a panel of `aepo compare`'s curves (mean over seeds);
- `run`: averaged over a run's steps (`aepo.rollout.analyses.analysis_stats`, key without its
  namespace);
- `table`: a column of `aepo compare`'s table (a run-level key of result.json).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METRICS", "VIEWS", "Metric", "format_value", "get_metric", "register_metric", "shown"]

VIEWS = ("console", "report", "plot", "compare", "run", "table")


@dataclass(frozen=True)
class Metric:
    """One catalogue row: `key` as stored (`<name>` marks a family, e.g. tools/<name>/calls),
    `label` for reports and plots, `doc` for docs/metrics.md, `short` for the console line,
    values shown as `scale * value` with format `fmt`."""

    key: str
    label: str
    doc: str
    views: tuple[str, ...] = ()
    short: str = ""
    scale: float = 1.0
    fmt: str = ".3g"
    where: str = "metrics.jsonl"

    def __post_init__(self) -> None:
        bad = [v for v in self.views if v not in VIEWS]
        if bad:
            raise ValueError(f"metric {self.key!r}: unknown view(s) {bad}; views are {list(VIEWS)}")
        if "console" in self.views and not self.short:
            raise ValueError(f"metric {self.key!r}: a console metric needs `short` (its name on the line)")


_S = "metrics.jsonl"
_R = "result.json"
METRICS: list[Metric] = [
    # SFT and evaluation progress lines
    Metric("loss", "SFT loss", "Cross-entropy of the SFT step (SFT's progress line).", ("console",), "loss",
           where="SFT"),
    Metric("accuracy", "evaluation accuracy", "Accuracy of an evaluation batch; the line shows the running mean.",
           ("console",), "acc", where="eval"),
    # reward/: one rollout batch (aepo.rollout.metrics.rollout_metrics)
    Metric("reward/mean", "reward (mean)", "Mean reward of the step's rollout rows (with DAPO overlong shaping).",
           ("console", "report", "plot", "compare"), "R"),
    Metric("reward/std", "reward (sd)", "Population sd of the rows' rewards."),
    Metric("reward/accuracy", "training accuracy", "Share of rows whose answer is correct (score `acc`).",
           ("console", "report", "plot", "compare"), "acc"),
    Metric("reward/f1", "training F1", "Mean answer F1 of the rows."),
    Metric("reward/format_ok", "format rate", "Share of rows that follow the tool-use format."),
    Metric("reward/dynamic_sampling_kept", "groups kept by dynamic sampling",
           "DAPO dynamic sampling: kept groups / drawn prompts."),
    # rollout/
    Metric("rollout/entropy", "token entropy (nats)", "Mean entropy of the generated tokens (sampler's).",
           ("console", "report", "plot", "compare"), "H"),
    Metric("rollout/tool_calls", "tool calls per rollout", "Mean tool calls per row.",
           ("console", "report", "plot", "compare"), "tools"),
    Metric("rollout/branches", "branches per step", "Branch rows the strategy grew this step (ARPO, AEPO).",
           ("console", "report", "plot"), "br"),
    Metric("rollout/response_length", "response length (tokens)", "Mean response tokens per row (tool results too).",
           ("report", "plot")),
    Metric("rollout/rows", "rows", "Rollout rows of the step."),
    Metric("rollout/generated_tokens", "generated tokens",
           "Tokens the sampler generated (a branch's copied prefix counts once)."),
    Metric("rollout/diversity", "diversity", "Distinct clusters among a prompt's rows, mean over prompts."),
    Metric("rollout/mean_l", "mean l", "Mean branch-decision count l reported by the strategy."),
    Metric("rollout/unique_rows", "unique rows", "Unique rows per group reported by the strategy."),
    Metric("rollout/prefix_cache_hit_rate", "prefix-cache hit rate", "vLLM backend: prefix-cache hit rate."),
    Metric("rollout/decode_steps", "decode steps", "Sampling steps of the rollout (docs/algorithms.md section 3.5)."),
    Metric("rollout/mean_active_rows", "rows per decode step", "Tokens sampled per decode step of the rollout."),
    Metric("rollout/critical_path_tokens", "critical path (tokens)",
           "The most model tokens of one row, inherited prefix included."),
    Metric("rollout/speculative_dropped_tokens", "speculative tokens dropped",
           "Tokens of rows started speculatively that no decision made (rollout.speculate)."),
    Metric("rollout/batch_cache_gib", "running batch cache (GiB)",
           "Continuous scheduler, torch backend: the peak size of the running batch's KV cache."),
    Metric("rollout/tool_steps", "tool steps", "Model segments that follow a tool result (aepo.rollout.analyses)."),
    Metric("rollout/high_entropy_step_rate", "high-entropy tool steps", "Share of tool steps with dH > 0.",
           ("run",)),
    Metric("rollout/consecutive_high_entropy_rate", "share of high-entropy tool steps in consecutive runs",
           "Share of high-entropy tool steps in a run of two or more on their chain.", ("report", "compare", "run")),
    Metric("rollout/max_high_entropy_run", "longest high-entropy run",
           "Longest run of consecutive high-entropy tool steps (its run-level value is the maximum)."),
    Metric("rollout/branch_concentration", "share of branches on the top-3 chains",
           "Share of a prompt's branches on its 3 most branched chains, mean over prompts.",
           ("report", "compare", "run")),
    Metric("rollout/branch_top1_share", "share of branches on the most branched chain",
           "As branch_concentration with the top chain only.", ("compare", "run")),
    Metric("rollout/branch_top1_over_uniform", "top chain vs uniform",
           "Top-1 share x branchable chains: 1 uniform, n all on one of n.", ("run",)),
    Metric("rollout/m_mean", "m (mean)", "AEPO's global rows m per prompt, mean.", ("report",)),
    Metric("rollout/m_min", "m (min)", "Smallest m over the prompts."),
    Metric("rollout/m_max", "m (max)", "Largest m over the prompts."),
    Metric("rollout/m_std", "spread of m across prompts (sd)", "Population sd of m over the prompts.",
           ("report", "compare", "run")),
    Metric("rollout/dH_mean", "dH (mean)", "Entropy shift dH over the branch decisions, mean."),
    Metric("rollout/dH_std", "dH (sd)", "Population sd of dH over the branch decisions.", ("report", "run")),
    Metric("rollout/dH_min", "dH (min)", "Smallest dH of a branch decision."),
    Metric("rollout/dH_max", "dH (max)", "Largest dH of a branch decision."),
    Metric("rollout/decisions", "branch decisions", "Branch decisions taken this step."),
    Metric("rollout/branch_rate", "branch decisions that branched", "Branched decisions / decisions.",
           ("report", "compare", "run")),
    Metric("rollout/h_gap_mean", "H_root - H_tool (mean)", "AEPO pre-monitoring's entropy gap, mean over prompts."),
    Metric("rollout/h_gap_std", "H_root - H_tool (sd)", "Population sd of the gap over the pre-monitored prompts."),
    Metric("rollout/finish/<reason>", "finish reasons", "Share of rows that ended for <reason> (answer, eos, ...)."),
    # tools/ (aepo.rollout.metrics.tool_metrics) and audit/
    Metric("tools/<name>/calls", "tool calls", "Calls of tool <name> (each counted once, by the row that made it)."),
    Metric("tools/<name>/error_rate", "tool error rate", "Share of its calls that failed or timed out."),
    Metric("tools/<name>/timeout_rate", "tool timeout rate", "Share of its calls that timed out."),
    Metric("tools/<name>/seconds", "tool seconds", "Mean seconds per call."),
    Metric("tools/malformed_calls", "malformed calls", "Calls the protocol rejected before any tool ran."),
    Metric("tools/malformed_rate", "malformed-call rate", "Malformed calls / all calls."),
    Metric("audit/<check>", "audit violations", "Rows that break token-level check <check> (aepo.rollout.audit)."),
    # actor/: the update (aepo.train.update.UpdateStats, the policy loss's own metrics)
    Metric("actor/pg_loss", "policy loss", "Policy loss, mean over micro-batches.", ("console",), "loss"),
    Metric("actor/grad_norm", "gradient norm", "Gradient norm before clipping, mean over optimizer steps.",
           ("console",), "|g|"),
    Metric("actor/entropy_clipped", "H clipped tokens", "Training-pass entropy of the tokens the loss clipped.",
           ("report", "run")),
    Metric("actor/entropy_all", "H all tokens", "Training-pass entropy of all response tokens.", ("report", "run")),
    Metric("actor/adv_mean", "advantage (mean)", "Token-weighted mean of the advantages the loss used."),
    Metric("actor/adv_abs_mean", "|advantage| (mean)", "Token-weighted mean of their absolute values."),
    Metric("actor/lr", "learning rate", "Learning rate after the update."),
    Metric("actor/kl_ref", "KL to the reference", "KL penalty to the reference policy (actor.kl_coef > 0)."),
    Metric("actor/rollout_logprob_diff", "sampler vs trainer log-prob",
           "Mean |sampler - trainer| log-prob of the response tokens (recomputed pi_old)."),
    Metric("actor/skipped_update", "skipped update", "1 when no row carried a learning signal (no update)."),
    Metric("actor/<loss metric>", "loss metrics", "The policy loss's and EPO's own figures (clip fractions, ...)."),
    Metric("timing/rollout", "rollout seconds", "Seconds of the step's rollout."),
    Metric("timing/step", "step seconds", "Seconds of the whole step."),
    # run level: result.json of a demo or compare run, columns of `aepo compare`'s table
    Metric("pass@1", "pass@1", "Held-out accuracy of one sample per question.", ("table",), scale=100, where=_R),
    Metric("pass@{k}", "pass@{k}", "Held-out pass@k over eval.n samples.", ("table",), scale=100, where=_R),
    Metric("tool_calls", "tool calls", "Tool calls per held-out rollout.", ("table",), where=_R),
    Metric("diversity", "diversity", "Held-out rollout diversity.", ("table",), where=_R),
    Metric("consecutive_high_entropy_rate", "consecutive high-H steps (%)", "Run mean of the per-step figure.",
           ("table",), scale=100, where=_R),
    Metric("branch_concentration", "branches on top-3 chains (%)", "Run mean of the per-step figure.", ("table",),
           scale=100, where=_R),
    Metric("branch_top1_share", "branches on top chain (%)", "Run mean of the per-step figure.", ("table",),
           scale=100, where=_R),
    Metric("branch_top1_over_uniform", "top chain vs uniform over branchable chains (x)",
           "Run mean of the per-step figure.", ("table",), where=_R),
    Metric("branch_rate", "branch rate (%)", "Run mean of the per-step figure.", ("table",), scale=100, where=_R),
    Metric("m_std", "sd of m", "Run mean of the per-step figure.", ("table",), where=_R),
    Metric("entropy_clipped", "H clipped tokens", "Run mean of the per-step figure.", ("table",), where=_R),
    Metric("entropy_all", "H all tokens", "Run mean of the per-step figure.", ("table",), where=_R),
    Metric("final_entropy", "final entropy", "rollout/entropy over the last fifth of the steps.", ("table",),
           where=_R),
    Metric("entropy_variation", "entropy sd over training", "sd of rollout/entropy over all steps.", ("table",),
           where=_R),
    Metric("wall_seconds", "wall (s)", "Seconds the run took.", ("table",), where=_R),
]


def register_metric(metric: Metric) -> Metric:
    """Add a row (a key already in the catalogue is refused, naming it)."""
    if any(m.key == metric.key for m in METRICS):
        raise ValueError(f"metric {metric.key!r} is already in the catalogue")
    METRICS.append(metric)
    return metric


def get_metric(key: str) -> Metric:
    """The row of `key` (KeyError naming the key when it has none)."""
    for m in METRICS:
        if m.key == key:
            return m
    raise KeyError(f"metric {key!r} is not in the catalogue (aepo.catalogue.METRICS)")


def shown(view: str) -> list[Metric]:
    """The rows of `view`, in catalogue order."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views are {list(VIEWS)}")
    return [m for m in METRICS if view in m.views]


def format_value(metric: Metric, value: float) -> str:
    """`value` as the catalogue shows it: scaled, in the row's format."""
    return format(metric.scale * value, metric.fmt)
