"""One RL step of aepo against TRL's GRPOTrainer, on identical work, in one process.

    .venv/bin/pip install -e ".[bench]"      # TRL 1.16 beside aepo (torch stays as installed)
    .venv/bin/python benchmarks/bench_vs_trl.py [--steps 6] [--threads 2]
    python3 benchmarks/bench_vs_trl.py --device cuda --model qwen3-0.6b --max-tokens 256 --micro 32

Work per step, for both: a tiny Qwen3 (d = 128, 4 layers, vocabulary of about 500 from the
built-in tokenizer, random weights; `--preset small` for d = 256, 6 layers), 16 prompts x 8
completions of up to 128 tokens sampled at T = 1 (no stop strings, no tools), a GRPO
advantage, one optimizer step over the 128 rows, no KL term, no reference model. The reward is
the sum of the completion's token ids modulo 3 (for both): a random model never earns a task
reward, and equal rewards would make every advantage zero and let either side skip its update.

TRL's GRPOConfig turns gradient checkpointing on by default (recomputing activations in the
backward pass); aepo does not, so the script turns it off for TRL (`--trl-gradient-checkpointing`
keeps TRL's default).

Steps alternate: TRL's `train()` runs its own loop, and a callback runs one aepo step after
each TRL step, outside TRL's timing, so machine load hits both alike. Printed: per-step
seconds of each, the median ratio aepo / TRL, and the share of the machine's FLOP limit each
reaches: the step's model arithmetic (2 N T for sampling, 6 N T for the update's forward and
backward, N parameters, T tokens) over its time, against a large float32 matmul measured in
the same run. Results go to benchmarks/RESULTS.md.

On a GPU (`--device cuda`) both models are bf16 and `--model qwen3-0.6b` gives Qwen3-0.6B's
shapes (vocabulary 151,936, of which the small tokenizer names a few hundred: sampled ids
outside it decode to nothing, for both). The limit is then a large bf16 matmul; the script
also prints each side's sampling tokens/s (TRL's `generate` calls timed by a wrapper) and
peak GPU memory, and `--micro` splits the update into micro-batches (gradient accumulation
for TRL, `ppo_micro_batch_size` for aepo) so that a real-size update fits.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_gpu import sync
from bench_sampler import synthetic_tokenizer  # the same seeded tokenizer as the sampler benchmark


def matmul_gflops(threads: int, device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """The machine's practical limit: a large square matmul in the run's dtype (float32 on the
    CPU at `threads`, 2048; bf16 on a GPU, 8192, random data)."""
    torch.set_num_threads(threads)
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def build_model(name: str, tok, device: torch.device, dtype: torch.dtype):
    """A built-in preset (`aepo.models.factory.MODEL_PRESETS`) or `qwen3-0.6b` (Qwen3-0.6B's shapes,
    vocabulary 151,936), random weights from seed 0, in `dtype` on `device`."""
    from aepo.models.factory import init_model

    if name != "qwen3-0.6b":
        return init_model(None, tok, name).to(device=device, dtype=dtype)
    from bench_gpu import build_model as build_shaped
    from bench_gpu import model_shapes

    model = build_shaped(model_shapes(tiny=False), tok, device, dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def peak_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def token_reward(ids) -> float:
    return float(sum(ids) % 3) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=500)
    ap.add_argument("--model", "--preset", dest="model", default="tiny",
                    help="model: a preset of aepo.models.factory.MODEL_PRESETS (tiny, small, ...) or qwen3-0.6b")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda runs both models in bf16)")
    ap.add_argument("--micro", type=int, default=None, help="rows per micro-batch (default: all rows)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="TRL's own default (GRPOConfig turns it on); off here so both do the same work")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = args.prompts * args.n
    micro = args.micro or rows
    if rows % micro:
        raise SystemExit(f"--micro {micro} must divide the {rows} rows of a step")

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from aepo.config import load_config
    from aepo.data.datasets import TaskRow
    from aepo.train import rl as rl_module

    torch.set_num_threads(args.threads)
    peak = matmul_gflops(args.threads, device, dtype)
    tok = synthetic_tokenizer(args.vocab)
    tok.padding_side = "left"
    rng = random.Random(1)
    questions = [" ".join(tok.decode([rng.randrange(10, len(tok))]).strip() or "x" for _ in range(12))
                 for _ in range(args.prompts * (args.steps + 2))]

    # ---- aepo: GRPO preset, independent sampling, one optimizer step over all rows
    aepo_model = build_model(args.model, tok, device, dtype)
    n_params = sum(p.numel() for p in aepo_model.parameters())
    cfg = load_config(None, ["algo=grpo", f"rollout.n={args.n}", "rollout.temperature=1.0",
                             f"rollout.max_response_tokens={args.max_tokens}", "rollout.max_tool_calls=0",
                             f"trainer.prompts_per_step={args.prompts}",
                             f"trainer.ppo_mini_batch_size={rows}", f"trainer.ppo_micro_batch_size={micro}",
                             "trainer.save_every=0", "actor.kl_coef=0", "tools.enabled=[]",
                             f"trainer.threads={args.threads}"])
    rl_module.score_trajectory = lambda traj, golds, data_source=None, **kw: {  # see the module docstring
        "reward": token_reward(traj.response_ids), "acc": 0.0, "f1": 0.0, "em": 0.0, "format_ok": True,
        "answer": ""}
    tasks = [TaskRow(id=f"q{i}", question=q, answers=["x"], data_source="bench")
             for i, q in enumerate(questions)]
    out = Path(tempfile.mkdtemp(prefix="bench_vs_trl_"))
    trainer = rl_module.RLTrainer(cfg, aepo_model, tok, tasks, lambda calls: [], out / "aepo")
    aepo_times: list[float] = []
    aepo_tokens: list[int] = []
    aepo_rollout: list[float] = []
    aepo_peak: list[int] = []

    def aepo_step(step: int) -> None:
        peak_memory(device)
        sync(device)
        t0 = time.perf_counter()
        m = trainer.train_step(step)
        sync(device)
        aepo_times.append(time.perf_counter() - t0)
        aepo_tokens.append(int(m["rollout/response_length"] * m["rollout/rows"]))
        aepo_rollout.append(m["timing/rollout"])
        aepo_peak.append(peak_memory(device))

    # ---- TRL: GRPOTrainer on the same model architecture and the same prompts
    trl_model = build_model(args.model, tok, device, dtype)
    trl_generate: list[float] = []  # seconds in TRL's generate calls, per step
    trl_completion_tokens: list[int] = []
    plain_generate = trl_model.generate

    def timed_generate(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = plain_generate(*a, **kw)
        sync(device)
        trl_generate[-1] += time.perf_counter() - t0
        prompt_ids = kw.get("input_ids", a[0] if a else None)
        completions = out[:, prompt_ids.shape[1]:]
        ended = completions == tok.eos_token_id
        lengths = torch.where(ended.any(1), ended.int().argmax(1) + 1, completions.shape[1])
        trl_completion_tokens[-1] += int(lengths.sum())
        return out

    trl_model.generate = timed_generate
    data = Dataset.from_list([{"prompt": f"question: {q}\n"} for q in questions])

    def reward(completions, completion_ids, **kw):
        return [token_reward(ids) for ids in completion_ids]

    trl_args = GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // micro,
        num_generations=args.n, max_completion_length=args.max_tokens, temperature=1.0, beta=0.0,
        learning_rate=1e-4, max_steps=args.steps + 1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=device.type == "cpu", bf16=device.type == "cuda", dataloader_num_workers=0, seed=0,
        disable_tqdm=True, gradient_checkpointing=args.trl_gradient_checkpointing,
    )
    trl_times: list[float] = []
    trl_peak: list[int] = []

    class Alternate(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            trl_generate.append(0.0)
            trl_completion_tokens.append(0)
            peak_memory(device)
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync(device)
            trl_times.append(time.perf_counter() - self.t0)
            trl_peak.append(peak_memory(device))
            aepo_step(state.global_step - 1)  # outside TRL's timing

    trl = GRPOTrainer(model=trl_model, reward_funcs=reward, args=trl_args, train_dataset=data,
                      processing_class=tok, callbacks=[Alternate()])
    trl.train()

    # the first step of each warms up (allocations, tokenizer caches) and is not counted
    a, t = aepo_times[1:], trl_times[1:]
    ratios = [x / y for x, y in zip(a, t)]
    tokens = statistics.median(aepo_tokens[1:])  # completion tokens per step; prompts are short
    flops = 8 * n_params * tokens  # 2 N T sampling + 6 N T update
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {args.threads}"
    print(f"{where}; {str(dtype).removeprefix('torch.')} matmul limit {peak:.0f} GFLOP/s; "
          f"model {args.model}, {n_params / 1e6:.2f} M params; "
          f"{rows} rows (micro-batches of {micro}), median {tokens:.0f} completion tokens per step")
    print("aepo s/step:", [round(x, 2) for x in a])
    print("aepo rollout s:", [round(x, 2) for x in aepo_rollout[1:]])
    print("TRL  s/step:", [round(x, 2) for x in t])
    print("TRL  generate s:", [round(x, 2) for x in trl_generate[1 : len(t) + 1]])
    if device.type == "cuda":
        trl_rate = [n / s for n, s in zip(trl_completion_tokens[1 : len(t) + 1], trl_generate[1 : len(t) + 1])]
        aepo_rate = [n / s for n, s in zip(aepo_tokens[1:], aepo_rollout[1:])]
        print(f"sampling tokens/s (completion tokens over sampling seconds, median): "
              f"aepo {statistics.median(aepo_rate):,.0f}, TRL generate {statistics.median(trl_rate):,.0f}")
        print(f"peak GPU memory: aepo {max(aepo_peak[1:]) / 2**30:.1f} GiB, "
              f"TRL {max(trl_peak[1:]) / 2**30:.1f} GiB")
    med_a, med_t = statistics.median(a), statistics.median(t)
    print(f"median: aepo {med_a:.2f} s, TRL {med_t:.2f} s; ratio aepo / TRL {statistics.median(ratios):.2f}")
    print(f"share of the FLOP limit: aepo {flops / med_a / 1e9 / peak:.0%}, "
          f"TRL {flops / med_t / 1e9 / peak:.0%} "
          f"(8 N T = {flops / 1e9:.1f} GFLOP per step; the limit needs {flops / 1e9 / peak:.2f} s)")


if __name__ == "__main__":
    main()
