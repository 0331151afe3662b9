"""Sampler speed: TorchSampler versus `model.generate`, and tree forking versus recomputation.

    .venv/bin/python benchmarks/bench_sampler.py [--threads 2] [--repeats 5] [--device cpu]

1. Flat batch: `--batch` rows of `--prompt-len` random tokens, `--new-tokens` sampled tokens
   each (temperature 1, no top-k/top-p, no EOS so every row runs to the budget), on the
   built-in tiny model. HF `model.generate` and TorchSampler (lean path, and the HF-forward
   path) run interleaved in the same process, so shared-machine noise hits all of them alike;
   the table gives the median tokens/s and the median of the per-round speed ratios.
2. Tree: one row with a `--prefix-len` prefix already in the cache; `--branches` forks each
   continue `--branch-tokens` tokens, versus `--branches` fresh rows that must prefill the
   prefix again.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

import torch

from aepo.models.factory import init_model
from aepo.models.tokenizer import build_tokenizer
from aepo.rollout.sampler import TorchSampler


def synthetic_tokenizer(vocab: int):
    """A tokenizer with about `vocab` entries, fitted on seeded random words."""
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(2 * vocab)
    ]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(vocab)]
    return build_tokenizer(texts, max_vocab=vocab)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_flat(model, tok, args, device) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(20, len(tok), (args.batch, args.prompt_len), generator=gen).to(device)
    n = args.new_tokens

    def hf_generate() -> None:
        with torch.inference_mode():
            out = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n,
                pad_token_id=tok.pad_token_id,
            )
        assert out.shape[1] == args.prompt_len + n

    def sampler(lean: bool) -> Callable[[], None]:
        def run() -> None:
            s = TorchSampler(model, tok, seed=0, eos_token_ids=[], lean=lean)
            rows = [s.new_row(p) for p in prompts.tolist()]
            assert all(len(g.token_ids) == n for g in s.generate(rows, n))

        return run

    runners = {
        "hf_generate": hf_generate,
        "torch_sampler_lean": sampler(True),
        "torch_sampler_hf": sampler(False),
    }
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(timed(fn, device))
    tokens = args.batch * n
    return {
        "tokens_per_s": {name: tokens / statistics.median(t) for name, t in times.items()},
        "seconds": times,
        "speedup_lean_vs_hf": statistics.median(
            h / s for h, s in zip(times["hf_generate"], times["torch_sampler_lean"])
        ),
        "speedup_hfpath_vs_hf": statistics.median(
            h / s for h, s in zip(times["hf_generate"], times["torch_sampler_hf"])
        ),
    }


def bench_tree(model, tok, args, device) -> dict:
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(20, len(tok), (args.prefix_len,), generator=gen).tolist()
    s = TorchSampler(model, tok, seed=0, eos_token_ids=[])
    parent = s.new_row(prefix)
    s.generate([parent], 1)  # the prefix is now cached (the trunk's own cost, shared by both ways)
    trunk = s.tokens(parent)

    def forked() -> None:
        branches = [s.fork(parent) for _ in range(args.branches)]
        s.generate(branches, args.branch_tokens)
        for b in branches:
            s.release(b)

    def recomputed() -> None:
        rows = [s.new_row(trunk) for _ in range(args.branches)]
        s.generate(rows, args.branch_tokens)
        for r in rows:
            s.release(r)

    forked(), recomputed()
    times: dict[str, list[float]] = {"fork": [], "recompute": []}
    for _ in range(args.repeats):
        times["fork"].append(timed(forked, device))
        times["recompute"].append(timed(recomputed, device))
    tokens = args.branches * args.branch_tokens
    return {
        "seconds_median": {k: statistics.median(v) for k, v in times.items()},
        "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()},
        "speedup_fork_vs_recompute": statistics.median(
            r / f for f, r in zip(times["fork"], times["recompute"])
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--branch-tokens", type=int, default=32)
    parser.add_argument("--json", default="", help="Also write the results to this JSON file.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    tok = synthetic_tokenizer(args.vocab)
    model = init_model(None, tok, preset=args.preset, seed=0).to(device)
    model.generation_config.eos_token_id = None  # every row runs to the token budget
    flat = bench_flat(model, tok, args, device)
    tree = bench_tree(model, tok, args, device)
    result = {
        "device": str(device),
        "threads": args.threads,
        "preset": args.preset,
        "vocab": len(tok),
        "torch": torch.__version__,
        "args": vars(args),
        "flat": flat,
        "tree": tree,
    }

    print(
        f"flat batch: {args.batch} rows x {args.new_tokens} new tokens, prompt {args.prompt_len}, "
        f"{args.preset} model, vocab {len(tok)}, {args.threads} threads, {device}"
    )
    print("| generator | tokens/s (median) |")
    print("|---|---|")
    for name, tps in flat["tokens_per_s"].items():
        print(f"| {name} | {tps:,.0f} |")
    print(
        f"speed-up, lean path vs model.generate: {flat['speedup_lean_vs_hf']:.2f}x; "
        f"HF-forward path vs model.generate: {flat['speedup_hfpath_vs_hf']:.2f}x"
    )
    print(f"\ntree: prefix {args.prefix_len}, {args.branches} branches x {args.branch_tokens} tokens")
    print("| way | seconds (median) | tokens/s |")
    print("|---|---|---|")
    for name in ("fork", "recompute"):
        print(f"| {name} | {tree['seconds_median'][name]:.3f} | {tree['tokens_per_s'][name]:,.0f} |")
    print(f"speed-up, fork vs recompute: {tree['speedup_fork_vs_recompute']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
