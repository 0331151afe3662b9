"""Log-prob + entropy through a large LM head: direct autograd against the chunked head.

    .venv/bin/python benchmarks/bench_vocab_head.py [--tokens 1024] [--hidden 1024] [--vocab 151936]

Qwen3's vocabulary (151,936) and a 0.6B-class hidden size by default, float32 on CPU. Each
variant runs in its own process (so peak resident memory is its own): forward and backward of
sum(log p) + 0.1 sum(H) over `--tokens` scored positions, timed after one warm-up, and the
process's peak resident memory minus what it held before the first pass. "direct" is
`F.log_softmax` on the [N, V] logits (what autograd keeps for the backward); "chunked" is
`aepo.train.vocab_head.head_logprobs_and_entropy`. Results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(variant: str, tokens: int, hidden: int, vocab: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from aepo.train.vocab_head import head_logprobs_and_entropy

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=gen) / hidden**0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=gen)

    def step() -> None:
        if variant == "direct":
            logp_all = F.log_softmax((h @ w.t()).float() / 0.7, dim=-1)
            lp, ent = logp_all.gather(-1, y[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)
        else:
            lp, ent = head_logprobs_and_entropy(h, w, y, 0.7)
        (lp.sum() + 0.1 * ent.sum()).backward()
        h.grad = w.grad = None

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds": seconds, "peak_mib_above_start": (peak - before) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["direct", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args.tokens, args.hidden, args.vocab, args.threads)))
        return
    print(f"N={args.tokens} scored tokens, d={args.hidden}, V={args.vocab}, float32, {args.threads} threads; "
          f"[N, V] logits are {args.tokens * args.vocab * 4 / 2**20:.0f} MiB")
    print("| variant | forward + backward s | peak resident MiB above the start |")
    print("|---|---|---|")
    for variant in ("direct", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                              "--hidden", str(args.hidden), "--vocab", str(args.vocab),
                              "--threads", str(args.threads)], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {variant} | {r['seconds']:.2f} | {r['peak_mib_above_start']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
