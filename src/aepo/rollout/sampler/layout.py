"""The KV cache's layout in a batch: chunks, the column layout, the prefill mask.

A row's cache is a list of immutable chunks, each (keys, values), per layer a tensor
[kv_heads, n, head_dim] (often a view of a larger tensor the chunks of a batch share). A batch lays its rows out in columns
[cache C | pending P | decode T-1], left-padded, with a 2-D key mask for the pads.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# keys, values: per layer [kv_heads, n, head_dim]
Chunk = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]

PREFILL_SCORE_BUDGET = 1 << 24  # query x key x head-group elements per prefill sub-batch
PREFILL_TOKEN_BUDGET = 8192  # tokens per prefill sub-batch (bounds MLP activations)
DECODE_BLOCK = 128  # decode columns allocated at a time
# What one more prefill pass costs (its kernel launches), in padded tokens: `padded_ranges`
# cuts a generate call's prefill into passes of similar pending lengths.
PREFILL_PASS_OVERHEAD_TOKENS = 128


def chunk_length(chunk: Chunk) -> int:
    """The positions a chunk holds."""
    return int(chunk[0][0].shape[1])


def truncate_chunks(chunks: list[Chunk], n: int) -> list[Chunk]:
    """The chunks covering the first `n` cached positions (a partial chunk becomes a view)."""
    kept: list[Chunk] = []
    remaining = n
    for keys, values in chunks:
        if remaining <= 0:
            break
        size = chunk_length((keys, values))
        if size <= remaining:
            kept.append((keys, values))
        else:
            kept.append((tuple(k[:, :remaining] for k in keys), tuple(v[:, :remaining] for v in values)))
        remaining -= min(size, remaining)
    return kept


def _span_index(spans: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (slot, column) index pairs of (slot, start, end) spans, in order, on `device`."""
    slots = torch.tensor([slot for slot, a, b in spans for _ in range(b - a)], dtype=torch.long)
    cols = torch.tensor([c for _, a, b in spans for c in range(a, b)], dtype=torch.long)
    return slots.to(device), cols.to(device)


def take_spans(keys: list[torch.Tensor], values: list[torch.Tensor], spans: list[tuple[int, int, int]],
               free: bool = False) -> list[Chunk]:
    """Chunks of (slot, start, end) column spans of a per-layer cache [B, kv_heads, S, head_dim]:
    each layer's spans are gathered into one packed tensor (one copy a layer, whatever the rows),
    of which each chunk holds a view. `free`: drop each layer from `keys`/`values` once copied."""
    if not spans:
        return []
    slot_index, col_index = _span_index(spans, keys[0].device)
    bounds = [0]
    for _, a, b in spans:
        bounds.append(bounds[-1] + b - a)
    parts: tuple[list, list] = ([], [])
    for cache, out in zip((keys, values), parts):
        for index in range(len(cache)):
            packed = cache[index][slot_index, :, col_index]  # [total, kv_heads, head_dim]
            out.append([packed[bounds[j]:bounds[j + 1]].transpose(0, 1) for j in range(len(spans))])
            if free:
                cache[index] = cache[index].new_empty(0)
    return [(tuple(layer[j] for layer in parts[0]), tuple(layer[j] for layer in parts[1]))
            for j in range(len(spans))]


def put_chunks(keys: list[torch.Tensor], values: list[torch.Tensor],
               placed: list[tuple[int, int, Chunk]]) -> None:
    """Copy chunks into a per-layer cache [B, kv_heads, S, head_dim]: each (slot, first column,
    chunk) fills that slot's columns from there. One copy a layer, whatever the rows and chunks
    (the inverse of `take_spans`)."""
    if not placed:
        return
    slot_index, col_index = _span_index([(slot, col, col + chunk_length(c)) for slot, col, c in placed],
                                        keys[0].device)
    for side, cache in enumerate((keys, values)):
        for index, layer in enumerate(cache):
            parts = [chunk[side][index] for _, _, chunk in placed]
            layer[slot_index, :, col_index] = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).transpose(0, 1)


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
