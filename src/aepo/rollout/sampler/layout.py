"""The KV cache's layout in a batch: chunks, the column layout, the prefill mask.

A row's cache is a list of immutable chunks, each (keys, values) shaped
[layers, kv_heads, n, head_dim]. A batch lays its rows out in columns
[cache C | pending P | decode T-1], left-padded, with a 2-D key mask for the pads.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Chunk = tuple[torch.Tensor, torch.Tensor]  # keys, values: [layers, kv_heads, n, head_dim]

PREFILL_SCORE_BUDGET = 1 << 24  # query x key x head-group elements per prefill sub-batch
PREFILL_TOKEN_BUDGET = 8192  # tokens per prefill sub-batch (bounds MLP activations)
DECODE_BLOCK = 128  # decode columns allocated at a time
# What one more prefill pass costs (its kernel launches), in padded tokens: `padded_ranges`
# cuts a generate call's prefill into passes of similar pending lengths.
PREFILL_PASS_OVERHEAD_TOKENS = 128


def truncate_chunks(chunks: list[Chunk], n: int) -> list[Chunk]:
    """The chunks covering the first `n` cached positions (a partial chunk becomes a view)."""
    kept: list[Chunk] = []
    remaining = n
    for keys, values in chunks:
        if remaining <= 0:
            break
        size = keys.shape[2]
        if size <= remaining:
            kept.append((keys, values))
        else:
            kept.append((keys[:, :, :remaining], values[:, :, :remaining]))
        remaining -= min(size, remaining)
    return kept


@dataclass
class Layout:
    """Column layout of one batch: [cache C | pending P | decode T-1]."""

    cache_len: int  # C
    pending_len: int  # P
    total_len: int  # S
    key_valid: torch.Tensor  # [B, S] bool
    pending_tokens: torch.Tensor  # [B, P] long, left-padded
    pending_positions: torch.Tensor  # [B, P] long
    next_positions: torch.Tensor  # [B] long: position of the first decoded token fed


def prefill_mask(layout: Layout, rows: slice) -> torch.Tensor:
    """[b, 1, P, C+P] bool: key valid and causal; a pad query also sees itself (no empty row)."""
    c, p = layout.cache_len, layout.pending_len
    device = layout.key_valid.device
    cols = torch.arange(c + p, device=device)
    query_cols = c + torch.arange(p, device=device)
    causal = cols[None, :] <= query_cols[:, None]  # [P, C+P]
    diagonal = cols[None, :] == query_cols[:, None]
    valid = layout.key_valid[rows, : c + p]
    return ((valid[:, None, :] & causal[None]) | diagonal[None])[:, None]


def padded_ranges(lengths: Sequence[int], overhead: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [r0, r1) for rows sorted by length, longest first, each run as
    one pass padded to its first row's length: an exact dynamic program over the runs of
    equal lengths minimising the padded cells (rows x longest) plus `overhead` per range.
    Rows out of order get one range."""
    n = len(lengths)
    if n == 0:
        return []
    if any(a < b for a, b in itertools.pairwise(lengths)):
        return [(0, n)]
    bounds = [0] + [i for i in range(1, n) if lengths[i] != lengths[i - 1]] + [n]
    runs = len(bounds) - 1
    best = [0.0] + [float("inf")] * runs
    cut = [0] * (runs + 1)
    for j in range(1, runs + 1):
        for i in range(j):
            cost = best[i] + (bounds[j] - bounds[i]) * lengths[bounds[i]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ranges, j = [], runs
    while j > 0:
        ranges.append((bounds[cut[j]], bounds[j]))
        j = cut[j]
    return ranges[::-1]
