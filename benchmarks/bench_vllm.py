"""Sampler backends: vLLM against the built-in torch sampler, on the same model in one process.

    .venv-vllm/bin/python benchmarks/bench_vllm.py --model runs/demo/sft --model runs/smollm2 \
        [--rows 64] [--prompt-len 64] [--new-tokens 128] [--repeats 3]

Per model directory, alternating rounds (so machine noise hits both alike):

1. flat: `--rows` rows of `--prompt-len` distinct random prompt tokens, `--new-tokens`
   sampled at temperature 1 with no stop strings (EOS may end a row early; tokens/s counts
   the tokens generated);
2. tree: one row with a `--prompt-len * 4`-token prefix, generated once, then `--rows` forks
   of it each sampling `--new-tokens // 4` tokens (the torch sampler shares the prefix's KV
   chunks; vLLM re-submits the prefix and hits its prefix cache).

Prints tokens/s per backend (median over rounds), the median per-round ratio vLLM / torch,
and vLLM's prefix-cache hit rate in the tree rounds. The engine's start-up time is printed
apart. Results go to benchmarks/RESULTS.md ("vLLM backend").
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from aepo.models.loading import load_model
from aepo.rollout.config import RolloutConfig
from aepo.rollout.sampler import build_backend


def prompt_ids(tok, n_tokens: int, rows: int, seed: int = 0) -> list[list[int]]:
    """`rows` distinct prompts (seeded random tokens; a new seed per round, so the flat rounds
    get no cache hits)."""
    rng = random.Random(seed)
    vocab = len(tok)
    return [[rng.randrange(4, vocab) for _ in range(n_tokens)] for _ in range(rows)]


def flat_round(sampler, prompts, new_tokens) -> tuple[int, float]:
    rows = [sampler.new_row(p) for p in prompts]
    t0 = time.perf_counter()
    gens = sampler.generate(rows, new_tokens)
    return sum(len(g.token_ids) for g in gens), time.perf_counter() - t0


def tree_round(sampler, prefix, rows, new_tokens) -> tuple[int, float]:
    root = sampler.new_row(prefix)
    sampler.generate([root], 8)
    t0 = time.perf_counter()
    forks = [sampler.fork(root) for _ in range(rows)]
    gens = sampler.generate(forks, new_tokens)
    return sum(len(g.token_ids) for g in gens), time.perf_counter() - t0


def bench(model_dir: Path, args: argparse.Namespace) -> dict:
    model, tok = load_model(model_dir, device="cpu")
    cfg = RolloutConfig(temperature=1.0)
    t0 = time.perf_counter()
    vllm_backend = build_backend(RolloutConfig(backend="vllm", temperature=1.0), None, tok, model_dir)
    start = time.perf_counter() - t0
    torch_backend = build_backend(cfg, model, tok)
    out: dict = {"model": str(model_dir), "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                 "engine_start_s": round(start, 1)}
    for kind in ("flat", "tree"):
        speed: dict[str, list[float]] = {"torch": [], "vllm": []}
        ratios, hits = [], []
        for r in range(args.repeats + 1):  # round 0 warms both up and is not counted
            per = {}
            prompts = prompt_ids(tok, args.prompt_len, args.rows, seed=r)
            prefix = prompt_ids(tok, args.prompt_len * 4, 1, seed=1000 + r)[0]
            for name, backend in (("torch", torch_backend), ("vllm", vllm_backend)):
                with torch.inference_mode():
                    s = backend.sampler(1000 + r)
                    n, secs = (flat_round(s, prompts, args.new_tokens) if kind == "flat"
                               else tree_round(s, prefix, args.rows, args.new_tokens // 4))
                per[name] = n / secs
                if name == "vllm":
                    hits.append(backend.stats().get("prefix_cache_hit_rate", 0.0))
            if r:
                for name in per:
                    speed[name].append(per[name])
                ratios.append(per["vllm"] / per["torch"])
        out[kind] = {"torch_tok_s": round(statistics.median(speed["torch"]), 1),
                     "vllm_tok_s": round(statistics.median(speed["vllm"]), 1),
                     "ratio_vllm_over_torch": round(statistics.median(ratios), 2),
                     "vllm_prefix_hit_rate": round(statistics.median(hits[1:]), 3)}
        r = out[kind]
        print(f"{model_dir} {kind}: torch {r['torch_tok_s']} tok/s, vllm {r['vllm_tok_s']} tok/s, "
              f"ratio {r['ratio_vllm_over_torch']}x, prefix hits {r['vllm_prefix_hit_rate']}", flush=True)
    vllm_backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="Also write the results as JSON here.")
    args = ap.parse_args()
    results = [bench(m, args) for m in args.model]
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
