"""Does a rollout depend on how it was scheduled? The same RL step's rollout twice, under two
sets of overrides, compared row by row.

    .venv/bin/python benchmarks/rollout_reproducibility.py [--demo runs/demo] [--algo aepo] \\
        --a rollout.max_active_rows=256 --b rollout.max_active_rows=16
    .venv-vllm/bin/python benchmarks/rollout_reproducibility.py --a rollout.backend=vllm \\
        --b rollout.backend=vllm rollout.speculate=true     # on the vLLM engine

Builds the demo's RL trainer (its world, SFT model and `configs/demo.yaml`, continuous scheduler)
and collects step 0's rollout under each set of overrides. Prints the decode steps of each, how
many rows (and prompts) differ in any token, and over the rows that agree the largest
|log-prob| and |entropy| difference of a token (float rounding from a different batch
composition). For a differing prompt it prints where the first row parts. Results:
benchmarks/RESULTS.md, "Continuous batching".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def collect(demo: Path, algo: str, overrides: list[str]) -> tuple[list, dict]:
    from aepo.config import load_config
    from aepo.demo.stages import DEMO_CONFIG, build_tools, world_tasks
    from aepo.demo.world import World
    from aepo.models.loading import load_model
    from aepo.rollout.sampler import build_backend
    from aepo.train.rl import RLTrainer

    out = Path("/tmp/rollout_reproducibility")
    cfg = load_config(DEMO_CONFIG, [f"algo={algo}", "trainer.save_every=0", f"out_dir={out}",
                                    "rollout.scheduler=continuous", *overrides])
    model, tok = load_model(demo / "sft", device="cpu")
    world = World.load(demo / "world")
    runner = build_tools(world, cfg.tools)
    backend = build_backend(cfg.rollout, model, tok, demo / "sft")  # the torch sampler, or a vLLM engine
    try:
        trainer = RLTrainer(cfg, model, tok, world_tasks(world.train), runner.run, out, backend=backend)
        trajs, _, stats = trainer.collect(0)
    finally:
        backend.close()
        runner.close()
    return trajs, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `aepo demo` directory")
    ap.add_argument("--algo", default="aepo")
    ap.add_argument("--a", nargs="*", default=["rollout.max_active_rows=256"], help="overrides of the first run")
    ap.add_argument("--b", nargs="*", default=["rollout.max_active_rows=16"], help="overrides of the second run")
    args = ap.parse_args()
    if not (args.demo / "sft").is_dir():
        raise SystemExit(f"{args.demo}/sft not found: run `aepo demo` first or pass --demo")
    a, sa = collect(args.demo, args.algo, args.a)
    b, sb = collect(args.demo, args.algo, args.b)
    diff = [(x, y) for x, y in zip(a, b) if x.response_ids != y.response_ids or x.row_id != y.row_id]
    same = [(x, y) for x, y in zip(a, b) if x.response_ids == y.response_ids]
    report = {
        "algo": args.algo, "a": args.a, "b": args.b,
        "decode_steps": [sa.get("rollout/decode_steps", sa.get("decode_steps")),
                         sb.get("rollout/decode_steps", sb.get("decode_steps"))],
        "rows": len(a), "rows_differing": len(diff), "prompts_differing": len({x.prompt_id for x, _ in diff}),
        "tokens_compared": sum(sum(x.response_mask) for x, _ in same),
        "max_abs_logprob_diff": max((abs(p - q) for x, y in same for p, q in zip(x.logprobs, y.logprobs)),
                                    default=0.0),
        "max_abs_entropy_diff": max((abs(p - q) for x, y in same for p, q in zip(x.entropies, y.entropies)),
                                    default=0.0),
    }
    print(json.dumps(report))
    seen = set()
    for x, y in diff:
        if x.prompt_id in seen:
            continue
        seen.add(x.prompt_id)
        j = next((i for i, (p, q) in enumerate(zip(x.response_ids, y.response_ids)) if p != q), None)
        print(f"  {x.prompt_id} row {x.row_id}: first differing token {j}, log-probs "
              f"{None if j is None else (round(x.logprobs[j], 4), round(y.logprobs[j], 4))}")


if __name__ == "__main__":
    main()
