"""Evaluation runs: every question answered N times by the agent with its tools, then scored.

Writes `samples.jsonl` (one line per question: gold, every rollout's answer and score) as it
goes, so a re-run skips finished questions, and `summary.json` / `summary.md` at the end.
"""
from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from aepo.config import RolloutConfig
from aepo.eval.metrics import mean_diversity, pass_at_k
from aepo.io import atomic_write_json, atomic_write_text
from aepo.rollout.strategies import rollout
from aepo.rollout.torch_sampler import TorchSampler
from aepo.tasks.datasets import TaskRow
from aepo.tasks.prompting import encode_prompt
from aepo.tasks.rewards import score_trajectory
from aepo.train.console import StepProgress


def _ks(n: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    if n not in ks:
        ks.append(n)
    return ks


def evaluate_tasks(
    model: torch.nn.Module, tokenizer: Any, tasks: Sequence[TaskRow], tool_fn: Callable, *,
    n: int = 1, rollout_cfg: RolloutConfig | None = None, batch_prompts: int = 32, seed: int = 0,
    samples_path: str | Path | None = None, chat_template: bool = False, progress: bool = True,
    title: str = "eval",
) -> list[dict[str, Any]]:
    """Roll out `n` independent samples per task and score them; returns one record per task."""
    cfg = dataclasses.replace(rollout_cfg or RolloutConfig(), strategy="independent", n=n)
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
    model.eval()
    nb = (len(todo) + batch_prompts - 1) // batch_prompts
    with StepProgress(nb, 0, enabled=progress and nb > 0, title=title) as bar:
        for b in range(nb):
            chunk = todo[b * batch_prompts : (b + 1) * batch_prompts]
            sampler = TorchSampler(model, tokenizer, temperature=cfg.temperature, top_p=cfg.top_p,
                                   top_k=cfg.top_k, seed=seed * 7919 + b)
            prompts = [(t.id, encode_prompt(t.question, tokenizer, chat_template=chat_template,
                                            max_tool_calls=cfg.max_tool_calls)) for t in chunk]
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
                    s = score_trajectory(tr, t.answers, t.data_source)
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
            acc = np.mean([s["acc"] for r in new for s in r["samples"]]) if new else 0.0
            bar.advance({"accuracy": float(acc)})
    return [done[t.id] for t in tasks if t.id in done]


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
    return out


def summary_markdown(summary: dict[str, dict[str, Any]], title: str = "Evaluation") -> str:
    """A markdown table: one row per dataset."""
    if not summary:
        return f"# {title}\n\n(no datasets)\n"
    ks = sorted({int(k.split("@")[1]) for s in summary.values() for k in s if k.startswith("pass@")})
    head = ["dataset", "questions", "samples"] + [f"pass@{k}" for k in ks] + ["EM", "F1", "tool calls", "length"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary.items():
        row = [name, str(s.get("n_questions", 0)), str(s.get("n_samples", 0))]
        row += [f"{100 * s[f'pass@{k}']:.1f}" if f"pass@{k}" in s else "" for k in ks]
        row += [f"{100 * s.get('em', 0):.1f}", f"{100 * s.get('f1', 0):.1f}", f"{s.get('tool_calls', 0):.2f}",
                f"{s.get('response_length', 0):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, summary: dict[str, dict[str, Any]], title: str = "Evaluation") -> None:
    out = Path(out_dir)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary, title))
