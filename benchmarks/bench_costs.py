"""Cost curves of an RL step on the demo: k, response length, tool calls, tree vs independent.

    .venv/bin/python benchmarks/bench_costs.py --model runs/demo/sft [--steps 3] [--threads 2]

Every point trains `--steps` AEPO-preset steps (the demo config: 24 prompts) from the same SFT
model on the demo world (`aepo demo` makes both), varying one setting from the demo's
(k = 8, 512 response tokens, 5 tool calls, AEPO's tree) and reports the median step, its
rollout part, tokens per step, and for tree strategies the response tokens a branch shares
with its parent (generated once, not again: what prefix sharing saves). Peak resident memory
of the process is printed at the end. Results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
from pathlib import Path

import torch

from aepo.config import load_config
from aepo.demo.stages import DEMO_CONFIG, build_tools, world_tasks
from aepo.demo.world import World
from aepo.models.loading import load_model
from aepo.train.rl import RLTrainer

POINTS = [
    ("k=4", ["rollout.n=4"]), ("k=8 (demo)", []), ("k=16", ["rollout.n=16"]),
    ("128 tokens", ["rollout.max_response_tokens=128"]), ("256 tokens", ["rollout.max_response_tokens=256"]),
    ("1 tool call", ["rollout.max_tool_calls=1"]), ("3 tool calls", ["rollout.max_tool_calls=3"]),
    ("independent", ["rollout.strategy=independent"]), ("arpo tree", ["rollout.strategy=arpo"]),
]


def point(model_dir: Path, world: World, runner, overrides: list[str], steps: int, out: Path) -> dict:
    cfg = load_config(DEMO_CONFIG, ["algo=aepo", "trainer.save_every=0", f"out_dir={out}", *overrides])
    model, tok = load_model(model_dir, device="cpu")
    trainer = RLTrainer(cfg, model, tok, world_tasks(world.train), runner.run, out)
    times, rollouts, tokens, shared, rows_tokens, calls = [], [], [], [], [], []
    for step in range(steps):
        trajs, _, _ = trainer.collect(step)  # the rollout alone, to count what the tree shares
        rows_tokens.append(sum(len(t.response_ids) for t in trajs))
        shared.append(sum(t.branch_position or 0 for t in trajs))
        calls.append(statistics.mean(t.n_tool_calls for t in trajs))
        m = trainer.train_step(step)
        times.append(m["timing/step"])
        rollouts.append(m["timing/rollout"])
        tokens.append(m["rollout/response_length"] * m["rollout/rows"])
    return {"step_s": statistics.median(times), "rollout_s": statistics.median(rollouts),
            "tokens": statistics.median(tokens), "shared": statistics.median(shared),
            "row_tokens": statistics.median(rows_tokens), "tool_calls": statistics.mean(calls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/sft"))
    ap.add_argument("--world", type=Path, default=Path("runs/demo/world"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = World.load(args.world)
    runner = build_tools(world, load_config(DEMO_CONFIG).tools)  # the demo's search settings
    tmp = Path(tempfile.mkdtemp(prefix="bench_costs_"))
    print("| point | s / step | rollout s | response tokens / step | tool calls / row | "
          "tokens a branch shares with its parent |")
    print("|---|---|---|---|---|---|")
    try:
        for i, (name, overrides) in enumerate(POINTS):
            r = point(args.model, world, runner, overrides, args.steps, tmp / str(i))
            share = f"{r['shared']:.0f} of {r['row_tokens']:.0f} ({r['shared'] / r['row_tokens']:.0%})" \
                if r["shared"] else "-"
            print(f"| {name} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['tokens']:.0f} | "
                  f"{r['tool_calls']:.2f} | {share} |", flush=True)
    finally:
        runner.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
