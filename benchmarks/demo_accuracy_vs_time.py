"""Held-out accuracy of the default demo against wall time.

    .venv/bin/python benchmarks/demo_accuracy_vs_time.py runs/demo runs/acc_vs_time

Takes a finished `aepo demo` directory (its world, SFT model and SFT eval), runs the demo's RL
stage again into the second directory with every tenth checkpoint kept, evaluates each one as
the demo does (same questions, samples and temperature), and prints a table of RL steps, SFT +
RL seconds (SFT's training time plus the RL steps' recorded times) and pass@1 / pass@4; the
rows also go to `acc_vs_time.json` and a plot to `acc_vs_time.png` there. The demo is
deterministic, so the last row repeats the demo's own result. Results go to
benchmarks/RESULTS.md ("Demo: learning status").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(table: list[dict], path: Path) -> None:
    """pass@1 and pass@4 against minutes, each point labelled with its RL step; the SFT + 10 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["seconds"] / 60 for r in table]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(minutes, [100 * r["pass@1"] for r in table], "o-", label="pass@1")
    ax.plot(minutes, [100 * r["pass@4"] for r in table], "s--", label="pass@4")
    for r, x in zip(table, minutes):
        ax.annotate(str(r["step"]), (x, 100 * r["pass@1"]), textcoords="offset points", xytext=(0, -12),
                    fontsize=7, ha="center")
    ax.axhline(100 * table[0]["pass@1"] + 10, color="grey", lw=0.8, ls=":", label="SFT + 10 points")
    ax.set_xlabel("minutes of SFT + RL (labels: RL steps)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("aepo demo: held-out accuracy against wall time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="a finished `aepo demo --out` directory")
    ap.add_argument("out", type=Path, help="where the RL run, the evals and the table go")
    ap.add_argument("--every", type=int, default=10, help="RL steps between evaluated checkpoints")
    ap.add_argument("--steps", type=int, default=0, help="RL steps (default: the demo's)")
    args = ap.parse_args()

    from aepo.demo.stages import build_tools, demo_config, stage_eval, stage_rl, world_tasks
    from aepo.demo.world import World
    from aepo.io import atomic_write_json, read_jsonl
    from aepo.train.threads import set_threads

    for need in ("world/world.json", "sft/config.json", "sft/sft_history.jsonl", "eval_sft.json"):
        if not (args.demo / need).exists():
            raise SystemExit(f"{args.demo / need} is missing: give the directory of a finished `aepo demo`")
    cfg = demo_config("aepo", 0, ["trainer.keep_last=0", f"trainer.save_every={args.every}"]
                      + ([f"trainer.total_steps={args.steps}"] if args.steps else []))
    set_threads(cfg.trainer.threads, cap=4)
    world = World.load(args.demo / "world")
    runner = build_tools(world, cfg.tools)
    test = world_tasks(world.test)[: cfg.eval.limit or None]
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        stage_rl(args.out, args.demo / "sft", world_tasks(world.train), runner, cfg, progress=True)
        seconds, elapsed = {0: 0.0}, 0.0
        for m in read_jsonl(args.out / "rl" / "metrics.jsonl"):
            elapsed += m["timing/step"]
            seconds[int(m["step"])] = elapsed
        sft_seconds = list(read_jsonl(args.demo / "sft" / "sft_history.jsonl"))[-1]["seconds"]
        rows = [{"step": 0, "seconds": sft_seconds, **json.loads((args.demo / "eval_sft.json").read_text())}]
        checkpoints = sorted((args.out / "rl" / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
        for ck in checkpoints:
            step = int(ck.name[5:])
            ev = stage_eval(args.out, f"step{step}", ck, test, runner, cfg, progress=True)
            rows.append({"step": step, "seconds": sft_seconds + seconds[step], **ev})
    finally:
        runner.close()
    table = [{"step": r["step"], "seconds": round(r["seconds"], 1), "pass@1": r["pass@1"], "pass@4": r["pass@4"]}
             for r in rows]
    atomic_write_json(args.out / "acc_vs_time.json", table)
    plot(table, args.out / "acc_vs_time.png")
    print("| RL steps | SFT + RL seconds | pass@1 | pass@4 |\n|---|---|---|---|")
    for r in table:
        print(f"| {r['step']} | {r['seconds']:.0f} | {100 * r['pass@1']:.1f}% | {100 * r['pass@4']:.1f}% |")


if __name__ == "__main__":
    main()
