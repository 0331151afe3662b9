"""GPU throughput of aepo's own sampler and update on a 0.6B-class Qwen3 (random weights, bf16).

    PYTHONPATH=src python3 benchmarks/bench_gpu.py --out bench_gpu.json
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --tiny --out /tmp/bench_gpu_tiny.json   # CPU check

The model has Qwen3-0.6B's shapes (hidden 1024, 28 layers, 16 query / 8 kv heads, head_dim
128, intermediate 3072, vocab 151,936, tied embeddings), built with transformers'
Qwen3Config / Qwen3ForCausalLM and random weights (no download), cast to bf16 on the GPU.

1. Sampler: `aepo.rollout.TorchSampler` (default: decode steps as CUDA graphs; and eager, with
   `decode_graphs=False`) versus HF `model.generate`, at each `--batch-sizes`
   (64 and 256 rows), `--prompt-len` random prompt tokens (128), `--new-tokens` sampled tokens
   per row (256), temperature 1, no top-k/top-p, no EOS (every row runs to the budget, and
   both generators produce exactly the same number of tokens). One warm-up each, then
   `--repeats` interleaved timed rounds (median). Reported: generated tokens/s, wall seconds
   (prefill included), ms per decode step, torch.cuda.max_memory_allocated of the call (model
   weights included), and the speed ratio TorchSampler / generate (median of the per-round
   ratios). An out-of-memory error is recorded in place of the numbers. `slot_batch` runs the
   same rows through the continuous scheduler's running batch (`SlotBatch`: a cache that grows
   with the rows; decode steps as CUDA graphs, `slot_batch_eager` without), for its tokens/s
   and memory against `generate`'s.
2. Update: `RLTrainer.update` itself (the trainer's own loop, AdamW from the trainer, bf16
   weights: the trainer has no autocast, it runs in the model's dtype) on one mini-batch of
   `--update-rows` rows (64, 256) of prompt 128 + response 256 tokens, built by
   `RLTrainer.make_batch` from synthetic trajectories (groups of 8 with random rewards, so the
   advantages are non-zero; old log-probs ~ -log V, near this random policy's own). With
   `algo=aepo` that is: forward with log-probs and entropies of the response tokens
   (`token_logprobs_and_entropy`), the entropy-shaped advantage, the `aepo` policy loss,
   backward, grad clipping, one AdamW step, for each `--micro` micro-batch size (gradient
   accumulation over the rows). Reported: seconds per update (median of `--update-repeats`
   after one warm-up), tokens/s (rows x sequence length), MFU = 6 * n_params * tokens / time /
   peak (`--peak-tflops`, 989 = H100 SXM bf16 dense; attention FLOPs not counted, and the LM
   head runs only on response positions, so this is the usual 6ND estimate), peak memory.
3. RL step (skipped when `--skip-rl-step` or when the time budget is spent): an `RLTrainer`
   built from `load_config(None, ["algo=aepo", ...])` with the built-in tokenizer, the AEPO
   tree rollout of `--rl-prompts` x `--rl-n` rows (`--rl-response-tokens` budget), a tool
   function answering "no results"; one warm-up step, then one timed step split into
   rollout (`trainer.collect`), batch (`rollout_metrics` + `make_batch`) and update
   (`trainer.update`): `train_step`'s own sequence. A random policy gives every row the same
   reward, for which `train_step` skips the update, so the batch's advantages are replaced by
   random per-row values here (recorded in the JSON).

`--tiny` runs the same code paths on the CPU with a tiny config (hidden 64, 2 layers, vocab 512,
a few rows and tokens) to check the script. Every section is guarded: an error or OOM is
recorded in the JSON (written after each section) and the run goes on.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

T_START = time.perf_counter()


# ------------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def error_record(exc: BaseException) -> dict:
    return {
        "error": "OOM" if is_oom(exc) else type(exc).__name__,
        "message": str(exc)[:1000],
        "traceback": traceback.format_exc()[-3000:],
    }


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def elapsed() -> float:
    return time.perf_counter() - T_START


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------ model


def model_shapes(tiny: bool) -> dict:
    if tiny:
        return {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    return {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}


def build_model(shapes: dict, tok: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **shapes,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    except Exception:  # noqa: BLE001 - init on the CPU, then move
        model = Qwen3ForCausalLM(config)
    model = model.to(device=device, dtype=dtype).eval()
    # no EOS: every row of both generators runs to its token budget
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def n_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """All parameters (the tied embedding once) and those outside the embedding."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total, total - embed


# ------------------------------------------------------------------------------------ 1. sampler


def run_torch_sampler(sampler_cls, model, tok, prompts: list[list[int]], n: int, info: dict,
                      decode_graphs: bool | None = None) -> None:
    """One TorchSampler call: every prompt a row, `n` tokens each (no EOS, so exactly `n`)."""
    s = sampler_cls(model, tok, temperature=1.0, seed=0, eos_token_ids=[],
                    max_batch_rows=max(256, len(prompts)), decode_graphs=decode_graphs)
    rows = [s.new_row(p) for p in prompts]
    outs = s.generate(rows, n)
    info["lean"] = bool(s.lean)  # the compact Llama-family forward (else the HF forward)
    info["packed"] = getattr(s, "_packed", None) is not None  # stacked fp32 weight copies
    lengths = {len(g.token_ids) for g in outs}
    if lengths != {n}:
        raise RuntimeError(f"TorchSampler produced lengths {sorted(lengths)}, expected {n}")


def run_slot_batch(sampler_cls, model, tok, prompts: list[list[int]], n: int,
                   decode_graphs: bool | None = None) -> None:
    """The same rows through the continuous scheduler's running batch (`SlotBatch`): all start at
    once and run `n` tokens each."""
    from aepo.rollout.sampler.streams import RowKey

    s = sampler_cls(model, tok, temperature=1.0, seed=0, eos_token_ids=[], max_batch_rows=max(256, len(prompts)),
                    decode_graphs=decode_graphs)
    batch = s.open_batch(max_rows=len(prompts))
    for i, p in enumerate(prompts):
        batch.start(s.new_row(p), n, RowKey(0, 0, i))
    lengths = set()
    while batch.active:
        lengths |= {len(g.token_ids) for _, g in batch.step()}
    if lengths != {n}:
        raise RuntimeError(f"SlotBatch produced lengths {sorted(lengths)}, expected {n}")


def run_hf_generate(model, prompts: torch.Tensor, n: int, hf_kwargs: dict) -> None:
    """One `model.generate` call on the same prompts, `n` sampled tokens per row."""
    with torch.inference_mode():
        try:
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **hf_kwargs)
        except (TypeError, ValueError):
            if hf_kwargs.get("top_k") != 0:
                raise
            # a transformers version that refuses top_k=0 / min_new_tokens without EOS
            hf_kwargs.update(top_k=None, top_p=None)
            hf_kwargs.pop("min_new_tokens", None)
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **hf_kwargs)
    if out.shape[1] != prompts.shape[1] + n:
        raise RuntimeError(f"generate returned {out.shape[1] - prompts.shape[1]} new tokens, expected {n}")


def bench_sampler(model, tok, args, device, result: dict, save: Callable[[], None]) -> None:
    from aepo.rollout.sampler import TorchSampler as sampler_cls
    vocab = model.get_output_embeddings().weight.shape[0]
    n = args.new_tokens
    section = result.setdefault("sampler", {})
    section["settings"] = {"prompt_len": args.prompt_len, "new_tokens": n, "temperature": 1.0,
                           "top_k": 0, "top_p": 1.0, "eos": None, "repeats": args.repeats,
                           "warmup": 1}
    for batch in args.batch_sizes:
        if elapsed() > args.budget_s * 0.45:
            section[str(batch)] = {"skipped": f"time budget ({elapsed():.0f} s elapsed)"}
            continue
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(4, vocab, (batch, args.prompt_len), generator=gen).to(device)
        info: dict[str, Any] = {}
        # top_k=0 / top_p=1: plain sampling like the sampler's (generate's default top_k is 50)
        hf_kwargs: dict[str, Any] = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                     "max_new_tokens": n, "min_new_tokens": n,
                                     "pad_token_id": tok.pad_token_id}
        runners: dict[str, Callable[[], None]] = {
            "torch_sampler": functools.partial(run_torch_sampler, sampler_cls, model, tok,
                                               prompts.tolist(), n, info)}
        if device.type == "cuda":  # the default replays decode steps as CUDA graphs
            runners["torch_sampler_eager"] = functools.partial(
                run_torch_sampler, sampler_cls, model, tok, prompts.tolist(), n, {}, decode_graphs=False)
        runners["slot_batch"] = functools.partial(run_slot_batch, sampler_cls, model, tok, prompts.tolist(), n)
        if device.type == "cuda":
            runners["slot_batch_eager"] = functools.partial(
                run_slot_batch, sampler_cls, model, tok, prompts.tolist(), n, decode_graphs=False)
        if not args.skip_hf:
            runners["hf_generate"] = functools.partial(run_hf_generate, model, prompts, n, hf_kwargs)
        entry: dict[str, Any] = {"rows": batch}
        times: dict[str, list[float]] = {name: [] for name in runners}
        peaks: dict[str, int] = {}
        failed: dict[str, dict] = {}
        for name, fn in runners.items():  # warm-up
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - OOM at 256 rows is a result, not a crash
                failed[name] = error_record(e)
            free_memory(device)
        for _ in range(args.repeats):
            for name, fn in runners.items():
                if name in failed:
                    continue
                try:
                    reset_peak(device)
                    times[name].append(timed(fn, device))
                    peaks[name] = max(peaks.get(name, 0), peak_bytes(device) or 0)
                except Exception as e:  # noqa: BLE001
                    failed[name] = error_record(e)
                free_memory(device)
        tokens = batch * n
        for name in runners:
            if name in failed:
                entry[name] = failed[name]
                continue
            wall = median(times[name])
            entry[name] = {
                "tokens_per_s": tokens / wall,
                "wall_s": wall,
                "wall_s_all": times[name],
                "ms_per_step": 1000 * wall / n,
                "max_memory_allocated": peaks.get(name) or None,
            }
        entry["torch_sampler_paths"] = info
        if "hf_generate" in runners:
            entry["hf_generate_kwargs"] = {k: v for k, v in hf_kwargs.items() if k != "pad_token_id"}
            if not failed and times["hf_generate"]:
                entry["speedup_torch_sampler_vs_generate"] = median(
                    [h / t for h, t in zip(times["hf_generate"], times["torch_sampler"])])
        entry["generated_tokens"] = tokens
        section[str(batch)] = entry
        save()


# ------------------------------------------------------------------------------------ 2. update


def _rl_parts() -> dict:
    from aepo.config import load_config
    from aepo.data.datasets import TaskRow
    from aepo.train.rl import RLTrainer
    from aepo.types import ToolCall, Trajectory

    return {"RLTrainer": RLTrainer, "load_config": load_config, "Trajectory": Trajectory, "TaskRow": TaskRow,
            "ToolCall": ToolCall}


def synthetic_trajectories(parts: dict, rows: int, prompt_len: int, resp_len: int, vocab: int,
                           group: int, seed: int) -> list:
    """Rows in groups of `group` (one prompt each), every response token policy-generated,
    old log-probs ~ -log V (this random policy is near-uniform), random rewards."""
    Trajectory = parts["Trajectory"]
    g = torch.Generator().manual_seed(seed)
    lp0 = -math.log(vocab)
    out = []
    for i in range(rows):
        pid = i // group
        prompt = torch.randint(4, vocab, (prompt_len,), generator=torch.Generator().manual_seed(pid))
        resp = torch.randint(4, vocab, (resp_len,), generator=g)
        logprobs = (lp0 + 0.05 * torch.randn(resp_len, generator=g)).tolist()
        t = Trajectory(prompt_id=f"p{pid}", row_id=i % group, prompt_ids=prompt.tolist(),
                       response_ids=resp.tolist(), response_mask=[1] * resp_len, logprobs=logprobs,
                       entropies=[-lp0] * resp_len)
        t.reward = float(torch.rand((), generator=g))
        out.append(t)
    return out


class _TaskStub:
    def __init__(self, i: int) -> None:
        self.id, self.question, self.answers, self.data_source = f"t{i}", "What is 2+2?", ["4"], "bench"


def make_trainer(parts: dict, model, tok, overrides: list[str], tasks: list, out_dir: str):
    cfg = parts["load_config"](None, overrides)

    def tool_fn(calls):
        return [parts["ToolCall"](name=n, argument=a, result="no results") for n, a in calls]

    return parts["RLTrainer"](cfg, model, tok, tasks, tool_fn, out_dir)


def update_flops(model, rows: int, seq_len: int, head_positions: int) -> float:
    """Training FLOPs of one update counted closer than 6ND: the layers' weights on every token,
    the LM head only on the scored positions (as `selected_logprobs` does), causal attention
    scores (QK^T and AV, half the square), all times 3 for forward + backward."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    layer_params = total - embed - (0 if tied else head)
    tokens = rows * seq_len
    q_dim = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    attention = 2 * 2 * q_dim * c.num_hidden_layers * rows * seq_len * (seq_len + 1) / 2
    forward = 2 * layer_params * tokens + 2 * head * head_positions + attention
    return 3 * forward


def measure_update(parts: dict, model, tok, overrides: list[str], trajs: list, tmp: str, args,
                   device: torch.device, n_params: int) -> dict:
    """A fresh RLTrainer (fresh AdamW); one warm-up update, then `args.update_repeats` timed ones."""
    trainer = make_trainer(parts, model, tok, overrides, [_TaskStub(0)], tmp)
    batch = trainer.make_batch(trajs)
    rows = len(batch)
    seq_len = int(batch.input_ids.shape[1])
    tokens = rows * seq_len
    resp_tokens = int(batch.loss_mask.sum())
    trainer.update(batch, 0)  # warm-up (also allocates AdamW's state)
    times: list[float] = []
    metrics: dict = {}
    reset_peak(device)
    for k in range(args.update_repeats):
        sync(device)
        t0 = time.perf_counter()
        metrics = trainer.update(batch, k + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    trainer.optimizer.zero_grad(set_to_none=True)
    sec = median(times)
    peak = args.peak_tflops * 1e12
    return {
        "seconds": sec,
        "seconds_all": times,
        "seq_len": seq_len,
        "tokens": tokens,
        "response_tokens": resp_tokens,
        "tokens_per_s": tokens / sec,
        "response_tokens_per_s": resp_tokens / sec,
        "tflops": 6 * n_params * tokens / sec / 1e12,
        "mfu": 6 * n_params * tokens / sec / peak,
        "mfu_detailed": update_flops(model, rows, seq_len, resp_tokens) / sec / peak,
        "max_memory_allocated": peak_bytes(device),
        "optimizer_steps_per_update": 1,
        "loss_metrics": {k: float(v) for k, v in metrics.items()
                         if k in ("pg_loss", "grad_norm", "entropy_all", "pg_clipfrac")},
    }


def bench_update(model, tok, args, device, result: dict, save: Callable[[], None], n_params: int) -> None:
    from aepo.train import vocab_head

    defaults = vocab_head.CHUNK_ELEMENTS, vocab_head.CUDA_CHUNK_ELEMENTS
    try:
        _bench_update(model, tok, args, device, result, save, n_params, vocab_head)
    finally:
        vocab_head.CHUNK_ELEMENTS, vocab_head.CUDA_CHUNK_ELEMENTS = defaults


def _bench_update(model, tok, args, device, result: dict, save: Callable[[], None], n_params: int,
                  vocab_head) -> None:
    parts = _rl_parts()
    vocab = model.get_output_embeddings().weight.shape[0]
    section = result.setdefault("update", {})
    section["settings"] = {
        "driver": "RLTrainer.update (the trainer's own update loop and AdamW) on a batch from "
                  "RLTrainer.make_batch of synthetic trajectories; bf16 weights, no autocast "
                  "(the trainer runs in the model's dtype)",
        "algo": args.algo, "prompt_len": args.prompt_len, "response_len": args.new_tokens,
        "group_size": args.group, "repeats": args.update_repeats, "warmup": 1,
        "mfu": "6 * n_params * rows * seq_len / seconds / peak (n_params with the tied embedding once)",
        "mfu_detailed": "update_flops(): layers on every token, LM head on the scored positions only, "
                        "causal attention scores; / seconds / peak",
        "n_params": n_params, "peak_flops": args.peak_tflops * 1e12,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.update_rows:
            trajs = synthetic_trajectories(parts, rows, args.prompt_len, args.new_tokens, vocab, args.group, rows)
            for micro, chunk in [(m, c) for m in args.micro for c in args.head_chunk_elements]:
                key = f"{rows}x{micro}" + (f" head chunks {chunk}" if len(args.head_chunk_elements) > 1 else "")
                if elapsed() > args.budget_s * 0.75:
                    section[key] = {"skipped": f"time budget ({elapsed():.0f} s elapsed)"}
                    continue
                if micro > rows:
                    continue
                overrides = [f"algo={args.algo}", f"trainer.ppo_mini_batch_size={rows}",
                             f"trainer.ppo_micro_batch_size={micro}", "trainer.total_steps=1000",
                             "trainer.ppo_epochs=1"]
                entry: dict[str, Any] = {"rows": rows, "micro_batch": micro}
                if chunk is not None:  # 0: the direct head (full [N, V] logits) at any size
                    vocab_head.CHUNK_ELEMENTS = vocab_head.CUDA_CHUNK_ELEMENTS = chunk or 1 << 62
                    entry["head_chunk_elements"] = chunk
                try:
                    entry.update(measure_update(parts, model, tok, overrides, trajs, tmp, args, device,
                                                n_params))
                except Exception as e:  # noqa: BLE001 - OOM at 256 rows is a result
                    entry.update(error_record(e))
                model.zero_grad(set_to_none=True)
                free_memory(device)
                section[key] = entry
                save()


# ------------------------------------------------------------------------------------ 3. RL step


# the schedulers' overrides (turns, continuous, speculative), as bench_rollout_batching runs them,
# and speculative with the running batch's decode steps eager (no CUDA graphs)
SCHEDULERS = {**importlib.import_module("bench_rollout_batching").ARMS,
              "speculative_eager": [*importlib.import_module("bench_rollout_batching").ARMS["speculative"],
                                    "rollout.decode_graphs=false"]}


def bench_rl_step(model, tok, args, device, result: dict, save: Callable[[], None], pause: float = 0.0,
                  name: str = "rl_step", scheduler: str = "turns") -> None:
    parts = _rl_parts()
    rl_mod = importlib.import_module(parts["RLTrainer"].__module__)
    rollout_metrics = getattr(rl_mod, "rollout_metrics", None)
    section = result.setdefault(name, {})
    rows = args.rl_prompts * args.rl_n
    overrides = [
        f"algo={args.algo}", f"rollout.n={args.rl_n}", f"trainer.prompts_per_step={args.rl_prompts}",
        f"rollout.max_response_tokens={args.rl_response_tokens}",
        f"trainer.ppo_mini_batch_size={rows}", f"trainer.ppo_micro_batch_size={min(args.rl_micro, rows)}",
        "trainer.total_steps=1000", f"rollout.pause_below={pause}", *SCHEDULERS[scheduler],
    ]
    section["settings"] = {
        "driver": "RLTrainer.collect + rollout_metrics + make_batch + update (train_step's sequence)",
        "overrides": overrides, "rows": rows, "tool_fn": "returns 'no results' at once",
        "note": "a random policy gives every row the same reward; the batch's advantages are then "
                "replaced by random per-row values so the update runs (train_step would skip it)",
    }
    words = ["river", "capital", "year", "author", "mountain", "planet", "song", "bridge", "king", "city"]
    TaskRow = parts["TaskRow"]
    tasks = [TaskRow(f"t{i}", f"Which {words[i % len(words)]} is number {i} on the list?", [str(i)], "bench")
             for i in range(max(8, args.rl_prompts))]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = None
        try:
            trainer = make_trainer(parts, model, tok, overrides, tasks, tmp)
            steps = []
            for step in range(2):  # step 0 is the warm-up
                sync(device)
                reset_peak(device)
                t0 = time.perf_counter()
                trajs, all_trajs, rstats = trainer.collect(step)
                sync(device)
                t1 = time.perf_counter()
                metrics = rollout_metrics(all_trajs, rstats) if rollout_metrics else {}
                batch = trainer.make_batch(trajs, metrics)
                forced = bool(batch.advantages.abs().sum() == 0)
                if forced:
                    g = torch.Generator().manual_seed(step)
                    batch.advantages = torch.randn(len(batch), 1, generator=g) * batch.loss_mask
                sync(device)
                t2 = time.perf_counter()
                trainer.update(batch, step)
                sync(device)
                t3 = time.perf_counter()
                steps.append({
                    "step": step,
                    "rollout_s": t1 - t0,
                    "batch_s": t2 - t1,
                    "update_s": t3 - t2,
                    "total_s": t3 - t0,
                    "rows": len(trajs),
                    "response_tokens": int(sum(len(t.response_ids) for t in trajs)),
                    "policy_tokens": int(batch.loss_mask.sum()),
                    "seq_len": int(batch.input_ids.shape[1]),
                    "train_tokens": int(batch.attention_mask.sum()),
                    "branches": metrics.get("rollout/branches"),
                    "tool_calls_per_row": metrics.get("rollout/tool_calls"),
                    "generate_calls": rstats.get("generate_calls"),
                    "decode_steps": rstats.get("decode_steps"),
                    "critical_path_tokens": rstats.get("critical_path_tokens"),
                    "graph_steps": rstats.get("graph_steps"),  # the running batch's, as CUDA graphs
                    "layer_graph_steps": rstats.get("layer_graph_steps"),  # steps with joins: layers as graphs
                    "graph_captures": rstats.get("graph_captures"),
                    "graph_capture_s": rstats.get("graph_capture_s"),  # of the rollout's time
                    "advantages_forced": forced,
                    "max_memory_allocated": peak_bytes(device),
                })
            section["warmup"] = steps[0]
            section["timed"] = steps[1]
            s = steps[1]
            section["rollout_fraction"] = s["rollout_s"] / s["total_s"]
            section["rollout_tokens_per_s"] = s["response_tokens"] / s["rollout_s"]
        except Exception as e:  # noqa: BLE001
            section.update(error_record(e))
        finally:
            del trainer
            model.zero_grad(set_to_none=True)
            free_memory(device)
    save()


# ------------------------------------------------------------------------------------ main


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_gpu.json", help="JSON file for the results")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch-sizes", type=ints, default=None, help="sampler rows (default 64,256)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None, help="sampler budget and update response length")
    p.add_argument("--repeats", type=int, default=2, help="timed sampler rounds after the warm-up")
    p.add_argument("--skip-hf", action="store_true", help="do not time model.generate")
    p.add_argument("--update-rows", type=ints, default=None, help="rows per update (default 64,256)")
    p.add_argument("--micro", type=ints, default=None, help="micro-batch sizes to try (default 16,32,64)")
    p.add_argument("--update-repeats", type=int, default=2)
    p.add_argument("--head-chunk-elements", type=ints, default=None,
                   help="LM-head chunk sizes to compare (aepo.train.vocab_head's; 0 = direct "
                        "head); default: the library's own")
    p.add_argument("--group", type=int, default=8, help="rows per prompt in the synthetic update batch")
    p.add_argument("--algo", default="aepo", help="algorithm preset for the update and the RL step")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--skip-rl-step", action="store_true")
    p.add_argument("--rl-prompts", type=int, default=None)
    p.add_argument("--rl-n", type=int, default=None)
    p.add_argument("--rl-response-tokens", type=int, default=None)
    p.add_argument("--rl-micro", type=int, default=16)
    p.add_argument("--rl-pause-below", type=floats, default=[0.0],
                   help="rollout.pause_below values of the RL step, one step each (0: off; e.g. 0,0.25)")
    p.add_argument("--rl-schedulers", default="turns",
                   help="rollout schedulers of the RL step, one step each: turns, continuous, speculative "
                        "(continuous with rollout.speculate=true), speculative_eager (without decode graphs); "
                        "e.g. turns,continuous,speculative")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="wall-clock budget: later measurements are skipped once it is mostly spent")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 with --tiny)")
    args = p.parse_args()
    tiny = args.tiny
    defaults = {
        "batch_sizes": [4, 8] if tiny else [64, 256],
        "prompt_len": 16 if tiny else 128,
        "new_tokens": 8 if tiny else 256,
        "update_rows": [4, 8] if tiny else [64, 256],
        "micro": [4] if tiny else [16, 32, 64],
        "rl_prompts": 2 if tiny else 8,
        "rl_n": 2 if tiny else 8,
        "rl_response_tokens": 16 if tiny else 256,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.head_chunk_elements is None:
        args.head_chunk_elements = [None]
    if tiny and args.group > 2:
        args.group = 2
    if args.device is None:
        args.device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.threads is None and tiny:
        args.threads = 1
    return args


def summary(result: dict) -> None:
    m = result.get("model", {})
    print(f"\n== {result['env'].get('device_name')} | {m.get('n_params', 0) / 1e6:.1f} M params "
          f"({m.get('dtype')}) | wall {result.get('wall_s', 0):.0f} s")
    s = result.get("sampler", {})
    if s:
        st = s.get("settings", {})
        print(f"\nSampler: prompt {st.get('prompt_len')}, {st.get('new_tokens')} new tokens, T=1, no EOS")
        print("| rows | generator | tokens/s | wall s | ms/step | peak mem |")
        print("|---|---|---|---|---|---|")
        for key, e in s.items():
            if key == "settings":
                continue
            if "skipped" in e:
                print(f"| {key} | skipped: {e['skipped']} | | | | |")
                continue
            for name in ("torch_sampler", "torch_sampler_eager", "slot_batch", "slot_batch_eager", "hf_generate"):
                r = e.get(name)
                if r is None:
                    continue
                if "error" in r:
                    print(f"| {key} | {name} | {r['error']}: {r['message'][:60]} | | | |")
                else:
                    print(f"| {key} | {name} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.2f} | "
                          f"{r['ms_per_step']:.1f} | {gib(r['max_memory_allocated'])} |")
            if "speedup_torch_sampler_vs_generate" in e:
                print(f"| {key} | TorchSampler / generate | {e['speedup_torch_sampler_vs_generate']:.2f}x | | | |")
    u = result.get("update", {})
    if u:
        print(f"\nUpdate ({u.get('settings', {}).get('algo')}, RLTrainer.update, one AdamW step):")
        print("| rows x micro | s/update | tokens/s | TFLOP/s (6ND) | MFU (6ND) | MFU (detailed) | peak mem |")
        print("|---|---|---|---|---|---|---|")
        for key, e in u.items():
            if key == "settings":
                continue
            if "skipped" in e:
                print(f"| {key} | skipped | | | | | |")
            elif "error" in e:
                print(f"| {key} | {e['error']}: {e['message'][:60]} | | | | | |")
            else:
                print(f"| {key} | {e['seconds']:.3f} | {e['tokens_per_s']:,.0f} | {e['tflops']:.1f} | "
                      f"{100 * e['mfu']:.1f}% | {100 * e['mfu_detailed']:.1f}% | {gib(e['max_memory_allocated'])} |")
    for key in [k for k in result if k.startswith("rl_step")]:
        r = result[key]
        if "timed" in r:
            t = r["timed"]
            print(f"\n{key} ({t['rows']} rows, {t['response_tokens']} response tokens, "
                  f"{t.get('generate_calls')} generate calls, {t.get('decode_steps')} decode steps for a "
                  f"critical path of {t.get('critical_path_tokens')}"
                  + (f", {t['graph_steps']} as CUDA graphs and {t.get('layer_graph_steps')} with their layers' "
                     f"dense parts as graphs, {t.get('graph_captures')} captured in "
                     f"{t.get('graph_capture_s') or 0:.2f} s" if t.get("graph_steps") else "")
                  + "): "
                  f"rollout {t['rollout_s']:.2f} s ({r['rollout_tokens_per_s']:,.0f} tokens/s), "
                  f"batch {t['batch_s']:.2f} s, update {t['update_s']:.2f} s, "
                  f"total {t['total_s']:.2f} s (rollout {100 * r['rollout_fraction']:.0f}%)")
        elif "error" in r:
            print(f"\n{key}: {r['error']}: {r['message'][:200]}")
        elif "skipped" in r:
            print(f"\n{key} skipped: {r['skipped']}")
    errors = result.get("errors")
    if errors:
        print("\nErrors:", json.dumps(errors, indent=1)[:2000])


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    random.seed(0)
    torch.manual_seed(0)

    import transformers

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }
    result: dict[str, Any] = {"env": env, "args": vars(args), "errors": {}}

    def save() -> None:
        result["wall_s"] = elapsed()
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        os.replace(tmp, args.out)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    save()

    from aepo.models.tokenizer import build_tokenizer
    shapes = model_shapes(args.tiny)
    # aepo's built-in tokenizer (protocol tags as single tokens); the model's vocabulary is
    # larger (Qwen3's), which the sampler and trainer allow (models may pad their vocabulary)
    tok = build_tokenizer(None, max_vocab=min(8000, shapes["vocab_size"]))
    shapes["vocab_size"] = max(shapes["vocab_size"], len(tok))
    t0 = time.perf_counter()
    model = build_model(shapes, tok, device, dtype)
    total, non_embed = n_parameters(model)
    result["model"] = {
        "config": shapes, "dtype": args.dtype, "n_params": total, "n_params_non_embedding": non_embed,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "tokenizer_len": len(tok), "build_s": time.perf_counter() - t0,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    save()
    print(f"model: {total / 1e6:.1f} M parameters ({non_embed / 1e6:.1f} M non-embedding), {args.dtype}, "
          f"{device}; built in {result['model']['build_s']:.1f} s", flush=True)

    sections: list[tuple[str, Callable[[], None]]] = [
        ("sampler", lambda: bench_sampler(model, tok, args, device, result, save)),
        ("update", lambda: bench_update(model, tok, args, device, result, save, total)),
    ]
    if not args.skip_rl_step:
        schedulers = [x.strip() for x in args.rl_schedulers.split(",") if x.strip()]
        for name in schedulers:
            if name not in SCHEDULERS:
                raise SystemExit(f"--rl-schedulers: unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
        for scheduler in schedulers:
            for pause in args.rl_pause_below:
                if pause and scheduler != "turns":
                    continue  # pause_below trims the turn scheduler's turns
                key = "rl_step" if pause == 0 else f"rl_step pause_below={pause}"
                key += "" if scheduler == "turns" else f" {scheduler}"
                sections.append((key, functools.partial(bench_rl_step, model, tok, args, device, result, save,
                                                        pause, key, scheduler)))
    for name, fn in sections:
        if name.startswith("rl_step") and elapsed() > args.budget_s * 0.7:
            result[name] = {"skipped": f"time budget ({elapsed():.0f} s elapsed of {args.budget_s:.0f})"}
            save()
            continue
        t = time.perf_counter()
        print(f"[{elapsed():6.1f} s] {name} ...", flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one section failing must not lose the others
            result["errors"][name] = error_record(e)
            traceback.print_exc()
        free_memory(device)
        result.setdefault("section_s", {})[name] = time.perf_counter() - t
        save()
    save()
    summary(result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
