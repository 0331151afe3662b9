"""Continuous batching against the turn scheduler on the demo's AEPO rollout (CPU).

    .venv/bin/python benchmarks/bench_rollout_batching.py [--demo runs/demo] [--steps 2] [--json]
    .venv/bin/python benchmarks/bench_rollout_batching.py --demo runs/smol --model runs/smol/sft \
        --config examples/smollm2_hermes.yaml --set actor.lora.rank=0     # a 135M model (memory-bound steps)
    .venv-vllm/bin/python benchmarks/bench_rollout_batching.py --set rollout.backend=vllm   # on the vLLM engine

Builds the demo's RL trainer (its world, SFT model, tools and `configs/demo.yaml`: 24 prompts x
8 rows, AEPO with pre-monitoring and branching; `--algo arpo` / `grpo` for the other trees) and collects the rollouts of the first
`--steps` RL steps once per arm, alternating: `continuous` (the default), `speculative`
(continuous with `rollout.speculate=true`) and `turns`.
Prints one JSON line per scheduler with `decode_steps` (sampling steps of the batch, prefill
steps included), `critical_path_tokens` (the most model tokens any row holds, root to leaf,
inherited prefix included), `logical_steps` (continuous only: the steps a schedule with
unlimited rows and instant tools would need, AEPO's probe before its prompt's rows included),
`mean_active_rows` (tokens per step), `rows`, `seconds` (rollout wall time, tools included),
`cpu_seconds` (the process's CPU time over the same span: steadier on a shared machine),
`tokens`, `accuracy` (the mean reward of the rows), `speculative_dropped_tokens`, the tool-grace
counters (`tool_grace_waits`, `tool_grace_timeouts`) and, for the torch backend's running batch,
`BATCH_COUNTERS` (its peak cache, parked rows, slot sorts and decode attention cells).

`--await-tools` makes the continuous scheduler wait for every step's tool calls before the next
step (a measurement, not a setting): the steps a schedule takes without the tools' latency.

`--step-cost` times instead one step of the continuous batch (`SlotBatch.step`: the forward,
sampling and bookkeeping) of the model at several numbers of rows, each row holding
`--columns` cached tokens: where a step at many rows costs about what it costs at few, fewer
steps make a faster rollout; where it grows in proportion to the rows, the time follows the
tokens, whatever the schedule. Results: benchmarks/RESULTS.md, "Continuous batching".
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# what the torch running batch reports of itself: its peak cache (the largest over the steps),
# parked rows rejoining in place or evicted, slot sorts, decode attention cells (summed)
BATCH_COUNTERS = ("batch_cache_gib", "rejoined_in_place", "parked_evicted", "slot_reorders",
                  "attention_cells_padded", "attention_cells_read", "attention_cells_used", "graph_steps",
                  "layer_graph_steps", "graph_captures", "graph_capture_s")
ARMS = {"continuous": ["rollout.scheduler=continuous"],
        "speculative": ["rollout.scheduler=continuous", "rollout.speculate=true"],
        "turns": ["rollout.scheduler=turns"]}


def collect(demo: Path, arm: str, steps: int, max_rows: int, algo: str = "aepo", *, model_dir: Path | None = None,
            config: Path | None = None, extra: list[str] | None = None) -> dict:
    import torch

    from aepo.config import load_config
    from aepo.demo.stages import DEMO_CONFIG, build_tools, world_tasks
    from aepo.demo.world import World
    from aepo.models.loading import load_model
    from aepo.rollout.sampler import build_backend
    from aepo.train.rl import RLTrainer

    torch.manual_seed(0)
    out = Path("/tmp") / f"bench_rollout_batching_{arm}"
    overrides = [f"algo={algo}", "trainer.save_every=0", f"out_dir={out}", *ARMS[arm],
                 f"rollout.max_active_rows={max_rows}", *(extra or [])]
    cfg = load_config(config or DEMO_CONFIG, overrides)
    model, tok = load_model(model_dir or demo / "sft", device="cpu")
    world = World.load(demo / "world")
    runner = build_tools(world, cfg.tools)
    totals = {"decode_steps": 0, "critical_path_tokens": 0, "logical_steps": 0, "row_steps": 0.0,
              "rows": 0, "seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0, "reward": 0.0, "dropped": 0,
              "grace_waits": 0, "grace_timeouts": 0}
    # the engine is built (and, for vLLM, started) before the clock runs
    backend = build_backend(cfg.rollout, model, tok, model_dir or demo / "sft")
    try:
        trainer = RLTrainer(cfg, model, tok, world_tasks(world.train), runner.run, out, backend=backend)
        for step in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            trajs, _, stats = trainer.collect(step)
            totals["seconds"] += time.perf_counter() - t0
            totals["cpu_seconds"] += time.process_time() - c0
            r = stats.get("rollout", stats)
            totals["decode_steps"] += r["decode_steps"]
            totals["row_steps"] += r["decode_steps"] * r["mean_active_rows"]
            totals["critical_path_tokens"] += r["critical_path_tokens"]
            totals["logical_steps"] += r.get("logical_steps", 0)
            totals["dropped"] += r.get("speculative_dropped_tokens", 0)
            totals["grace_waits"] += r.get("tool_grace_waits", 0)
            totals["grace_timeouts"] += r.get("tool_grace_timeouts", 0)
            for key in BATCH_COUNTERS:  # the torch running batch's own counters (`SlotBatch.stats`)
                if key in r:
                    totals[key] = max(totals.get(key, 0), r[key]) if key == "batch_cache_gib" \
                        else totals.get(key, 0) + r[key]
            totals["rows"] += len(trajs)
            totals["tokens"] += sum(sum(t.response_mask) for t in trajs)
            totals["reward"] += sum(t.reward for t in trajs)
    finally:
        backend.close()
        runner.close()
    steps_ = totals["decode_steps"]
    return {"scheduler": arm, "algo": algo, "rl_steps": steps, "decode_steps": steps_,
            "critical_path_tokens": totals["critical_path_tokens"],
            "logical_steps": totals["logical_steps"] or None,
            "mean_active_rows": round(totals["row_steps"] / steps_, 2) if steps_ else 0.0,
            "rows": totals["rows"], "seconds": round(totals["seconds"], 2),
            "cpu_seconds": round(totals["cpu_seconds"], 2), "tokens": totals["tokens"],
            "accuracy": round(totals["reward"] / totals["rows"], 4) if totals["rows"] else 0.0,
            "speculative_dropped_tokens": totals["dropped"], "tool_grace_waits": totals["grace_waits"],
            "tool_grace_timeouts": totals["grace_timeouts"], **{k: totals[k] for k in BATCH_COUNTERS if k in totals}}


def step_cost(model_dir: Path, rows_list: list[int], columns: int, steps: int = 12) -> list[dict]:
    """Median seconds of one continuous-batch step at each number of rows (rows `columns` long)."""
    import statistics

    import torch

    from aepo.models.loading import load_model
    from aepo.rollout.sampler.streams import RowKey
    from aepo.rollout.sampler.torch_sampler import TorchSampler

    torch.manual_seed(0)
    model, tok = load_model(model_dir, device="cpu")
    sampler = TorchSampler(model, tok, temperature=1.0, seed=0, eos_token_ids=[])
    vocab = int(model.config.vocab_size)
    out = []
    for rows in rows_list:
        batch = sampler.open_batch(max_rows=rows)
        handles = [sampler.new_row(torch.randint(0, vocab, (columns,)).tolist()) for _ in range(rows)]
        for i, h in enumerate(handles):
            batch.start(h, steps + 2, RowKey(0, 0, i))
        batch.step()  # the rows' prefill
        seconds = []
        for _ in range(steps):
            t0 = time.perf_counter()
            batch.step()
            seconds.append(time.perf_counter() - t0)
        for h in handles:
            sampler.release(h)
        sampler.close_batch()
        ms = statistics.median(seconds) * 1000
        out.append({"rows": rows, "columns": columns, "step_ms": round(ms, 2), "ms_per_row": round(ms / rows, 3)})
    return out


def await_every_tool_call() -> None:
    """Make the continuous scheduler's tool grace wait for the step's calls however long they take."""
    from concurrent.futures import wait

    from aepo.rollout.scheduler import ContinuousScheduler

    def grace(self, submitted) -> None:  # type: ignore[no-untyped-def]
        self.grace_waits += 1
        wait([submitted])

    ContinuousScheduler._tool_grace = grace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"),
                    help="a finished `aepo demo` directory (or any directory with the world in world/)")
    ap.add_argument("--model", type=Path, default=None, help="the model rolled out (default: DEMO/sft)")
    ap.add_argument("--config", type=Path, default=None, help="the run config (default: configs/demo.yaml)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides of the config")
    ap.add_argument("--steps", type=int, default=2, help="RL steps whose rollouts are collected")
    ap.add_argument("--max-active-rows", type=int, default=256)
    ap.add_argument("--algo", default="aepo", help="the preset (its rollout strategy): aepo, arpo, grpo, ...")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                    help="continuous (the default scheduler), speculative (rollout.speculate=true), turns")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each scheduler")
    ap.add_argument("--json", action="store_true", help="one JSON line per run (default: also a summary)")
    ap.add_argument("--step-cost", type=int, nargs="+", default=None, metavar="ROWS",
                    help="time one continuous-batch step at these numbers of rows instead (e.g. 8 32 128)")
    ap.add_argument("--columns", type=int, default=256, help="--step-cost: cached tokens of every row")
    ap.add_argument("--await-tools", action="store_true",
                    help="continuous: wait for every step's tool calls before the next step (no tool latency)")
    args = ap.parse_args()
    if args.await_tools:
        await_every_tool_call()
    if not (args.model or args.demo / "sft").is_dir():
        raise SystemExit(f"{args.model or args.demo / 'sft'} not found: run `aepo demo` first or pass --demo / --model")
    if args.step_cost:
        for line in step_cost(args.model or args.demo / "sft", args.step_cost, args.columns):
            print(json.dumps(line), flush=True)
        return
    results = []
    for _ in range(args.repeats):
        for arm in args.arms:
            res = collect(args.demo, arm, args.steps, args.max_active_rows, args.algo, model_dir=args.model,
                          config=args.config, extra=args.set)
            results.append(res)
            print(json.dumps(res), flush=True)
    if not args.json:
        for scheduler in args.arms:
            runs = [r for r in results if r["scheduler"] == scheduler]
            best = min(r["seconds"] for r in runs)
            cpu = min(r["cpu_seconds"] for r in runs)
            r = runs[0]
            print(f"{scheduler:>10}: {best:.1f} s ({cpu:.1f} s CPU), {r['decode_steps']} steps for a critical path of "
                  f"{r['critical_path_tokens']} tokens ({r['decode_steps'] / max(1, r['critical_path_tokens']):.2f}x), "
                  f"{r['mean_active_rows']} rows per step")


if __name__ == "__main__":
    main()
