"""CUDA graphs for the running batch's steps (`SlotBatch`, `rollout.scheduler=continuous`).

At real model sizes an eager GPU decode step is bound by kernel launches (`DecodeGraphs` in
`aepo.rollout.sampler.lean` says by how much). A step of the running batch in which no row
joins is a decode step over its slots 0..top-1, each attending to its own columns, so its
shapes depend on two numbers only. `SlotGraphs` replays such a step as one CUDA graph captured
for a *bucket* of slots (`bucket(top)`: at most 1.5x the slots, so a batch whose rows come and
go reuses a handful of graphs) and a *window* of columns (`bucket(longest, GRAPH_COLUMNS)`,
masked per slot). One graph is kept per slot bucket; it is captured again when its bucket
needs a wider window, and all are dropped when the cache is reallocated (it grew). A bucket
runs as a graph from its `GRAPH_AFTER_STEPS`-th step on the same cache: a capture costs a few
eager steps, and while rows join and the cache grows, a bucket often lasts fewer steps than
that. Its inputs are one static [4, bucket] tensor (each slot's token, position, column to
write and columns to attend over) refilled by one copy; the logits are the graph's output
buffer, valid until the next step. Sampling stays outside the graph.

A step in which rows join (their pending tokens run in the same forward) has shapes that
change every step in its attention only: `LayerGraphs` replays each layer's projections and MLP
as graphs per bucket of packed tokens and runs the attention eagerly between them.

`capture=False` runs the same static steps eagerly (any device: what the CPU tests check).
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aepo.rollout.sampler.capture import capture_graph, capture_or_warn
from aepo.rollout.sampler.lean import GRAPH_COLUMNS

if TYPE_CHECKING:
    from aepo.rollout.sampler.continuous import SlotBatch
    from aepo.rollout.sampler.lean import LeanBatch, _LayerOps

__all__ = ["LayerGraphs", "SlotGraphs", "bucket"]

GRAPH_AFTER_STEPS = 4  # a bucket's steps (on one cache, for SlotGraphs) before it runs as a graph


def bucket(n: int, unit: int = 1) -> int:
    """The smallest of unit x (1, 2, 3, 4, 6, 8, 12, 16, 24, ...) (powers of two and 1.5 times
    them) that is at least `n`: at most 1.5x `n` (for n > unit), in few distinct sizes."""
    if n < 1 or unit < 1:
        raise ValueError(f"bucket needs n >= 1 and unit >= 1, got n={n}, unit={unit}")
    p = 1
    while True:
        for size in (p, p + p // 2) if p >= 2 else (p,):
            if size * unit >= n:
                return size * unit
        p *= 2


@dataclass
class _Graph:
    """One slot bucket's static inputs [4, bucket] and, once captured, its graph and output."""

    window: int
    inputs: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None


class SlotGraphs:
    """A SlotBatch's decode steps replayed as CUDA graphs, one per slot bucket (module docstring)."""

    def __init__(self, batch: SlotBatch, capture: bool = True) -> None:
        self.batch = weakref.proxy(batch)  # the batch owns its graphs (no cycle)
        self.capture = capture
        self.graphs: dict[int, _Graph] = {}
        self.uses: dict[int, int] = {}  # slot bucket -> its steps on this cache
        self.version = -1  # the batch's cache_version the graphs were captured on
        self.steps = 0  # decode steps run through here
        self.captures = 0  # graphs captured
        self.capture_s = 0.0  # seconds spent capturing them (a capture costs a few eager steps)

    def ready(self, slots: int) -> bool:
        """Count a decode step of `slots` (a bucket) on the batch's current cache; True when it
        should run here: from the bucket's `GRAPH_AFTER_STEPS`-th step on that cache."""
        self._check_version()
        self.uses[slots] = self.uses.get(slots, 0) + 1
        return self.uses[slots] >= GRAPH_AFTER_STEPS

    def _check_version(self) -> None:
        if self.batch.cache_version != self.version:  # the cache tensors were replaced
            self.graphs.clear()
            self.uses.clear()
            self.version = self.batch.cache_version

    def step(self, inputs: torch.Tensor, longest: int) -> tuple[torch.Tensor, int]:
        """Run the decode step of `inputs` [4, slots] (host or device; `SlotBatch.decode_static`)
        whose longest slot attends over `longest` columns -> (logits [slots, V], the window of
        columns it attended over)."""
        batch = self.batch
        self._check_version()
        slots = inputs.shape[1]
        window = min(bucket(longest, GRAPH_COLUMNS), batch.columns)
        g = self.graphs.get(slots)
        if g is None or g.window < window:
            self.graphs.pop(slots, None)  # frees the old graph before the new one is captured
            g = self.graphs[slots] = _Graph(window, torch.empty(inputs.shape, dtype=torch.long,
                                                                  device=batch.keys[0].device))
        g.inputs.copy_(inputs)
        self.steps += 1

        def run() -> torch.Tensor:
            return batch.decode_static(g.inputs, g.window)

        if not self.capture:
            return run(), g.window
        if g.graph is None:
            began = time.perf_counter()
            captured = capture_or_warn(lambda: capture_graph(run, g.inputs.device),
                                       "the running batch's decode step")
            if captured is None:
                self.capture = False
                self.graphs.clear()
                return run(), g.window
            g.graph, g.out = captured
            self.captures += 1
            self.capture_s += time.perf_counter() - began
            return g.out, g.window  # the capture's checked replay ran this step
        g.graph.replay()
        return g.out, g.window


PIECE_TOKENS = 512  # steps of at most this many packed tokens run their layers' dense parts as graphs


class _Pieces:
    """One token bucket's static inputs (hidden states, cos/sin, the attention output) and its
    pieces: per piece, the captured graph (None until captured) and its outputs."""

    def __init__(self, tokens: int, lb: LeanBatch) -> None:
        like = lb.embed.weight
        self.tokens = tokens
        self.x = torch.zeros(tokens, like.shape[1], dtype=like.dtype, device=like.device)
        cos, sin = lb.rope(self.x[None], torch.zeros(1, tokens, dtype=torch.long, device=like.device))
        self.cos, self.sin = torch.zeros_like(cos), torch.zeros_like(sin)
        self.attn = torch.zeros(tokens, lb.n_heads * lb.head_dim, dtype=like.dtype, device=like.device)
        self.graphs: list[torch.cuda.CUDAGraph | None] = []
        self.outs: list[tuple[torch.Tensor, ...]] = []


class LayerGraphs:
    """The dense part of a step with any rows (joining rows' prefill included) as CUDA graphs,
    attention left eager: for a bucket of packed tokens (`bucket(tokens, 8)`, up to
    `PIECE_TOKENS`), piece 0 is layer 0's projections, piece l its attention output and MLP of
    layer l-1 and the projections of layer l, the last piece the last layer's output and MLP.
    Between pieces the caller's `attend(layer, q, k, v)` writes the keys and values into the
    cache and attends (ragged rows, join groups: shapes that change every step). The pieces
    read no cache, only the weights, so they outlive a running batch (`TorchSampler.layer_graphs`,
    shared by a backend's samplers while the weights stay where they are): a bucket is captured
    once (from its `GRAPH_AFTER_STEPS`-th step) into one memory pool and replayed in the order
    captured. `capture=False` runs the same pieces eagerly on the static tensors (the CPU tests)."""

    def __init__(self, capture: bool = True) -> None:
        self.capture = capture
        self.buckets: dict[int, _Pieces] = {}
        self.uses: dict[int, int] = {}
        self.steps = 0  # steps whose layers ran through here
        self.captures = 0  # pieces captured
        self.capture_s = 0.0

    def ready(self, tokens: int) -> int | None:
        """Count a step of `tokens` packed tokens; -> its bucket when the step should run here
        (from the bucket's GRAPH_AFTER_STEPS-th step; never above PIECE_TOKENS), else None."""
        size = bucket(tokens, 8)
        if size > PIECE_TOKENS:
            return None
        self.uses[size] = self.uses.get(size, 0) + 1
        return size if self.uses[size] >= GRAPH_AFTER_STEPS else None

    @staticmethod
    def _piece(index: int, pieces: _Pieces, ops: list[_LayerOps]) -> tuple[torch.Tensor, ...]:
        """Piece `index` on the static tensors: layer index-1's attention output and MLP (from
        the previous piece's hidden states and `pieces.attn`), then layer index's q, k, v."""
        if index == 0:
            x = pieces.x
        else:
            last = ops[index - 1]
            x = last.mlp(last.attn_out(pieces.outs[index - 1][0], pieces.attn))
        if index == len(ops):
            return (x,)
        return (x, *ops[index].qkv(x, 1, pieces.tokens, pieces.cos, pieces.sin))

    def run(self, size: int, lb: LeanBatch, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The layers of `lb` (the batch's forward) over packed tokens x [T, hidden] (rope
        cos/sin [1, T, 1, hd]) in bucket `size` >= T; `attend(layer, q, k, v)` (each [1, T,
        heads, hd]) -> the attention output [T, heads * hd]. -> hidden states [T, hidden] after
        the last layer."""
        pieces = self.buckets.get(size)
        if pieces is None:
            pieces = self.buckets[size] = _Pieces(size, lb)
        n = x.shape[0]
        pieces.x[:n] = x
        pieces.cos[:, :n], pieces.sin[:, :n] = cos, sin
        self.steps += 1
        layers = len(lb.ops)
        if self.capture and not pieces.graphs:
            self._capture(pieces, lb.ops)
        for index in range(layers + 1):
            if pieces.graphs:
                pieces.graphs[index].replay()
                out = pieces.outs[index]
            else:  # uncaptured: the same pieces eagerly
                out = self._piece(index, pieces, lb.ops)
                if len(pieces.outs) <= index:
                    pieces.outs.append(out)
                else:
                    pieces.outs[index] = out
            if index < layers:
                _, q, k, v = out
                pieces.attn[:n] = attend(index, q[:, :n], k[:, :n], v[:, :n])
        return pieces.outs[layers][0][:n]

    def _capture(self, pieces: _Pieces, ops: list[_LayerOps]) -> None:
        """Capture every piece of a bucket, in order, into one pool (they read only static
        tensors and earlier pieces' outputs); a failure leaves them eager."""
        began = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        layers = len(ops)

        def capture_all() -> bool:
            for index in range(layers + 1):  # piece i reads piece i-1's output: captured in order
                graph, out = capture_graph(lambda i=index: self._piece(i, pieces, ops), pieces.x.device, pool)
                pieces.graphs.append(graph)
                pieces.outs.append(out)
            return True

        if capture_or_warn(capture_all, "the running batch's layers") is None:
            self.capture = False
            pieces.graphs, pieces.outs = [], []
            return
        self.captures += layers + 1
        self.capture_s += time.perf_counter() - began
