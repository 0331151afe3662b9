"""From trajectories to training tensors, and the policy forward that scores them.

Positions are "next-token" aligned: column j of every [B, L-1] tensor is about token j+1 of
the row, predicted by the logits at position j. `loss_mask` is 1 exactly on the tokens the
policy generated (never the prompt, never tool results).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from aepo.train import vocab_head
from aepo.types import Trajectory


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L-1] float, 1 on policy-generated tokens
    old_log_prob: torch.Tensor  # [B, L-1] from the rollout policy
    rollout_entropy: torch.Tensor  # [B, L-1] the sampler's (the aepo advantage uses the update's own)
    advantages: torch.Tensor | None = None  # [B, L-1]
    ref_log_prob: torch.Tensor | None = None  # [B, L-1]
    # [B, L-1] long: turn index of each response token (how many tool results precede it in
    # its row: 0 before the first, 1 after it, ...); -1 on prompt and padding columns
    turn_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | Sequence[int]) -> TokenBatch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = None if v is None else v[idx.to(v.device)]
        out = TokenBatch(**kw)
        return out.trim()

    def trim(self) -> TokenBatch:
        """Drop trailing columns that are padding in every row (saves compute on micro-batches)."""
        length = int(self.attention_mask.sum(-1).max().item()) if len(self) else 1
        length = max(length, 2)
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                kw[f.name] = None
            elif f.name in ("input_ids", "attention_mask"):
                kw[f.name] = v[:, :length]
            else:
                kw[f.name] = v[:, : length - 1]
        return TokenBatch(**kw)

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                             for f in fields(self)})


def response_turn_ids(traj: Trajectory) -> list[int]:
    """Turn index of each response token of `traj`: the number of tool-result segments
    (role "tool" in `traj.segments`) that end at or before it. 0 before the first tool
    result, 1 after it, ...; a token inside a tool result counts the results before that one."""
    ends = sorted(s.end for s in traj.segments if s.role == "tool")
    out, k = [], 0
    for pos in range(len(traj.response_ids)):
        while k < len(ends) and ends[k] <= pos:
            k += 1
        out.append(k)
    return out


def collate(trajectories: Sequence[Trajectory], pad_id: int) -> TokenBatch:
    """Right-pad prompt+response of every row into one batch (with per-token turn ids)."""
    if not trajectories:
        raise ValueError("collate: no trajectories")
    seqs = [list(t.prompt_ids) + list(t.response_ids) for t in trajectories]
    length = max(len(s) for s in seqs)
    length = max(length, 2)
    b = len(seqs)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length - 1))
    old = torch.zeros((b, length - 1))
    ent = torch.zeros((b, length - 1))
    turns = torch.full((b, length - 1), -1, dtype=torch.long)
    for i, (t, s) in enumerate(zip(trajectories, seqs)):
        n = len(s)
        ids[i, :n] = torch.tensor(s, dtype=torch.long)
        attn[i, :n] = 1
        p, r = len(t.prompt_ids), len(t.response_ids)
        if not (len(t.response_mask) == len(t.logprobs) == len(t.entropies) == r):
            raise ValueError(
                f"trajectory {t.prompt_id}/{t.row_id}: response_ids ({r}), response_mask "
                f"({len(t.response_mask)}), logprobs ({len(t.logprobs)}) and entropies "
                f"({len(t.entropies)}) must have the same length"
            )
        if r:
            mask[i, p - 1 : p - 1 + r] = torch.tensor(t.response_mask, dtype=torch.float)
            old[i, p - 1 : p - 1 + r] = torch.tensor(t.logprobs, dtype=torch.float)
            ent[i, p - 1 : p - 1 + r] = torch.tensor(t.entropies, dtype=torch.float)
            turns[i, p - 1 : p - 1 + r] = torch.tensor(response_turn_ids(t), dtype=torch.long)
    return TokenBatch(ids, attn, mask, old, ent, turn_ids=turns)


def tree_links(trajs: Sequence[Trajectory]) -> tuple[list[int], list[int]]:
    """For `algos.hard_attribution` on a collated batch of `trajs`: per row, the batch index of
    its parent (-1 for a root) and the column where it left the parent (prompt length - 1 +
    branch_position, since column j of the batch scores token j + 1; 0 for a root).

    The parent is the row of the same prompt whose row_id is `parent_row_id`. A row whose
    parent is not in the batch is treated as a root (its copied prefix is then trained once per
    such row, as with soft attribution). A row whose response does not start with its parent's
    first branch_position tokens is a data error (ValueError)."""
    index = {(t.prompt_id, t.row_id): i for i, t in enumerate(trajs)}
    if len(index) != len(trajs):
        raise ValueError("tree_links: (prompt_id, row_id) must be unique within the batch")
    parent, position = [], []
    for t in trajs:
        j = None if t.parent_row_id is None or t.branch_position is None else index.get(
            (t.prompt_id, t.parent_row_id))
        if j is None:
            parent.append(-1)
            position.append(0)
            continue
        bp, par = t.branch_position, trajs[j]
        if (list(par.prompt_ids) != list(t.prompt_ids) or bp > len(par.response_ids)
                or list(par.response_ids[:bp]) != list(t.response_ids[:bp])):
            raise ValueError(f"row {t.prompt_id}/{t.row_id}: its first {bp} response tokens are not "
                             f"those of its parent row {t.parent_row_id}")
        parent.append(j)
        position.append(len(t.prompt_ids) - 1 + bp)
    return parent, position


# Architectures whose logits are exactly `lm_head(last hidden state)`: for these the head (the
# largest matmul of a small model) runs only at the positions a loss reads, which in agent
# trajectories are a minority (prompts and tool results are never scored).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})


def plain_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when its logits are exactly `head(last hidden state)` (a plain-head
    architecture with a bias-free linear head), else None."""
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    head = model.get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) and head.bias is None else None


def selected_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, select: torch.Tensor,
    temperature: float = 1.0, with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_{j+1} | <= j) and (with `with_entropy`) the entropy of softmax(logits_j / T),
    float32 [N], at the positions j where `select[:, j]` ([B, L-1]) is set, in row-major order.

    For plain-head models the head runs only at those positions; when their logits would exceed
    `vocab_head.default_chunk_elements` (large vocabularies) it runs in row chunks without [N, V]
    activations (`aepo.train.vocab_head`; below that the direct computation is faster). Rows here
    are right-padded, so under causal attention no real token sees a pad: `attention_mask=None`
    gives the same values, faster. A LoRA-wrapped model runs as its base module, whose layers
    hold the adapters (`aepo.models.lora.policy_module`)."""
    from aepo.models.lora import policy_module

    model = policy_module(model)
    sel = select.bool()
    targets = input_ids[:, 1:][sel]
    head = plain_head(model)
    if head is not None:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state[:, :-1][sel]
        if hidden.shape[0] * head.weight.shape[0] > vocab_head.default_chunk_elements(hidden.device):
            lp, h = vocab_head.head_logprobs_and_entropy(hidden, head.weight, targets, temperature)
            return lp, (h if with_entropy else None)
        logits = head(hidden).float()
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][sel].float()
    logp_all = F.log_softmax(logits / temperature, dim=-1)
    lp = logp_all.gather(-1, targets[:, None])[:, 0]
    return lp, (-(logp_all.exp() * logp_all).sum(-1) if with_entropy else None)


# A forward pass costs about as much as this many more padded tokens (kernel launches, the
# per-layer Python of the model): `length_chunks` weighs it against padding.
CHUNK_OVERHEAD_TOKENS = 512


def length_chunks(lengths: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Split rows into groups run as separate forward passes, minimising the padded tokens
    (rows x longest row, per group) plus `overhead` (default CHUNK_OVERHEAD_TOKENS) per group:
    rows sorted by length, cut where it pays (exact, by dynamic programming over the sorted
    order). Rows of length 0 are left out. A batch of equal lengths stays one group."""
    overhead = CHUNK_OVERHEAD_TOKENS if overhead is None else overhead
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i])
    if not order:
        return []
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            c = best[i] + (j - i) * longest + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def token_logprobs_and_entropy(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    temperature: float = 1.0, with_entropy: bool = True, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_{j+1} | <= j) and the entropy H_j of softmax(logits_j / T), both [B, L-1],
    float32. With `mask` ([B, L-1]) only its positions are computed; the rest are 0.

    With `mask` and no `attention_mask` (right-padded rows), each row is cut after its last
    masked position (later tokens cannot change earlier logits under causal attention) and the
    rows run in length-sorted groups (`length_chunks`): agent rows differ in length several-fold,
    and one padded [B, L] pass spends most of its time on padding. The values and gradients are
    those of the single padded pass. A LoRA-wrapped model runs as its base module with the
    adapters in its layers (`aepo.models.lora.policy_module`)."""
    from aepo.models.lora import policy_module

    model = policy_module(model)
    if mask is None or attention_mask is not None:
        select = torch.ones_like(input_ids[:, 1:], dtype=torch.bool) if mask is None else mask.bool()
        return _scored(model, input_ids, attention_mask, select, temperature, with_entropy)
    select = mask.bool()
    cols = torch.arange(1, select.shape[1] + 1, device=select.device)
    need = (select * cols).amax(-1) + 1  # tokens a row needs: up to its last scored target
    need = torch.where(select.any(-1), need, torch.zeros_like(need)).tolist()
    logp = torch.zeros(select.shape, dtype=torch.float, device=input_ids.device)
    entropy = torch.zeros_like(logp) if with_entropy else None
    rows, positions, lps, ents = [], [], [], []
    for group in length_chunks(need):
        idx = torch.tensor(group, device=input_ids.device)
        length = max(need[i] for i in group)
        sel = select[idx, : length - 1]
        lp, h = selected_logprobs(model, input_ids[idx, :length], None, sel, temperature, with_entropy)
        r, c = sel.nonzero(as_tuple=True)  # the row-major order of selected_logprobs' values
        rows.append(idx[r])
        positions.append(c)
        lps.append(lp)
        if with_entropy:
            ents.append(h)
    if not rows:
        return logp, entropy
    where = (torch.cat(rows), torch.cat(positions))
    logp = logp.index_put(where, torch.cat(lps))
    if with_entropy:
        entropy = entropy.index_put(where, torch.cat(ents))
    return logp, entropy


def _scored(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            select: torch.Tensor, temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs_and_entropy` in one forward pass over the padded batch."""
    lp, h = selected_logprobs(model, input_ids, attention_mask, select, temperature, with_entropy)
    logp = torch.zeros(select.shape, dtype=torch.float, device=input_ids.device)
    logp[select] = lp
    entropy = None
    if with_entropy:
        entropy = torch.zeros_like(logp)
        entropy[select] = h
    return logp, entropy


def score_tokens(model: torch.nn.Module, batch: TokenBatch, micro: int, temperature: float, device: torch.device,
                 *, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) of every response token of `batch` under `model`, and with `with_entropy`
    the token entropies H_t, in micro-batches of `micro` rows without grad (the split changes no
    value); on the CPU, shaped like `batch.old_log_prob`."""
    out = torch.zeros_like(batch.old_log_prob)
    ent_out = torch.zeros_like(batch.old_log_prob) if with_entropy else None
    with torch.no_grad():
        for s in range(0, len(batch), micro):
            ids = batch.input_ids[s : s + micro].to(device)
            mask = batch.loss_mask[s : s + micro]
            lp, ent = token_logprobs_and_entropy(  # rows are right-padded: no attention mask needed
                model, ids, None, temperature, with_entropy=with_entropy, mask=mask.to(device))
            out[s : s + micro] = lp.float().cpu()
            if ent_out is not None and ent is not None:
                ent_out[s : s + micro] = ent.float().cpu()
    return out, ent_out
