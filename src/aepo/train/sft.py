"""Supervised cold start on tool-use demonstrations.

A demonstration is a prompt plus segments: ("model", text) written by the agent and
("tool", text) returned by a tool. Tool results are wrapped exactly as at rollout time
(`format_result`) and masked out of the loss: the model learns to call tools and use their
results, never to predict them.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from aepo.io import read_jsonl
from aepo.rollout.protocol import format_result
from aepo.tasks.prompting import encode_prompt
from aepo.train.batch import selected_logits
from aepo.train.console import StepProgress


@dataclass
class SFTConfig:
    epochs: int = 3
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    batch_size: int = 32
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_len: int = 512
    seed: int = 0


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the model must learn to write


def encode_demonstration(prompt: str | list[int], segments: Sequence[tuple[str, str]], tokenizer: Any,
                         *, chat_template: bool = False, eos: bool = False) -> SFTExample:
    """Token ids and loss mask of one demonstration (prompt and tool results masked)."""
    ids = list(prompt) if isinstance(prompt, list) else encode_prompt(prompt, tokenizer, chat_template=chat_template)
    mask = [0] * len(ids)
    for role, text in segments:
        if role == "model":
            t = tokenizer.encode(text, add_special_tokens=False)
            ids += t
            mask += [1] * len(t)
        elif role == "tool":
            t = tokenizer.encode(format_result(text), add_special_tokens=False)
            ids += t
            mask += [0] * len(t)
        else:
            raise ValueError(f"segment role must be 'model' or 'tool', got {role!r}")
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return SFTExample(ids, mask)


def load_sft_jsonl(path: str | Path, tokenizer: Any, *, chat_template: bool = False) -> list[SFTExample]:
    """Read demonstrations: rows {"prompt", "segments": [[role, text], ...]} or chat rows
    {"messages": [{"role": system|user|assistant|tool, "content"}]} (assistant = model, tool = tool)."""
    out = []
    for i, row in enumerate(read_jsonl(path), 1):
        if "segments" in row:
            if "prompt" not in row:
                raise ValueError(f"{path}:{i}: row has 'segments' but no 'prompt' field")
            segs = [(str(r), str(t)) for r, t in row["segments"]]
            out.append(encode_demonstration(str(row["prompt"]), segs, tokenizer, chat_template=chat_template))
        elif "messages" in row:
            msgs = row["messages"]
            first = next((j for j, m in enumerate(msgs) if m.get("role") == "assistant"), None)
            if first is None:
                raise ValueError(f"{path}:{i}: 'messages' has no assistant message to learn from")
            ctx = msgs[:first]
            if chat_template:
                prompt_ids = tokenizer.apply_chat_template(ctx, add_generation_prompt=True, tokenize=True)
                if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
                    prompt_ids = prompt_ids["input_ids"]
                prompt: str | list[int] = list(prompt_ids)
            else:
                prompt = "\n".join(m["content"] for m in ctx if m.get("role") == "user")
            segs = []
            for m in msgs[first:]:
                role = m.get("role")
                if role not in ("assistant", "tool"):
                    raise ValueError(f"{path}:{i}: after the first assistant message only assistant/tool "
                                     f"messages are allowed, got {role!r}")
                segs.append(("model" if role == "assistant" else "tool", str(m.get("content", ""))))
            out.append(encode_demonstration(prompt, segs, tokenizer, chat_template=chat_template,
                                            eos=chat_template))
        else:
            raise ValueError(f"{path}:{i}: expected a 'segments' (with 'prompt') or a 'messages' field")
    return out


def recall_drills(tokenizer: Any, keys: Sequence[str], values: Sequence[str], n: int, seed: int = 0,
                  pairs: tuple[int, int] = (3, 6)) -> list[SFTExample]:
    """`n` associative-recall drills, "recall: k1 v1 k2 v2 k3 v3 | k3 v3 k1 v1 k2 v2", with the
    loss on the recalled values only. A small model copies a frequent token out of its context
    early in SFT but a rare one (a year read from a search result) much later; mixed into SFT,
    these drills teach it to look a value up by its key (the entity's name) and copy it."""
    if n < 0:
        raise ValueError(f"recall_drills: n must be >= 0, got {n}")
    lo, hi = pairs
    if not 1 <= lo <= hi or len(set(keys)) < hi:
        raise ValueError(f"recall_drills: need 1 <= pairs[0] <= pairs[1] <= number of distinct keys "
                         f"({len(set(keys))}), got pairs={pairs}")
    if n and not values:
        raise ValueError("recall_drills: values is empty")
    keys = sorted(set(keys))
    rng = random.Random(f"aepo-recall:{seed}")

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    out = []
    for _ in range(n):
        ks = rng.sample(keys, rng.randint(lo, hi))
        vs = [rng.choice(values) for _ in ks]
        ids = enc("recall:")
        for k, v in zip(ks, vs):
            ids += enc(f" {k}") + enc(f" {v}")
        ids += enc(" |")
        mask = [0] * len(ids)
        for i in rng.sample(range(len(ks)), len(ks)):
            k, v = enc(f" {ks[i]}"), enc(f" {vs[i]}")
            ids += k + v
            mask += [0] * len(k) + [1] * len(v)
        out.append(SFTExample(ids, mask))
    return out


def _collate(examples: Sequence[SFTExample], pad_id: int, max_len: int) -> tuple[torch.Tensor, ...]:
    length = min(max(len(e.input_ids) for e in examples), max_len)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros((len(examples), length), dtype=torch.float)
    for i, e in enumerate(examples):
        n = min(len(e.input_ids), length)
        ids[i, :n] = torch.tensor(e.input_ids[:n])
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(e.loss_mask[:n], dtype=torch.float)
    return ids, attn, mask


def _length_bucketed_batches(examples: Sequence[SFTExample], batch_size: int,
                             rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length examples (less padding), in shuffled order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    pool = batch_size * 16
    batches = []
    for s in range(0, len(order), pool):
        chunk = sorted(order[s : s + pool], key=lambda j: len(examples[j].input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sft_loss(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over the masked-in target tokens (logits computed only there)."""
    target = mask[:, 1:].bool()
    logits = selected_logits(model, ids, attn, target)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, ids[:, 1:][target])


def sft_train(model: torch.nn.Module, tokenizer: Any, examples: Sequence[SFTExample], cfg: SFTConfig, *,
              progress: bool = True) -> list[dict[str, float]]:
    """Train in place with AdamW and a warmup+cosine schedule; returns per-step loss records."""
    if not examples:
        raise ValueError("sft_train: no examples")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(i: int) -> float:
        if i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        p = (i - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    history = []
    step = 0
    t0 = time.time()
    with StepProgress(total, 0, enabled=progress, title="SFT") as bar:
        for _ in range(cfg.epochs):
            for idx in _length_bucketed_batches(examples, cfg.batch_size, rng):
                batch = [examples[j] for j in idx]
                ids, attn, mask = (x.to(device) for x in _collate(batch, pad, cfg.max_len))
                loss = sft_loss(model, ids, None, mask)  # right-padded rows
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                rec = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                       "seconds": time.time() - t0}
                history.append(rec)
                bar.advance({"loss": rec["loss"]})
    model.eval()
    return history
