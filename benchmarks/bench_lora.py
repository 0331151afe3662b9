"""An RL update step of a SmolLM2-135M-shaped model: LoRA (`actor.lora`) against full fine-tuning, CPU.

    .venv/bin/python benchmarks/bench_lora.py [--steps 2] [--rows 4] [--threads 2] [--rank 8] \
        [--gradient-checkpointing]

Each variant runs in its own process (so its peak resident memory is its own), on a Llama model
of SmolLM2-135M's shape (30 layers, d = 576, 9 heads / 3 KV heads, MLP 1536, vocabulary
49,152, tied embeddings; 134.5 M parameters) with random weights: nothing is downloaded. A step
is what the trainer does after the rollout: re-score pi_old, score the KL reference
(`actor.kl_coef` > 0: full fine-tuning keeps a second copy of the model, LoRA disables its
adapters instead), and one AdamW step of the GRPO loss over the rows, on fixed trajectories
(prompt 96 + response 160 tokens) with alternating rewards. The rollout is left out: it is
the same forward-only sampling for both. With `--gradient-checkpointing` (`model.gradient_checkpointing`)
the activations kept for the backward pass shrink to each layer's input, so what the two
variants hold besides them (a reference copy, gradients and AdamW states of every weight, or
of the adapters only) decides the peak. Prints one JSON line per variant: seconds per step
(median after the first), peak RSS, trainable and total parameters. Results:
benchmarks/RESULTS.md, "LoRA against full fine-tuning".
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    pad_token_id=2,
    bos_token_id=1,
    eos_token_id=2,
)


def run_variant(rank: int, steps: int, rows: int, threads: int, checkpointing: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aepo.config import load_config
    from aepo.data.datasets import TaskRow
    from aepo.train.rl import RLTrainer
    from aepo.types import Trajectory

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    if checkpointing:  # as `aepo train` does with model.gradient_checkpointing=true
        model.gradient_checkpointing_enable()
        if rank:
            model.enable_input_require_grads()
    cfg = load_config(
        None,
        [
            "algo=grpo",
            "actor.kl_coef=0.001",
            f"actor.lora.rank={rank}",
            f"trainer.ppo_mini_batch_size={rows}",
            "trainer.ppo_micro_batch_size=4",
            "trainer.lr=1e-5",
            "trainer.total_steps=100",
        ],
    )
    trainer = RLTrainer(
        cfg,
        model,
        SimpleNamespace(pad_token_id=2),
        [TaskRow("t", "q", ["a"], "demo")],
        lambda calls: [],
        Path("/tmp/aepo-bench-lora"),
    )
    g = torch.Generator().manual_seed(1)
    trajs = []
    for i in range(rows):
        prompt = torch.randint(3, 49152, (96,), generator=g).tolist()
        resp = torch.randint(3, 49152, (160,), generator=g).tolist()
        t = Trajectory(
            f"p{i // 4}", i % 4, prompt, resp, [1] * len(resp), [-10.0] * len(resp), [1.0] * len(resp)
        )
        t.reward = float(i % 2)
        trajs.append(t)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = trainer.make_batch(trajs)
        trainer.update(batch, step)
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    return {
        "variant": f"LoRA r={rank}" if rank else "full fine-tuning",
        "gradient_checkpointing": checkpointing,
        "rows": rows,
        "step_s": [round(t, 1) for t in times],
        "median_step_s": statistics.median(times[1:] or times),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "trainable_params": trainable,
        "params": total,
        "kl_reference_copy": trainer.ref_model is not None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--variant", type=int, default=None, help=argparse.SUPPRESS)  # child: the rank to run
    args = ap.parse_args()
    if args.variant is not None:
        print(
            json.dumps(
                run_variant(args.variant, args.steps, args.rows, args.threads, args.gradient_checkpointing)
            )
        )
        return
    for rank in (args.rank, 0):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            str(rank),
            "--steps",
            str(args.steps),
            "--rows",
            str(args.rows),
            "--threads",
            str(args.threads),
        ] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
