"""`aepo compare`: several algorithms, same SFT start, same rollout budget, same seeds.

Each (algorithm, seed) run lives in its own directory and is skipped when finished, so a
killed comparison resumes where it stopped; the report is rewritten after every run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aepo.algos.presets import preset_names
from aepo.eval.analyses import analysis_stats, entropy_stats
from aepo.eval.plots import plot_bars, plot_curves
from aepo.io import atomic_write_json, atomic_write_text
from aepo.train.console import console
from aepo.train.records import read_metrics


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def run_summary(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / "result.json"
    return json.loads(p.read_text()) if p.exists() else None


def compare_table(results: dict[str, list[dict[str, Any]]], k: int) -> str:
    """Markdown table, mean ± sd over seeds, one row per algorithm."""
    cols = [("pass@1", "pass@1", 100), (f"pass@{k}", f"pass@{k}", 100), ("tool_calls", "tool calls", 1),
            ("diversity", "diversity", 1), ("consecutive_high_entropy_rate", "consecutive high-H steps (%)", 100),
            ("branch_concentration", "branches on top-3 chains (%)", 100), ("branch_rate", "branch rate (%)", 100),
            ("m_std", "sd of m", 1), ("entropy_clipped", "H clipped tokens", 1), ("entropy_all", "H all tokens", 1),
            ("final_entropy", "final entropy", 1), ("entropy_variation", "entropy sd over training", 1),
            ("wall_seconds", "wall (s)", 1)]
    head = "| algo | seeds | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for algo, runs in results.items():
        cells = []
        for key, _, scale in cols:
            m, s = _mean_sd([r.get(key) for r in runs])
            cells.append("-" if np.isnan(m) else f"{scale * m:.3g} ± {scale * s:.2g}")
        lines.append(f"| {algo} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_curves(metrics_by_seed: list[list[dict]]) -> list[dict]:
    steps: dict[int, list[dict]] = {}
    for rows in metrics_by_seed:
        for r in rows:
            steps.setdefault(int(r["step"]), []).append(r)
    out = []
    for s in sorted(steps):
        rows = steps[s]
        keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
        out.append({k: float(np.mean([r[k] for r in rows if isinstance(r.get(k), (int, float))])) for k in keys}
                   | {"step": s})
    return out


def write_compare_report(out: Path, algos: Sequence[str], seeds: Sequence[int], eval_n: int,
                         command: str) -> Path:
    results: dict[str, list[dict]] = {}
    curves: dict[str, list[dict]] = {}
    for algo in algos:
        runs, metr = [], []
        for seed in seeds:
            rd = out / "runs" / f"{algo}_seed{seed}"
            res = run_summary(rd)
            if res is not None:
                runs.append(res)
                metr.append(read_metrics(rd / "rl" / "metrics.jsonl"))
        if runs:
            results[algo] = runs
            curves[algo] = _mean_curves(metr)
    plots = []
    if curves:
        keys = [("reward_mean", "reward (mean)"), ("accuracy", "training accuracy"), ("entropy", "token entropy"),
                ("tool_calls", "tool calls per rollout"),
                ("consecutive_high_entropy_rate", "share of high-entropy tool steps in consecutive runs"),
                ("branch_concentration", "share of branches on the top-3 chains"),
                ("m_std", "spread of m across prompts (sd)"), ("branch_rate", "branch decisions that branched")]
        plots.append(plot_curves(curves, out / "compare_curves.png", keys=keys,
                                 title="mean over seeds, one line per algorithm"))
        bars, errors = {}, {}
        for algo, runs in results.items():
            for key in ("pass@1", f"pass@{eval_n}"):
                m, s = _mean_sd([r.get(key) for r in runs])
                bars.setdefault(algo, {})[key], errors.setdefault(algo, {})[key] = m, s
        plots.append(plot_bars(bars, out / "compare_accuracy.png", errors=errors,
                               title="held-out accuracy, mean ± sd over seeds"))
    md = ["# Algorithm comparison on the demo world", "",
          f"Command: `{command}`", "",
          f"Same SFT model, same rollout budget (rollout.n rows per prompt), seeds {list(seeds)}; "
          f"held-out pass@k from {eval_n} samples per question; mean ± sd over seeds.", "",
          compare_table(results, eval_n), *[f"![{p.stem}]({p.name})" for p in plots]]
    missing = [f"{a}/seed{s}" for a in algos for s in seeds if run_summary(out / "runs" / f"{a}_seed{s}") is None]
    if missing:
        md += ["", f"Not finished yet: {', '.join(missing)}"]
    atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
    atomic_write_json(out / "compare.json", results)
    return out / "compare.md"


def run_compare(algos: Sequence[str], seeds: int | Sequence[int], out: str | Path, *, quick: bool = False,
                overrides: list[str] | None = None, progress: bool = True, command: str = "aepo compare",
                base: str | Path | None = None) -> Path:
    """Train and evaluate every (algo, seed) from one shared SFT model; write compare.md.

    `base` reuses the world and SFT model of an earlier run directory (e.g. `runs/demo`);
    by default they are built (once) in `out/base`."""
    from aepo.demo import (DemoPlan, build_tools, demo_config, stage_eval, stage_model, stage_rl, stage_sft,
                           stage_world, world_tasks)

    bad = [a for a in algos if a not in preset_names()]
    if bad:
        raise ValueError(f"unknown algorithm(s) {bad}; valid: {', '.join(preset_names())}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    out = Path(out)
    base = Path(base) if base is not None else out / "base"
    base.mkdir(parents=True, exist_ok=True)
    plan = DemoPlan.quick() if quick else DemoPlan()
    world = stage_world(base, plan, 0)
    runner = build_tools(world)
    try:
        init_dir, demos = stage_model(base, plan, 0)
        sft_dir = stage_sft(base, init_dir, demos, plan, 0, progress)
        test = world_tasks(world.test)[: plan.eval_questions]
        train = world_tasks(world.train)
        for seed in seeds:
            for algo in algos:
                rd = out / "runs" / f"{algo}_seed{seed}"
                if run_summary(rd) is not None:
                    continue
                console.print(f"[bold]compare:[/] {algo} seed {seed}")
                t0 = time.time()
                cfg = demo_config(plan, algo, seed, overrides)
                final = stage_rl(rd, sft_dir, train, runner, cfg, progress)
                ev = stage_eval(rd, "rl", final, test, runner, cfg, plan, seed, progress)
                metrics = read_metrics(rd / "rl" / "metrics.jsonl")
                res = {"algo": algo, "seed": seed, "wall_seconds": time.time() - t0, **ev,
                       **entropy_stats(metrics), **analysis_stats(metrics)}
                res.pop("finish_reasons", None)
                atomic_write_json(rd / "result.json", res)
                write_compare_report(out, algos, seeds, plan.eval_n, command)
    finally:
        runner.close()
    return write_compare_report(out, algos, seeds, plan.eval_n, command)
