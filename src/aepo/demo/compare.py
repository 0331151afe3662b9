"""`aepo compare`: several algorithms, same SFT start, same rollout budget, same seeds.

Each (algorithm, seed) run lives in its own directory and is skipped when finished, so a
killed comparison resumes where it stopped; the report is rewritten after every run.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aepo.algos.presets import preset_names
from aepo.console import console
from aepo.eval.plots import panels, plot_bars, plot_curves
from aepo.eval.report import compare_columns
from aepo.io import atomic_write_json, atomic_write_text
from aepo.rollout.analyses import analysis_stats, entropy_stats
from aepo.train.records import read_metrics
from aepo.train.threads import set_threads, usable_cores


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
    cols = compare_columns(k)  # the catalogue's `table` view
    head = "| algo | seeds | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for algo, runs in results.items():
        cells = []
        for key, _, scale in cols:
            m, s = _mean_sd([r.get(key) for r in runs])
            cells.append("-" if np.isnan(m) else f"{scale * m:.3g} ± {scale * s:.2g}")
        lines.append(f"| {algo} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_tokens(metrics: list[dict]) -> float:
    """Tokens the sampler generated over a run's training steps (`rollout/generated_tokens`; for
    a run logged before that metric, rows x response length, tool results and copies included)."""
    total = 0.0
    for r in metrics:
        if isinstance(r.get("rollout/generated_tokens"), (int, float)):
            total += float(r["rollout/generated_tokens"])
        elif isinstance(r.get("rollout/rows"), (int, float)) and isinstance(r.get("rollout/response_length"), (int, float)):
            total += float(r["rollout/rows"]) * float(r["rollout/response_length"])
    return total


def _eval_records(run_dir: Path) -> list[dict]:
    p = run_dir / "eval_rl_samples.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def compare_statistics(results: dict[str, list[dict[str, Any]]], key: str = "pass@1",
                       level: float = 0.95, power: float = 0.8) -> dict[str, Any]:
    """Per algorithm: mean and sd over seeds of `key`, the mean evaluation noise of one run
    (`eval_noise`, the sd a re-evaluation would show) beside that seed sd, tokens and seconds
    per run. Per pair of algorithms (each later one against each earlier one in `results`): the
    paired differences over their common seeds with the bootstrap interval, the minimal
    detectable effect at `power` and the verdict (`aepo.eval.stats`, docs/algorithms.md section 8)."""
    from aepo.eval.stats import mean_sd, paired_comparison

    per_algo = {}
    for algo, runs in results.items():
        m, sd = mean_sd([r.get(key) for r in runs])
        noise = mean_sd([r.get("eval_noise") for r in runs])[0]
        per_algo[algo] = {"seeds": len(runs), "mean": m, "sd": sd, "eval_noise": noise,
                          "tokens": mean_sd([r.get("tokens") for r in runs])[0],
                          "seconds": mean_sd([r.get("wall_seconds") for r in runs])[0]}
    names = list(results)
    pairs = []
    for j, a in enumerate(names):
        for b in names[:j]:
            xa = {r["seed"]: r[key] for r in results[a] if r.get(key) is not None}
            xb = {r["seed"]: r[key] for r in results[b] if r.get(key) is not None}
            pairs.append(paired_comparison(xa, xb, a, b, level=level, power=power))
    return {"metric": key, "level": level, "power": power, "algorithms": per_algo, "pairs": pairs}


def statistics_markdown(st: dict[str, Any], scale: float = 100.0, unit: str = "points") -> str:
    """The statistics of `compare_statistics` as two markdown tables (values times `scale`)."""
    key, lvl, pw = st["metric"], round(100 * st["level"]), round(100 * st["power"])

    def f(x: float, digits: int = 1) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    lines = [(f"Per algorithm, {key} in {unit}: mean and sd over seeds (seed noise), and the evaluation "
              f"noise of one run (the sd of its {key} from its finite evaluation samples)."), "",
             "| algo | seeds | mean | sd over seeds | eval noise (sd) | tokens per run | seconds per run |",
             "|---|---|---|---|---|---|---|"]
    for algo, a in st["algorithms"].items():
        lines.append(f"| {algo} | {a['seeds']} | {f(scale * a['mean'])} | {f(scale * a['sd'])} | "
                     f"{f(scale * a['eval_noise'])} | {f(a['tokens'], 0)} | {f(a['seconds'], 0)} |")
    lines += ["", (f"Paired differences over common seeds ({key} in {unit}, A − B), {lvl}% bootstrap interval, "
                   f"minimal detectable effect (MDE) at {pw}% power; “not detected” where the interval holds 0."), "",
              "| A − B | pairs | mean | sd | interval | MDE | verdict |", "|---|---|---|---|---|---|---|"]
    for p in st["pairs"]:
        lines.append(f"| {p['a']} − {p['b']} | {p['n']} | {f(scale * p['mean'])} | {f(scale * p['sd'])} | "
                     f"[{f(scale * p['ci_low'])}, {f(scale * p['ci_high'])}] | {f(scale * p['mde'])} | {p['verdict']} |")
    return "\n".join(lines) + "\n"


def _no_nan(obj: Any) -> Any:
    """`obj` with every float nan as None (JSON has no nan)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


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
                rows = read_metrics(rd / "rl" / "metrics.jsonl")
                from aepo.eval.stats import eval_noise

                res = {**res, "tokens": run_tokens(rows), "eval_noise": eval_noise(_eval_records(rd))}
                runs.append(res)
                metr.append(rows)
        if runs:
            results[algo] = runs
            curves[algo] = _mean_curves(metr)
    stats = compare_statistics(results)
    plots = []
    if curves:
        plots.append(plot_curves(curves, out / "compare_curves.png", keys=panels("compare"),
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
          compare_table(results, eval_n), "## Statistics", "", statistics_markdown(stats),
          *[f"![{p.stem}]({p.name})" for p in plots]]
    missing = [f"{a}/seed{s}" for a in algos for s in seeds if run_summary(out / "runs" / f"{a}_seed{s}") is None]
    if missing:
        md += ["", f"Not finished yet: {', '.join(missing)}"]
    atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
    atomic_write_json(out / "compare.json", results)
    atomic_write_json(out / "compare_stats.json", _no_nan(stats))
    return out / "compare.md"


def _run_in_processes(todo: list[tuple[str, int]], out: Path, base: Path, quick: bool,
                      overrides: list[str] | None, command: str, jobs: int) -> None:
    """Each (algo, seed) of `todo` as `run_compare([algo], [seed], ...)` in a child process,
    `jobs` at a time, with the usable cores split between them; RuntimeError names the runs
    that failed and their logs, after every run has ended."""
    import json
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    threads = str(max(1, usable_cores() // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    code = ("import json, sys; from aepo.demo.compare import run_compare; a = json.loads(sys.argv[1]); "
            "run_compare([a['algo']], [a['seed']], a['out'], quick=a['quick'], overrides=a['overrides'], "
            "progress=False, command=a['command'], base=a['base'])")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]compare:[/] {len(todo)} runs, {jobs} at a time, {threads} thread(s) each")

    def one(pair: tuple[str, int]) -> tuple[str, int, int, Path]:
        algo, seed = pair
        log = out / "runs" / f"{algo}_seed{seed}.log"
        args = {"algo": algo, "seed": seed, "out": str(out), "quick": quick, "overrides": list(overrides or []),
                "command": command, "base": str(base)}
        with open(log, "w") as f:
            rc = subprocess.call([sys.executable, "-c", code, json.dumps(args)], env=env, stdout=f,
                                 stderr=subprocess.STDOUT)
        console.print(f"[bold]compare:[/] {algo} seed {seed} " + ("done" if rc == 0 else f"failed (see {log})"))
        return algo, seed, rc, log

    with ThreadPoolExecutor(jobs) as pool:
        failed = [(a, s, log) for a, s, rc, log in pool.map(one, todo) if rc != 0]
    if failed:
        raise RuntimeError("compare: run(s) failed: " + ", ".join(f"{a} seed {s} ({log})" for a, s, log in failed))


def _run_key(base: Any, cfg: Any) -> dict[str, Any]:
    """What one (algo, seed) run depends on: the shared SFT model (`base`, seed 0), its RL
    config (trainer.seed = the run's seed) and its evaluation (eval.seed likewise)."""
    from aepo.demo.stages import stage_keys

    mine = stage_keys(cfg, 0)
    return {"sft": stage_keys(base, 0)["SFT"], "rl": mine["RL"]["config"],
            "eval": {k: v for k, v in mine["RL eval"].items() if k != "model"}}


def _check_base(base: Path) -> None:
    """--from must be a finished demo run: compare never builds a world or SFT model inside it."""
    from aepo.demo.stages import SFT_DONE, WORLD_DONE

    if not (base / WORLD_DONE).exists() or not (base / SFT_DONE).exists():
        raise ValueError(f"--from {base} is not a finished demo run (no {WORLD_DONE} and {SFT_DONE}); give a run "
                         f"directory made by `aepo demo` (e.g. runs/demo), or leave --from out to build the world "
                         f"and SFT model in --out")


def run_compare(algos: Sequence[str], seeds: int | Sequence[int], out: str | Path, *, quick: bool = False,
                overrides: list[str] | None = None, progress: bool = True, command: str = "aepo compare",
                base: str | Path | None = None, jobs: int = 1, force: bool = False) -> Path:
    """Train and evaluate every (algo, seed) from one shared SFT model; write compare.md.

    `base` reuses the world and SFT model of an earlier run directory (e.g. `runs/demo`);
    by default they are built (once) in `out/base`. `jobs` > 1 runs that many (algo, seed)
    pairs at once, each in its own process with (usable cores / jobs) threads, logging to
    `out/runs/<algo>_seed<seed>.log`; the results are the same as one at a time. A finished
    or started run in `out` made with other settings (overrides, demo sizes, SFT start) is refused,
    or with `force` redone: it is never reported as the result of this command."""
    from aepo.demo.stages import (
        StageRunner,
        build_tools,
        demo_config,
        stage_eval,
        stage_keys,
        stage_model,
        stage_rl,
        stage_sft,
        stage_world,
        world_tasks,
    )
    from aepo.io import check_output_dir, claim_keyed_output

    # every argument is checked before anything is built or written
    algos = list(algos)
    if not algos:
        raise ValueError("--algos is empty; give comma-separated presets, e.g. --algos grpo,aepo "
                         f"(valid: {', '.join(preset_names())})")
    bad = [a for a in algos if a not in preset_names()]
    if bad:
        raise ValueError(f"--algos: unknown algorithm(s) {', '.join(map(repr, bad))}; "
                         f"valid: {', '.join(preset_names())}")
    twice = sorted({a for a in algos if algos.count(a) > 1})
    if twice:
        raise ValueError(f"--algos lists {', '.join(map(repr, twice))} more than once; give each algorithm once")
    if isinstance(seeds, int) and seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (seeds per algorithm), got {seeds}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1 (runs at once), got {jobs}")
    out = Path(out)
    # each run's config up front: a bad override fails now, not after the world and SFT are built
    configs = {(algo, seed): demo_config(algo, seed, overrides, quick=quick) for seed in seeds for algo in algos}
    first = demo_config(algos[0], 0, overrides, quick=quick)  # the shared world and SFT model: seed 0
    plan = first.demo
    check_output_dir(out, "--out")
    base_dir = Path(base) if base is not None else out / "base"
    if base is not None:
        _check_base(base_dir)
    # one world and SFT model for every run, reused only under the settings that made them;
    # --force never redoes the stages of a --from directory
    base_stages = StageRunner(base_dir, {k: v for k, v in stage_keys(first, 0).items()
                                         if k in ("world", "demonstrations", "SFT")},
                              force=force and base is None, what="--from" if base is not None else "--out base",
                              hint="give --from a demo run made with the same options (e.g. --quick or not), or "
                                   "leave --from out" if base is not None else "pass --force to redo them")
    for cfg in (first, *configs.values()):  # the models' settings name the shared world's corpus
        cfg.tools.search_corpus = str((base_dir / "world" / "corpus.jsonl").resolve())
    for (algo, seed), cfg in configs.items():  # a run is reused only under the settings that made it
        claim_keyed_output(out / "runs" / f"{algo}_seed{seed}", _run_key(first, cfg), force=force,
                           what="--out holds a run that", hint="rerun with the same options, choose another --out")
    base = base_dir
    # a child process of `--jobs N` reads its share of the cores from OMP_NUM_THREADS
    set_threads(next(iter(configs.values())).trainer.threads, cap=4)
    base.mkdir(parents=True, exist_ok=True)
    world = base_stages.run("world", stage_world, base, plan, 0)
    runner = build_tools(world, first.tools)
    try:
        init_dir, demos = base_stages.run("demonstrations", stage_model, base, plan, 0, first.tools)
        sft_dir = base_stages.run("SFT", stage_sft, base, init_dir, demos, first, 0, progress)
        test = world_tasks(world.test)[: first.eval.limit or None]
        train = world_tasks(world.train)
        todo = [(a, s) for s in seeds for a in algos if run_summary(out / "runs" / f"{a}_seed{s}") is None]
        if jobs > 1 and len(todo) > 1:
            _run_in_processes(todo, out, base, quick, overrides, command, jobs)
            todo = []
        for seed in seeds:
            for algo in algos:
                rd = out / "runs" / f"{algo}_seed{seed}"
                if (algo, seed) not in todo or run_summary(rd) is not None:
                    continue
                console.print(f"[bold]compare:[/] {algo} seed {seed}")
                t0 = time.time()
                cfg = configs[(algo, seed)]
                final = stage_rl(rd, sft_dir, train, runner, cfg, progress)
                ev = stage_eval(rd, "rl", final, test, runner, cfg, progress)
                metrics = read_metrics(rd / "rl" / "metrics.jsonl")
                res = {"algo": algo, "seed": seed, "wall_seconds": time.time() - t0, **ev,
                       **entropy_stats(metrics), **analysis_stats(metrics)}
                res.pop("finish_reasons", None)
                atomic_write_json(rd / "result.json", res)
                write_compare_report(out, algos, seeds, first.eval.n, command)
    finally:
        runner.close()
    return write_compare_report(out, algos, seeds, first.eval.n, command)
