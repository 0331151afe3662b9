"""Evaluation runs: every question answered N times by the agent with its tools, then scored.

Writes `samples.jsonl` (one line per question: gold, every rollout's answer and score) as it
goes, so a re-run skips finished questions, and `summary.json` / `summary.md` at the end.
"""
from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aepo.config import RewardConfig, RolloutConfig
from aepo.console import StepProgress
from aepo.data.datasets import TaskRow
from aepo.data.prompting import encode_prompt
from aepo.io import atomic_write_json, atomic_write_text
from aepo.rewards import score_trajectory
from aepo.rewards.metrics import mean_diversity, pass_at_k
from aepo.rollout.sampler import SamplerBackend, build_backend
from aepo.rollout.strategies import rollout


def _ks(n: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    if n not in ks:
        ks.append(n)
    return ks


def evaluate_tasks(
    model: torch.nn.Module | None, tokenizer: Any, tasks: Sequence[TaskRow], tool_fn: Callable, *,
    n: int = 1, rollout_cfg: RolloutConfig | None = None, batch_prompts: int = 32, seed: int = 0,
    samples_path: str | Path | None = None, chat_template: bool = False, progress: bool = True,
    title: str = "eval", backend: SamplerBackend | None = None, reward_cfg: RewardConfig | None = None,
    tools: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Roll out `n` independent samples per task and score them; returns one record per task.

    `backend` supplies the samplers (default: the torch sampler over `model`); `reward_cfg`
    the reward settings of each sample's `reward` (default: `RewardConfig()`); `tools` the
    tools a chat prompt describes (the run's `tools.enabled`; default: every registered one).
    Records already in `samples_path` are reused: the caller makes sure they were made with
    these settings (`aepo.io.claim_keyed_output`)."""
    if n < 1:
        raise ValueError(f"n (samples per question) must be >= 1, got {n}")
    cfg = dataclasses.replace(rollout_cfg or RolloutConfig(), strategy="independent", n=n)
    rw = reward_cfg or RewardConfig()
    done: dict[str, dict] = {}
    if samples_path is not None and Path(samples_path).exists():
        for line in Path(samples_path).read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn last line of a killed run
            if rec.get("n") == n:
                done[rec["id"]] = rec
    todo = [t for t in tasks if t.id not in done]
    if backend is None:
        backend = build_backend(dataclasses.replace(cfg, backend="torch"), model, tokenizer)
    if model is not None:
        model.eval()
    nb = (len(todo) + batch_prompts - 1) // batch_prompts
    with StepProgress(nb, 0, enabled=progress and nb > 0, title=title) as bar:
        for b in range(nb):
            chunk = todo[b * batch_prompts : (b + 1) * batch_prompts]
            sampler = backend.sampler(seed * 7919 + b)
            prompts = [(t.id, encode_prompt(t.question, tokenizer, chat_template=chat_template,
                                            max_tool_calls=cfg.max_tool_calls, tools=tools,
                                            tool_format=cfg.tool_format)) for t in chunk]
            with torch.no_grad():
                trajs, _ = rollout("independent", prompts, sampler, tokenizer, tool_fn, cfg,
                                   random.Random(seed * 31 + b))
            by: dict[str, list] = {}
            for tr in trajs:
                by.setdefault(tr.prompt_id, []).append(tr)
            new = []
            for t in chunk:
                samples = []
                for tr in by.get(t.id, []):
                    s = score_trajectory(tr, t.answers, t.data_source, multi_tool_bonus=rw.multi_tool_bonus,
                                         format_penalty=rw.format_penalty, qa_metric=rw.qa_metric,
                                         tool_format=cfg.tool_format)
                    samples.append({
                        "answer": s.get("answer"), "acc": float(s.get("acc", 0.0)), "em": float(s.get("em", 0.0)),
                        "f1": float(s.get("f1", 0.0)), "reward": float(s.get("reward", 0.0)),
                        "format_ok": bool(s.get("format_ok", False)), "tool_calls": tr.n_tool_calls,
                        "tools": [c.name for c in tr.tool_calls], "length": len(tr.response_ids),
                        "finish": tr.finish_reason, "text": tr.text,
                    })
                rec = {"id": t.id, "data_source": t.data_source, "question": t.question, "gold": t.answers,
                       "n": n, "samples": samples}
                done[t.id] = rec
                new.append(rec)
            if samples_path is not None:
                Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
                with open(samples_path, "a") as f:
                    for rec in new:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            accs = [s["acc"] for r in new for s in r["samples"]]
            bar.advance({"accuracy": float(np.mean(accs)) if accs else 0.0}, weight=len(accs))
    return [done[t.id] for t in tasks if t.id in done]


def judge_records(records: Sequence[dict[str, Any]], judge: Any, *, max_workers: int = 8) -> dict[str, int]:
    """Ask `judge` (an `aepo.data.judge.LLMJudge`) about every sample of `records` that has an
    answer, and store its verdict as the sample's `judge` (True / False, None when the call
    failed or the reply had no verdict; a sample without an answer is False without a call).
    Returns {"judged", "failed"} counts; `summarize` then reports `judge_accuracy` beside the
    rule-based accuracy. A sample judged in an earlier run keeps its verdict."""
    items, where = [], []
    for r in records:
        for s in r["samples"]:
            if s.get("judge") is not None:
                continue
            if not s.get("answer"):
                s["judge"] = False
                continue
            items.append((r["question"], s["answer"], r["gold"]))
            where.append(s)
    verdicts = judge.judge_many(items, max_workers=max_workers) if items else []
    failed = 0
    for s, v in zip(where, verdicts):
        s["judge"] = v.correct
        if v.correct is None:
            failed += 1
            s["judge_error"] = v.error
    return {"judged": len(items), "failed": failed}


def rewrite_samples(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace the per-sample file with `records` (atomically), e.g. after judging."""
    from aepo.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def search_qa_share(tasks: Sequence[TaskRow]) -> float:
    """The share of `tasks` that look like search QA: scored by the QA scorer (EM/F1 on short
    factual answers, as NQ, HotpotQA, Bamboogle or the demo world), not by math equivalence.
    The CLI warns when most rows are such and no search tool is configured."""
    from aepo.rewards import get_scorer, qa_scorer

    if not tasks:
        return 0.0
    return sum(get_scorer(t.data_source, t.answers) is qa_scorer for t in tasks) / len(tasks)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """pass@1 (mean accuracy), unbiased pass@k, EM/F1, tools, length, finish reasons, diversity."""
    if not records:
        return {"n_questions": 0, "n_samples": 0, "pass@1": 0.0}
    n = min(len(r["samples"]) for r in records)
    out: dict[str, Any] = {"n_questions": len(records), "n_samples": n}
    for k in _ks(n):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(sum(s["acc"] > 0.5 for s in r["samples"][:n])), k)
                                          for r in records]))
    flat = [s for r in records for s in r["samples"][:n]]
    out["accuracy"] = float(np.mean([s["acc"] for s in flat]))
    out["em"] = float(np.mean([s["em"] for s in flat]))
    out["f1"] = float(np.mean([s["f1"] for s in flat]))
    out["format_ok"] = float(np.mean([s["format_ok"] for s in flat]))
    out["tool_calls"] = float(np.mean([s["tool_calls"] for s in flat]))
    out["response_length"] = float(np.mean([s["length"] for s in flat]))
    out["finish_reasons"] = dict(Counter(s["finish"] for s in flat))
    out["diversity"] = float(mean_diversity([[s["text"] for s in r["samples"][:n]] for r in records]))
    verdicts = [s["judge"] for s in flat if "judge" in s]
    if verdicts:
        known = [v for v in verdicts if v is not None]
        out["judge_accuracy"] = float(np.mean(known)) if known else float("nan")
        out["judge_failed"] = len(verdicts) - len(known)
    return out


def summary_markdown(summary: dict[str, dict[str, Any]], title: str = "Evaluation") -> str:
    """A markdown table: one row per dataset."""
    if not summary:
        return f"# {title}\n\n(no datasets)\n"
    ks = sorted({int(k.split("@")[1]) for s in summary.values() for k in s if k.startswith("pass@")})
    judged = any("judge_accuracy" in s for s in summary.values())
    head = ["dataset", "questions", "samples"] + [f"pass@{k}" for k in ks] + ["EM", "F1", "tool calls", "length"]
    head += ["judge accuracy"] if judged else []
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary.items():
        row = [name, str(s.get("n_questions", 0)), str(s.get("n_samples", 0))]
        row += [f"{100 * s[f'pass@{k}']:.1f}" if f"pass@{k}" in s else "" for k in ks]
        row += [f"{100 * s.get('em', 0):.1f}", f"{100 * s.get('f1', 0):.1f}", f"{s.get('tool_calls', 0):.2f}",
                f"{s.get('response_length', 0):.0f}"]
        if judged:
            row.append(f"{100 * s['judge_accuracy']:.1f}" if "judge_accuracy" in s else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, summary: dict[str, dict[str, Any]], title: str = "Evaluation") -> None:
    out = Path(out_dir)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary, title))
