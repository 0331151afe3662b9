"""The demo's SFT stage alone, with other data sizes, batch sizes and learning rates.

    .venv/bin/python benchmarks/demo_sft_sizes.py runs/sft_b8 --demos 10400 --drills 2400 --batch 8 --lr 2e-3

Builds the demo's world, demonstrations and initial model into the directory (as `aepo demo`
does), trains SFT with the given sizes, evaluates it on the demo's held-out questions as the
demo does, and prints one JSON line: steps, SFT seconds, final loss, pass@1, pass@4. The
directory then has the layout `benchmarks/demo_accuracy_vs_time.py` reads, for the RL stage
from that SFT model. Results go to benchmarks/RESULTS.md ("SFT batch size").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--demos", type=int, default=10400, help="expert demonstrations")
    ap.add_argument("--drills", type=int, default=2400, help="recall drills")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--preset", default=None, help="model size (aepo.models.factory.MODEL_PRESETS); default: the demo's")
    args = ap.parse_args()

    from aepo.demo.stages import (
        build_tools,
        demo_config,
        stage_eval,
        stage_model,
        stage_sft,
        stage_world,
        world_tasks,
    )
    from aepo.io import read_jsonl
    from aepo.train.threads import set_threads

    cfg = demo_config("aepo", 0, [f"demo.n_demos={args.demos}", f"demo.recall_drills={args.drills}",
                                  f"sft.batch_size={args.batch}", f"sft.lr={args.lr}"]
                      + ([f"demo.model_preset={args.preset}"] if args.preset else []))
    plan = cfg.demo
    set_threads(cfg.trainer.threads, cap=4)
    args.out.mkdir(parents=True, exist_ok=True)
    world = stage_world(args.out, plan, 0)
    init_dir, demos = stage_model(args.out, plan, 0, cfg.tools)
    sft_dir = stage_sft(args.out, init_dir, demos, cfg, 0, progress=True)  # the demo's own SFT stage
    history = list(read_jsonl(sft_dir / "sft_history.jsonl"))
    runner = build_tools(world, cfg.tools)
    try:
        test = world_tasks(world.test)[: cfg.eval.limit or None]
        ev = stage_eval(args.out, "sft", sft_dir, test, runner, cfg, progress=True)
    finally:
        runner.close()
    print(json.dumps({"preset": plan.model_preset, "demos": args.demos, "drills": args.drills,
                      "batch": args.batch, "lr": args.lr, "steps": len(history),
                      "sft_seconds": round(history[-1]["seconds"]), "loss": round(history[-1]["loss"], 3),
                      "pass@1": ev["pass@1"], "pass@4": ev["pass@4"]}))

if __name__ == "__main__":
    main()
