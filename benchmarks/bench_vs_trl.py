"""One RL step of aepo against TRL's GRPOTrainer, on identical work, in one process.

    .venv/bin/pip install -e ".[bench]"      # TRL 1.16 beside aepo (torch stays as installed)
    .venv/bin/python benchmarks/bench_vs_trl.py [--steps 6] [--threads 2]

Work per step, for both: a tiny Qwen3 (d = 128, 4 layers, vocabulary of about 500 from the
built-in tokenizer, random weights; `--preset small` for d = 256, 6 layers), 16 prompts x 8
completions of up to 128 tokens sampled at T = 1 (no stop strings, no tools), a GRPO
advantage, one optimizer step over the 128 rows, no KL term, no reference model. The reward is
the completion's length modulo 3 (for both): a random model never earns a task reward, and
equal rewards would make every advantage zero and let either side skip its update.

Steps alternate: TRL's `train()` runs its own loop, and a callback runs one aepo step after
each TRL step, outside TRL's timing, so machine load hits both alike. Printed: per-step
seconds of each, the median ratio aepo / TRL, and the share of the machine's FLOP limit each
reaches: the step's model arithmetic (2 N T for sampling, 6 N T for the update's forward and
backward, N parameters, T tokens) over its time, against a large float32 matmul measured in
the same run. Results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_sampler import synthetic_tokenizer  # the same seeded tokenizer as the sampler benchmark


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """The machine's practical float32 limit at `threads`: a large square matmul."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def length_reward(n_chars: int) -> float:
    return float(n_chars % 3) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=500)
    ap.add_argument("--preset", default="tiny", help="model size (aepo.models.factory.PRESETS): tiny, small, ...")
    args = ap.parse_args()

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from transformers import TrainerCallback

    from aepo.config import load_config
    from aepo.data.datasets import TaskRow
    from aepo.models.factory import init_model
    from aepo.train import rl as rl_module

    torch.set_num_threads(args.threads)
    peak = matmul_gflops(args.threads)
    tok = synthetic_tokenizer(args.vocab)
    tok.padding_side = "left"
    rng = random.Random(1)
    questions = [" ".join(tok.decode([rng.randrange(10, len(tok))]).strip() or "x" for _ in range(12))
                 for _ in range(args.prompts * (args.steps + 2))]

    # ---- aepo: GRPO preset, independent sampling, one optimizer step over all rows
    aepo_model = init_model(None, tok, args.preset)
    n_params = sum(p.numel() for p in aepo_model.parameters())
    rows = args.prompts * args.n
    cfg = load_config(None, ["algo=grpo", f"rollout.n={args.n}", "rollout.temperature=1.0",
                             f"rollout.max_response_tokens={args.max_tokens}", "rollout.max_tool_calls=0",
                             f"trainer.prompts_per_step={args.prompts}",
                             f"trainer.ppo_mini_batch_size={rows}", f"trainer.ppo_micro_batch_size={rows}",
                             "trainer.save_every=0", "actor.kl_coef=0", "tools.enabled=[]",
                             f"trainer.threads={args.threads}"])
    rl_module.score_trajectory = lambda traj, golds, data_source=None, **kw: {  # see the module docstring
        "reward": length_reward(len(traj.text)), "acc": 0.0, "f1": 0.0, "em": 0.0, "format_ok": True,
        "answer": ""}
    tasks = [TaskRow(id=f"q{i}", question=q, answers=["x"], data_source="bench")
             for i, q in enumerate(questions)]
    out = Path(tempfile.mkdtemp(prefix="bench_vs_trl_"))
    trainer = rl_module.RLTrainer(cfg, aepo_model, tok, tasks, lambda calls: [], out / "aepo")
    aepo_times: list[float] = []
    aepo_tokens: list[int] = []
    aepo_rollout: list[float] = []

    def aepo_step(step: int) -> None:
        t0 = time.perf_counter()
        m = trainer.train_step(step)
        aepo_times.append(time.perf_counter() - t0)
        aepo_tokens.append(int(m["rollout/response_length"] * m["rollout/rows"]))
        aepo_rollout.append(m["timing/rollout"])

    # ---- TRL: GRPOTrainer on the same model architecture and the same prompts
    trl_model = init_model(None, tok, args.preset)
    data = Dataset.from_list([{"prompt": f"question: {q}\n"} for q in questions])

    def reward(completions, **kw):
        return [length_reward(len(c)) for c in completions]

    trl_args = GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_generations=args.n, max_completion_length=args.max_tokens, temperature=1.0, beta=0.0,
        learning_rate=1e-4, max_steps=args.steps + 1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trl_times: list[float] = []

    class Alternate(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            trl_times.append(time.perf_counter() - self.t0)
            aepo_step(state.global_step - 1)  # outside TRL's timing

    trl = GRPOTrainer(model=trl_model, reward_funcs=reward, args=trl_args, train_dataset=data,
                      processing_class=tok, callbacks=[Alternate()])
    trl.train()

    # the first step of each warms up (allocations, tokenizer caches) and is not counted
    a, t = aepo_times[1:], trl_times[1:]
    ratios = [x / y for x, y in zip(a, t)]
    tokens = statistics.median(aepo_tokens[1:])  # completion tokens per step; prompts are short
    flops = 8 * n_params * tokens  # 2 N T sampling + 6 N T update
    print(f"threads {args.threads}; float32 matmul limit {peak:.0f} GFLOP/s; "
          f"model {n_params / 1e6:.2f} M params; "
          f"{rows} rows, median {tokens:.0f} completion tokens per step")
    print("aepo s/step:", [round(x, 2) for x in a])
    print("aepo rollout s:", [round(x, 2) for x in aepo_rollout[1:]])
    print("TRL  s/step:", [round(x, 2) for x in t])
    med_a, med_t = statistics.median(a), statistics.median(t)
    print(f"median: aepo {med_a:.2f} s, TRL {med_t:.2f} s; ratio aepo / TRL {statistics.median(ratios):.2f}")
    print(f"share of the FLOP limit: aepo {flops / med_a / 1e9 / peak:.0%}, "
          f"TRL {flops / med_t / 1e9 / peak:.0%} "
          f"(8 N T = {flops / 1e9:.1f} GFLOP per step; the limit needs {flops / 1e9 / peak:.2f} s)")


if __name__ == "__main__":
    main()
