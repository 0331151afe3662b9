"""Supervised cold start on tool-use demonstrations.

A demonstration is a prompt plus segments: ("model", text) written by the agent and
("tool", text) returned by a tool. Tool results are wrapped exactly as at rollout time
(the run's tool format, `aepo.formats`) and masked out of the loss: the model learns to call tools and use their
results, never to predict them.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aepo.config import SFTConfig
from aepo.console import StepProgress
from aepo.data.prompting import encode_prompt
from aepo.formats import get_format
from aepo.train.batch import selected_logprobs

SORT_POOL_BATCHES = 16  # batches' worth of examples sorted by length together (`_length_bucketed_batches`)


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the model must learn to write


def encode_demonstration(prompt: str | list[int], segments: Sequence[tuple[str, str]], tokenizer: Any,
                         *, chat_template: bool = False, eos: bool = False, tools: Sequence[str] | None = None,
                         max_tool_calls: int = 6, tool_format: str = "tags") -> SFTExample:
    """Token ids and loss mask of one demonstration (prompt and tool results masked) in
    `tool_format` (`aepo.formats`): model text written in the tags format is rewritten into it
    (`demo_segments`), and each tool result is encoded as a rollout appends it (`result_text`); a
    text prompt is built as RL and evaluation build it (`encode_prompt` with `tools`,
    `max_tool_calls`). A format whose turns end with the end-of-turn token (hermes) gets it."""
    fmt = get_format(tool_format)
    ids = list(prompt) if isinstance(prompt, list) else encode_prompt(
        prompt, tokenizer, chat_template=chat_template, tools=tools, max_tool_calls=max_tool_calls,
        tool_format=tool_format)
    mask = [0] * len(ids)
    for role, text in fmt.demo_segments(segments):
        if role == "model":
            t = tokenizer.encode(text, add_special_tokens=False)
            ids += t
            mask += [1] * len(t)
        elif role == "tool":
            t = tokenizer.encode(fmt.result_text(tokenizer, text), add_special_tokens=False)
            ids += t
            mask += [0] * len(t)
        else:
            raise ValueError(f"segment role must be 'model' or 'tool', got {role!r}")
    if (eos or fmt.demo_ends_with_eos()) and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return SFTExample(ids, mask)


_SFT_FORMATS = ('rows are {"prompt", "segments": [[role, text], ...]}, {"messages": [{"role", "content"}, ...]} '
                'or token rows {"input_ids": [...], "loss_mask": [...]}')


def check_sft_rows(path: str | Path) -> list[tuple[int, dict]]:
    """Read and check SFT demonstrations without a tokenizer: (line number, row) per row.

    Raises FileNotFoundError for a missing file and ValueError naming `file:line` and the field
    for an empty file, a row without `segments`/`messages`, or a field of the wrong type."""
    from aepo.io import iter_jsonl

    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"demonstrations file {p} {what}; give a JSONL file ({_SFT_FORMATS})")
    rows = list(iter_jsonl(p))

    def bad(line: int, problem: str) -> ValueError:
        return ValueError(f"{p}:{line}: {problem}; fix the row ({_SFT_FORMATS})")

    if not rows:
        raise ValueError(f"{p}: no demonstrations (the file is empty); give one JSON object per line "
                         f"({_SFT_FORMATS})")
    for line, row in rows:
        if "segments" in row:
            if "prompt" not in row:
                raise bad(line, "row has 'segments' but no 'prompt' field")
            if not isinstance(row["prompt"], str):
                raise bad(line, f"field 'prompt' must be a string, got {type(row['prompt']).__name__}")
            segs = row["segments"]
            if not isinstance(segs, list) or not segs:
                raise bad(line, "field 'segments' must be a non-empty list of [role, text] pairs, got "
                                + (type(segs).__name__ if not isinstance(segs, list) else "an empty list"))
            for j, seg in enumerate(segs):
                if not (isinstance(seg, (list, tuple)) and len(seg) == 2):
                    raise bad(line, f"field 'segments[{j}]' must be a [role, text] pair, got {seg!r:.60}")
                role, text = seg
                if role not in ("model", "tool"):
                    raise bad(line, f"field 'segments[{j}]': segment role must be 'model' or 'tool', got {role!r}")
                if not isinstance(text, str):
                    raise bad(line, f"field 'segments[{j}]': text must be a string, got {type(text).__name__}")
            if not any(role == "model" for role, _ in segs):
                raise bad(line, "field 'segments' has no 'model' segment to learn from")
        elif "input_ids" in row:
            ids, mask = row["input_ids"], row.get("loss_mask")
            if not (isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0 for i in ids)):
                raise bad(line, "field 'input_ids' must be a non-empty list of token ids (ints >= 0)")
            if not (isinstance(mask, list) and len(mask) == len(ids) and all(m in (0, 1) for m in mask)):
                raise bad(line, "field 'loss_mask' must be a list of 0/1, one per input id")
            if not any(mask):
                raise bad(line, "field 'loss_mask' marks no token to learn")
        elif "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise bad(line, "field 'messages' must be a non-empty list of {role, content} objects")
            first = None
            for j, m in enumerate(msgs):
                if not isinstance(m, dict):
                    raise bad(line, f"field 'messages[{j}]' must be an object with 'role' and 'content', "
                                    f"got {type(m).__name__}")
                role = m.get("role")
                if role not in ("system", "user", "assistant", "tool"):
                    raise bad(line, f"field 'messages[{j}].role' must be system, user, assistant or tool, "
                                    f"got {role!r}")
                if not isinstance(m.get("content"), str):
                    raise bad(line, f"field 'messages[{j}].content' must be a string, got "
                                    f"{type(m.get('content')).__name__}")
                if first is None and role == "assistant":
                    first = j
                elif first is not None and role not in ("assistant", "tool"):
                    raise bad(line, f"field 'messages[{j}]': after the first assistant message only "
                                    f"assistant/tool messages are allowed, got {role!r}")
            if first is None:
                raise bad(line, "'messages' has no assistant message to learn from")
        else:
            raise bad(line, "expected a 'segments' (with 'prompt') or a 'messages' field, found "
                            + (", ".join(repr(k) for k in list(row)[:5]) or "an empty object"))
    return rows


def load_sft_jsonl(path: str | Path, tokenizer: Any, *, chat_template: bool = False,
                   tools: Sequence[str] | None = None, max_tool_calls: int = 6,
                   tool_format: str = "tags") -> list[SFTExample]:
    """Read demonstrations: rows {"prompt", "segments": [[role, text], ...]}, chat rows
    {"messages": [{"role": system|user|assistant|tool, "content"}]} (assistant = model, tool = tool),
    or token rows {"input_ids", "loss_mask"} made with this model's tokenizer (`aepo demo`
    writes its whole SFT set so: `sft_examples.jsonl`).
    A row's text prompt is built as RL and evaluation build it (`tools`, `max_tool_calls`).
    Every row is checked first (`check_sft_rows`): a bad one raises ValueError naming file:line."""
    out = []
    for _, row in check_sft_rows(path):
        if "input_ids" in row:  # already tokenized (by the model's own tokenizer), e.g. the demo's
            out.append(SFTExample(list(row["input_ids"]), list(row["loss_mask"])))
        elif "segments" in row:
            segs = [(str(r), str(t)) for r, t in row["segments"]]
            out.append(encode_demonstration(str(row["prompt"]), segs, tokenizer, chat_template=chat_template,
                                            tools=tools, max_tool_calls=max_tool_calls, tool_format=tool_format))
        else:
            msgs = row["messages"]
            first = next(j for j, m in enumerate(msgs) if m.get("role") == "assistant")
            ctx = msgs[:first]
            if chat_template:
                prompt_ids = tokenizer.apply_chat_template(ctx, add_generation_prompt=True, tokenize=True)
                if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
                    prompt_ids = prompt_ids["input_ids"]
                prompt: str | list[int] = list(prompt_ids)
            else:
                prompt = "\n".join(m["content"] for m in ctx if m.get("role") == "user")
            segs = [("model" if m["role"] == "assistant" else "tool", m["content"]) for m in msgs[first:]]
            out.append(encode_demonstration(prompt, segs, tokenizer, chat_template=chat_template,
                                            eos=chat_template, tool_format=tool_format))
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
    """Shuffled batches of similar-length examples, in shuffled order: each pool of
    `SORT_POOL_BATCHES` batches' worth of shuffled examples is sorted by length and cut into
    batches. On the demo's data pools of 16 pad 8.1%, of 50 2.7%; but larger pools make each
    batch one kind of demonstration (all short guesses, or all multi-hop), and the demo's SFT
    model came out at 6.8% held-out pass@1 with 50 against 12.4% with 16."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    pool = batch_size * SORT_POOL_BATCHES
    batches = []
    for s in range(0, len(order), pool):
        chunk = sorted(order[s : s + pool], key=lambda j: len(examples[j].input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sft_loss(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over the masked-in target tokens (the head computed only there)."""
    target = mask[:, 1:].bool()
    if not target.any():
        return sum(p.sum() for p in model.parameters()) * 0.0
    logp, _ = selected_logprobs(model, ids, attn, target, with_entropy=False)
    return -logp.mean()


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
    # a LoRA-wrapped model (actor.lora): only its adapters are trainable, and only they are updated
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)

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
                ids, _attn, mask = (x.to(device) for x in _collate(batch, pad, cfg.max_len))
                loss = sft_loss(model, ids, None, mask)  # right-padded rows
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                rec = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                       "seconds": time.time() - t0}
                history.append(rec)
                bar.advance({"loss": rec["loss"]})
    model.eval()
    return history
