"""What bounds a CPU decode step of the bench_vs_trl model: the KV cache read, not arithmetic.

    .venv/bin/python benchmarks/bench_decode_bound.py [--rows 128] [--threads 2]

The model of `benchmarks/bench_vs_trl.py` (d = 128, 4 layers, 4 query heads on 2 kv heads of
32 dims, MLP 384). For one decode step of `--rows` rows it times, each as a median over
repeats:

- the step's matmuls (packed q/k/v, output, gate/up and down projections of every layer);
- its attention as the lean sampler runs it on CPU (`aepo.rollout.sampler.lean`: scores by
  `baddbmm` against the cached keys, softmax, `bmm` with the cached values, per layer), for
  several numbers of cached columns;
- a plain read of the same cached keys and values (`sum`), the memory-bandwidth floor;
- the same attention on bfloat16 and float16 caches (half the bytes).

The attention is not counted in a step's 2 N T, so where it costs as much as the matmuls the
sampler cannot come near the machine's FLOP limit. Results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 4, 128, 4, 2, 32, 384


def median_ms(fn, repeats: int = 30, inner: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--columns", default="64,128,256,512", help="cached columns to attend over")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, g = args.rows, HEADS // KV_HEADS
    x = torch.randn(b, HIDDEN)
    qkv_w = torch.randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
    out_w, gate_up_w, down_w = torch.randn(HIDDEN, HIDDEN), torch.randn(2 * MLP, HIDDEN), torch.randn(HIDDEN, MLP)

    def matmuls() -> None:
        for _ in range(LAYERS):
            qkv = x @ qkv_w.t()
            qkv[:, :HIDDEN] @ out_w.t()
            gate_up = x @ gate_up_w.t()
            gate_up[:, :MLP] @ down_w.t()

    flops = 2 * b * LAYERS * (qkv_w.numel() + out_w.numel() + gate_up_w.numel() + down_w.numel())
    t = median_ms(matmuls)
    print(f"{b} rows, {args.threads} threads. Matmuls of one decode step: {t:.2f} ms "
          f"({flops / t / 1e6:.0f} GFLOP/s)")
    print("| cached columns | K+V bytes read | attention ms | plain read ms | GB/s (attention) | "
          "bfloat16 cache ms | float16 cache ms |")
    print("|---|---|---|---|---|---|---|")
    for cols in (int(c) for c in args.columns.split(",")):
        row = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            keys = torch.randn(LAYERS, b, KV_HEADS, cols + 64, HEAD_DIM).to(dtype)  # allocated past the read
            values = torch.randn_like(keys)
            q = torch.randn(b * KV_HEADS, g, HEAD_DIM).to(dtype)
            additive = torch.zeros(b * KV_HEADS, g, cols, dtype=dtype)

            def attention(keys=keys, values=values, q=q, additive=additive) -> None:
                for i in range(LAYERS):
                    k = keys[i, :, :, :cols].reshape(b * KV_HEADS, cols, HEAD_DIM)
                    v = values[i, :, :, :cols].reshape(b * KV_HEADS, cols, HEAD_DIM)
                    scores = torch.baddbmm(additive, q, k.transpose(1, 2), alpha=HEAD_DIM**-0.5)
                    torch.bmm(torch.softmax(scores.float(), dim=-1).to(dtype), v)

            row[dtype] = median_ms(attention, repeats=10 if dtype != torch.float32 else 30)
            if dtype == torch.float32:
                def read(keys=keys, values=values) -> None:
                    for i in range(LAYERS):
                        keys[i, :, :, :cols].sum()
                        values[i, :, :, :cols].sum()

                row["read"] = median_ms(read)
        mb = 2 * LAYERS * b * KV_HEADS * cols * HEAD_DIM * 4 / 1e6
        print(f"| {cols} | {mb:.0f} MB | {row[torch.float32]:.2f} | {row['read']:.2f} | "
              f"{mb / row[torch.float32]:.1f} | {row[torch.bfloat16]:.2f} | {row[torch.float16]:.2f} |")


if __name__ == "__main__":
    main()
