"""A running decode batch for the torch sampler: rows join and leave at any step.

`TorchSampler.generate` runs a fixed set of rows until each stops, so an agent turn waits for
its longest row. `SlotBatch` instead keeps one batch running across turns, tools and tree
branches (the scheduler in `aepo.rollout.scheduler` drives it):

- each running row owns a *slot* of one cache [layers, slots, kv_heads, columns, head_dim]
  and its keys fill that slot's columns 0..len-1, so rows of any lengths share a decode step
  without padding each other's positions (a step attends to each row's own columns, masked);
- `start(row, budget, key)` queues a row; at the next `step` its cached chunks are copied into
  a slot and its pending tokens (a prompt, a tool result, a branch's fork point) run in the
  same forward as the other rows' decode tokens, and it samples its first token there: all of
  a step's tokens go through the projections and MLP as one packed sequence (the weights are
  read once a step), and attention runs per row over its own columns;
- `step()` gives every running row one token and returns the rows whose segment ended (stop
  string, EOS, budget). A row that ends *parks* in its slot: when it rejoins (after its tool
  result) it continues there; its new positions become one cache chunk, exactly as after
  `generate`, only when a fork or another reader needs them or another row needs the slot;
- a row's token is drawn from the uniform number `row_uniform(seed, key, position)`, so what
  a row samples does not depend on which rows ran beside it (`aepo.rollout.sampler.streams`).

Slots freed in the middle are refilled from the end (`_compact`), and the decode step runs over
the occupied prefix only, in ranges of slots that each attend up to their own longest row
(`decode_segments`; `_reorder` sorts the slots by length when that pays). The cache is one
tensor per layer and grows by a quarter, one layer at a time, and at most
`PREFILL_TOKEN_BUDGET` prefill tokens join a step, so a batch's peak memory stays near the
rows' keys and values (benchmarks/RESULTS.md, "Continuous batching", third round). With decode
graphs on (CUDA), a step in which no row joins replays as a CUDA graph over a bucket of slots,
and in a step with joining rows the layers' projections and MLPs replay as graphs, attention
eager (`aepo.rollout.sampler.slot_graphs`). Llama-family models only (the lean forward); others
use the turn scheduler.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from aepo.rollout.sampler.layout import (
    DECODE_BLOCK,
    PREFILL_TOKEN_BUDGET,
    chunk_length,
    put_chunks,
    take_spans,
    truncate_chunks,
)
from aepo.rollout.sampler.lean import LeanBatch, _write
from aepo.rollout.sampler.running import RunningBatch
from aepo.rollout.sampler.slot_graphs import SlotGraphs, bucket
from aepo.rollout.sampler.streams import stream_state, uniform_at
from aepo.types import Generation

if TYPE_CHECKING:
    from aepo.rollout.sampler.torch_sampler import TorchSampler

__all__ = ["SlotBatch"]


@dataclass
class _Running:
    """A row in the batch: its budget, random stream and the segment generated so far."""

    budget: int
    stream: int  # `stream_state` of (seed, key): its token at position j draws uniform_at(stream, j)
    slot: int = -1  # -1 until its prefill ran
    chunk_start: int = 0  # cache positions before this are in the row's chunks
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)


class SlotBatch(RunningBatch):
    """One running batch of a `TorchSampler`'s rows (see the module docstring)."""

    def __init__(self, sampler: TorchSampler, stop: Sequence[str], max_rows: int = 256) -> None:
        if not sampler.lean:
            raise ValueError("SlotBatch needs the lean (Llama-family) forward")
        super().__init__(max_rows)
        self.s = sampler
        self.spec = sampler._stop_spec(tuple(stop))
        model = sampler.model
        self.layers = int(model.config.num_hidden_layers)
        self.n_kv = int(model.config.num_key_value_heads)
        self.head_dim = int(model.model.layers[0].self_attn.head_dim)
        self.packed = sampler._packed_weights()
        # per layer: [slots, kv_heads, columns + 1, head_dim] (one tensor a layer, so growing
        # the cache copies one layer at a time)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lens: list[int] = []  # per slot: cached positions, -1 when free
        self.owner: list[int] = []  # per slot: the row handle (running or parked), -1 when free
        self.rows: dict[int, _Running]
        # rows that left (for a tool, or ended) and whose new positions are still only in their
        # slot: row -> (slot, first column not in its chunks); oldest first
        self.parked: dict[int, tuple[int, int]] = {}
        self.joining: list[int] = []
        self.decoder: LeanBatch | None = None
        # decode attention: (slot, column) cells up to the longest row, those read, and those
        # of the rows' own columns
        self.decode_cells = self.read_cells = self.used_cells = 0
        self.peak_cache_bytes = 0  # the largest the cache's keys and values were
        self._ordered_at = 0  # the step of the last `_reorder` check
        self.reorders = 0  # times the slots were sorted by length
        self.in_place = self.evicted = 0  # parked rows that rejoined in their slot / were evicted
        self.cache_version = 0  # bumped when the cache tensors are replaced (they grew)
        # decode steps without joining rows as CUDA graphs (`rollout.decode_graphs`; without
        # capture on a CPU, where the tests check the static step)
        self.graphs = SlotGraphs(self, capture=self.s.device.type == "cuda") if sampler.decode_graphs else None
        # the other steps' (joining rows) layers: their dense parts as graphs, attention eager;
        # the sampler's, kept across batches (the counters below are this batch's)
        self.layer_graphs = sampler.layer_graphs() if sampler.decode_graphs else None
        self._layer_counts = self._layer_graph_counts()

    # ---------------------------------------------------------------- rows in and out

    def start(self, row: int, budget: int, key: Sequence[int]) -> None:
        """Queue `row` to generate one segment of at most `budget` tokens from the next step."""
        state = self.s._row(row)
        if not self._accept(row, budget):
            return
        state.open = []
        self.rows[row] = _Running(budget=int(budget), stream=stream_state(self.s.seed, key))
        self.joining.append(row)

    def flush(self, row: int) -> None:
        """Move a running or parked row's new cache positions into its chunks (before a fork or
        another reader uses them); the row keeps its slot."""
        if row in self.parked:
            slot, start = self.parked[row]
            self.parked[row] = (slot, self._materialize(row, slot, start))
            return
        run = self.rows.get(row)
        if run is not None and run.slot >= 0:
            run.chunk_start = self._materialize(row, run.slot, run.chunk_start)

    def _materialize(self, row: int, slot: int, start: int) -> int:
        """Copy the slot's columns start..its length into one more chunk of `row`; -> the length."""
        end = self.lens[slot]
        if end > start:
            state = self.s._row(row)
            chunk = take_spans(self.keys, self.values, [(slot, start, end)])[0]
            state.chunks = truncate_chunks(state.chunks, start) + [chunk]
            state.n_cached = end
        return end

    def drop(self, row: int) -> None:
        """Forget a running or parked row without a result (its sampler row is being released)."""
        self.done = [(r, g) for r, g in self.done if r != row]
        parked = self.parked.pop(row, None)
        if parked is not None:
            self._free_slot(parked[0])
        run = self.rows.pop(row, None)
        if run is None:
            return
        if row in self.joining:
            self.joining.remove(row)
        if run.slot >= 0:
            self._free_slot(run.slot)

    def close(self) -> None:
        """Move every parked row's positions into its chunks and free the slots (the batch ends)."""
        for row in list(self.parked):
            self._evict(row)

    def _evict(self, row: int) -> int:
        """Free a parked row's slot, its positions moved into its chunks first; -> the slot."""
        slot, start = self.parked.pop(row)
        self._materialize(row, slot, start)
        self._free_slot(slot)
        self.evicted += 1
        return slot

    def _leave(self, row: int, finish: str, stop: str | None) -> Generation:
        """The row's segment, which ended with `finish`. The row parks in its slot: its new
        positions become a chunk only when something reads them or needs the slot, and a row
        that rejoins before that (after a tool) continues in place."""
        run = self.rows.pop(row)
        self.parked[row] = (run.slot, run.chunk_start)
        return Generation(token_ids=run.tokens, logprobs=run.logprobs, entropies=run.entropies,
                          finish=finish, stop=stop)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- the cache

    def _alloc(self, slots: int, columns: int) -> None:
        """At least `slots` slots and `columns` usable columns (plus the scratch column, the
        last, where free slots write during a decode step)."""
        have_slots = len(self.lens)
        have_cols = self.columns
        if slots <= have_slots and columns <= have_cols:
            return
        # slots and columns grow by a quarter (not doubling), one layer at a time: the cache
        # stays within 1.25x of the most rows and the longest row (plus a block of columns),
        # and growing holds one layer twice, not the whole cache
        new_slots = max(slots, min(self.max_rows, math.ceil(CACHE_GROWTH * have_slots)), 1) \
            if slots > have_slots else have_slots
        new_cols = max(columns, int(CACHE_GROWTH * have_cols)) if columns > have_cols else have_cols
        new_cols = -(-new_cols // DECODE_BLOCK) * DECODE_BLOCK
        shape = (new_slots, self.n_kv, new_cols + 1, self.head_dim)
        for cache in (self.keys, self.values):
            for layer in range(self.layers):
                grown = torch.zeros(shape, dtype=self.s.dtype, device=self.s.device)
                if len(cache) > layer:
                    grown[:have_slots, :, :have_cols] = cache[layer][:, :, :have_cols]
                    cache[layer] = grown
                else:
                    cache.append(grown)
        self.cache_version += 1
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)
        self.lens += [-1] * (new_slots - len(self.lens))
        self.owner += [-1] * (new_slots - len(self.owner))
        # the forward's modules and rope table (as long as the columns); the layers' caches are
        # this batch's, so it keeps only an empty tensor of their dtype and device
        like = torch.empty(0, dtype=self.s.dtype, device=self.s.device)
        self.decoder = LeanBatch(self.s.model, None, [like], [like], packed=self.packed, positions=new_cols + 1)

    def stats(self) -> dict[str, float]:
        """The peak cache in GiB, what happened to parked rows, how often the slots were sorted,
        the decode attention's (slot, column) cells (up to the longest row, read, and the rows'
        own), and the CUDA graphs: steps replayed whole, steps whose layers ran as graphs, and
        the graphs captured and the seconds that took."""
        return {"batch_cache_gib": self.peak_cache_bytes / 2**30, "rejoined_in_place": self.in_place,
                "parked_evicted": self.evicted, "slot_reorders": self.reorders,
                "attention_cells_padded": self.decode_cells, "attention_cells_read": self.read_cells,
                "attention_cells_used": self.used_cells,
                **self._graph_stats()}

    def _layer_graph_counts(self) -> tuple[int, int, float]:
        g = self.layer_graphs
        return (g.steps, g.captures, g.capture_s) if g is not None else (0, 0, 0.0)

    def _graph_stats(self) -> dict[str, float]:
        """This batch's CUDA-graph counters: whole steps, steps whose layers ran as graphs, and
        the graphs captured and the seconds that took (the sampler's layer graphs count from the
        batch's start)."""
        steps, captures, seconds = (now - then for now, then in zip(self._layer_graph_counts(), self._layer_counts))
        whole = self.graphs
        return {"graph_steps": whole.steps if whole else 0, "layer_graph_steps": steps,
                "graph_captures": captures + (whole.captures if whole else 0),
                "graph_capture_s": seconds + (whole.capture_s if whole else 0.0)}

    @property
    def columns(self) -> int:
        """The cache's usable columns per slot (the last one is the scratch column)."""
        return self.keys[0].shape[2] - 1 if self.keys else 0

    @property
    def cache_bytes(self) -> int:
        """The bytes the cache's keys and values take."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def _take_slot(self, columns: int) -> int:
        """A free slot (else the oldest parked row's, else a new one) with `columns` columns."""
        free = next((i for i, n in enumerate(self.lens) if n < 0), None)
        if free is None and self.parked:
            free = self._evict(next(iter(self.parked)))
        if free is None:
            free = len(self.lens)
        self._alloc(free + 1, columns + 1)
        return free

    def _free_slot(self, slot: int) -> None:
        self.lens[slot] = -1
        self.owner[slot] = -1

    def _move(self, moves: list[tuple[int, int]]) -> None:
        """Move slots (source, destination) at once, one layer's copy at a time; the rows (running
        or parked) follow their slots."""
        width = max(self.lens[src] for src, _ in moves)
        device = self.keys[0].device
        src = torch.tensor([a for a, _ in moves], device=device)
        dst = torch.tensor([b for _, b in moves], device=device)
        for cache in (self.keys, self.values):
            for layer in cache:
                layer[dst, :, :width] = layer[src, :, :width]
        placed = [(b, self.lens[a], self.owner[a]) for a, b in moves]
        for a, _ in moves:
            self._free_slot(a)
        for slot, n, row in placed:
            self.lens[slot], self.owner[slot] = n, row
            if row in self.parked:
                self.parked[row] = (slot, self.parked[row][1])
            else:
                self.rows[row].slot = slot

    def _compact(self) -> None:
        """Move the last occupied slots into the holes below them, so a decode step's prefix of
        slots is mostly occupied."""
        used = [i for i, n in enumerate(self.lens) if n >= 0]
        if not used:
            return
        top = used[-1] + 1
        holes = [i for i in range(top) if self.lens[i] < 0]
        if len(holes) <= max(2, top // 4):
            return
        sources = [i for i in reversed(used) if i > holes[0]]
        moves = [(a, b) for a, b in zip(sources, holes) if a > b]
        if moves:
            self._move(moves)

    def _reorder(self) -> None:
        """Sort the running rows' slots longest first (parked rows after them) when that would
        cut the decode's reads by more than twice the copy over the next REORDER_EVERY steps:
        slots of similar lengths then sit together, and `decode_segments` reads each range only
        up to its own longest row."""
        running = sorted((run.slot for run in self.rows.values() if run.slot >= 0), key=lambda i: -self.lens[i])
        if len(running) < 2:
            return
        order = running + [slot for slot, _ in self.parked.values()]
        top = max(running) + 1
        decoding = set(running)
        now = _cells([self.lens[i] + 1 if i in decoding else 1 for i in range(top)])
        after = _cells([self.lens[i] + 1 for i in running])
        if (now - after) * REORDER_EVERY <= 2 * after:
            return
        moves = [(a, b) for b, a in enumerate(order) if a != b]
        if moves:
            self.reorders += 1
            self._move(moves)

    # ---------------------------------------------------------------- one step

    def warm(self, rows: Sequence[int]) -> None:
        """Cache every token of `rows` (prompts that many rows will fork): one prefill here
        instead of one per fork, whose first step then feeds a single token."""
        todo = [h for h in rows if self.s._row(h).n_cached < len(self.s._row(h).ids)]
        if not todo:
            return
        s = self.s
        order = sorted(todo, key=lambda h: -self._pending(h))  # as `generate` orders a CPU prefill
        states = [s._rows[h] for h in order]
        cached = [st.n_cached for st in states]
        with torch.inference_mode():
            layout = s._layout(states, cached, 1)
            c, p = layout.cache_len, layout.pending_len
            batch = LeanBatch(s.model, layout, *s._gather_cache(states, cached, c + p, c), packed=self.packed)
            batch.prefill()
            spans = [(i, c + p - (len(st.ids) - n), c + p) for i, (st, n) in enumerate(zip(states, cached))]
            for st, n, chunk in zip(states, cached, batch.take(spans, free=True)):
                st.chunks = truncate_chunks(st.chunks, n) + [chunk]
                st.n_cached = len(st.ids)

    def step(self) -> list[tuple[int, Generation]]:
        """Give every running row one token; return (row, Generation) for the segments that
        ended (the rows leave the batch). Rows started with budget 0 are returned at once.
        Joining rows' pending tokens run in the same forward as the decode tokens (`_forward`)."""
        ended, self.done = self.done, []
        with torch.inference_mode():
            joining = self._admit()
            decoding = [r for r, run in self.rows.items() if run.slot >= 0]
            if joining:  # room for every joining row at once: one allocation, not one per row
                self._alloc(len(decoding) + len(joining), max(len(self.s._row(h).ids) for h in joining) + 2)
            joins = []
            for h in joining:
                self._place(h)
                if self._pending(h) == 1:  # one token to feed (e.g. a fork of a cached row): a decode row
                    decoding.append(h)
                else:
                    joins.append(h)
            joins.sort(key=lambda h: -self._pending(h))  # similar lengths share an attention call
            handles = decoding + joins
            if not handles:
                return ended
            logits = self._forward(decoding, joins)
            rows = [self.s._row(h) for h in handles]
            u = [uniform_at(self.rows[h].stream, len(r.ids)) for h, r in zip(handles, rows)]
            uniforms = torch.tensor(u, dtype=torch.float32, device=self.s.device)[:, None]
            tokens, token_logp, entropy = self.s._sample(logits, uniforms)
        self.steps += 1
        self.row_steps += len(handles)
        for h, state, token, lp, ent in zip(handles, rows, tokens.tolist(), token_logp.tolist(),
                                            entropy.tolist()):
            run = self.rows[h]
            state.ids.append(token)
            run.tokens.append(token)
            run.logprobs.append(lp)
            run.entropies.append(ent)
            reason = self.s._segment_finish(run.tokens, self.spec, run.budget)
            if reason is not None:
                ended.append((h, self._leave(h, *reason)))
        with torch.inference_mode():
            self._compact()
            if self.steps - self._ordered_at >= REORDER_EVERY:
                self._ordered_at = self.steps
                self._reorder()
        return ended

    def _forward(self, decoding: list[int], joins: list[int]) -> torch.Tensor:
        """One forward for the whole step: the decode rows' one token each and the joining rows'
        pending tokens, packed into one sequence for the projections and the MLP (the weights are
        read once a step), attention per row over its own slot columns. Each row writes its keys
        at its own next columns. Logits of each decode row, then of each joining row's last token.
        A step without joining rows runs as `decode_static` over a bucket of slots (`SlotGraphs`)
        when decode graphs are on."""
        device = self.s.device
        slot_row = {self.rows[h].slot: h for h in decoding}
        top = max(slot_row) + 1 if slot_row else 0
        kv_len = max((self.lens[slot] for slot in slot_row), default=0) + 1
        slots, graphed = top, False
        if self.graphs is not None and top > 0 and not joins:
            # a graph's bucket of slots (at most the cache's: growing the cache would drop the
            # graphs), from the bucket's GRAPH_AFTER_STEPS-th step on that cache
            graph_slots = min(bucket(top), len(self.lens))
            if kv_len <= self.columns and self.graphs.ready(graph_slots):
                slots, graphed = graph_slots, True
        # the decode part: one query per slot 0..slots-1 (a slot without a decode row computes a
        # throwaway query that reads column 0 and writes the scratch column)
        self._alloc(max(slots, 1), kv_len)
        lb = self.decoder
        assert lb is not None
        tokens, positions, cols, lengths = [], [], [], []
        for slot in range(slots):
            h = slot_row.get(slot)
            n = self.lens[slot] if h is not None else 0
            tokens.append(self.s._rows[h].ids[-1] if h is not None else 0)
            positions.append(n)
            cols.append(n if h is not None else self.columns)
            lengths.append(n + 1 if h is not None else 1)
        self.decode_cells += top * kv_len
        self.used_cells += sum(lengths[slot] for slot in slot_row)
        last = [self.rows[h].slot for h in decoding]
        if graphed:
            assert self.graphs is not None
            logits, window = self.graphs.step(torch.tensor([tokens, positions, cols, lengths]), kv_len)
            self.read_cells += slots * window
        else:
            logits = self._forward_eager(joins, tokens, positions, cols, lengths, kv_len, last)
        for h in decoding:
            self.lens[self.rows[h].slot] += 1
        return logits[torch.tensor(last, device=device)] if graphed else logits

    def _forward_eager(self, joins: list[int], tokens: list[int], positions: list[int], cols: list[int],
                       lengths: list[int], kv_len: int, last: list[int]) -> torch.Tensor:
        """`_forward` with the decode slots' inputs built: attention split into slot ranges
        (`decode_segments`) and the joining rows' pending tokens appended, in padded groups."""
        device = self.s.device
        lb = self.decoder
        top = len(tokens)
        spans = []  # per joining row: (slot, first column, tokens)
        for h in joins:
            run, ids = self.rows[h], self.s._rows[h].ids
            start = self.lens[run.slot]
            spans.append((run.slot, start, len(ids) - start))
            tokens += ids[start:]
            positions += range(start, len(ids))
        x = lb.embed(torch.tensor(tokens, device=device)[None])
        cos, sin = lb.rope(x, torch.tensor(positions, device=device)[None])
        segments, biases = [], []
        if top:
            valid = torch.arange(kv_len, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
            # slot ranges that each attend over their own longest row's columns only
            segments = decode_segments(lengths)
            self.read_cells += sum((b - a) * w for a, b, w in segments)
            biases = [lb.decode_bias(valid[a:b, None, None, :w]) for a, b, w in segments]
        groups = [_JoinGroup(spans[a:b], lb, device) for a, b in _join_groups([n for _, _, n in spans])]
        size = self.layer_graphs.ready(len(tokens)) if self.layer_graphs is not None else None
        x = self._layers(x.reshape(len(tokens), -1), cos, sin, torch.tensor(cols, device=device)[:, None],
                         segments, biases, groups, size)
        offset = top
        for _, _, n in spans:
            offset += n
            last.append(offset - 1)
        for (slot, start, n) in spans:
            self.lens[slot] = start + n
        return lb.head(x[torch.tensor(last, device=device)])

    def decode_static(self, inputs: torch.Tensor, window: int) -> torch.Tensor:
        """The decode step of slots 0..b-1 with shapes fixed by b and `window` alone: `inputs`
        [4, b] holds each slot's token, position, column to write and number of columns to
        attend over (all <= `window`). Logits [b, V]. Every input is a tensor refilled in
        place, so `SlotGraphs` replays one captured graph for any such step."""
        lb = self.decoder
        assert lb is not None
        tokens, positions, cols, lengths = inputs
        b = inputs.shape[1]
        x = lb.embed(tokens[None])
        cos, sin = lb.rope(x, positions[None])
        valid = torch.arange(window, device=inputs.device)[None] < lengths[:, None]
        bias = lb.decode_bias(valid[:, None, None])
        return lb.head(self._layers(x.reshape(b, -1), cos, sin, cols[:, None], [(0, b, window)], [bias], []))

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, col: torch.Tensor,
                segments: list[tuple[int, int, int]], biases: list[torch.Tensor],
                groups: list[_JoinGroup], size: int | None = None) -> torch.Tensor:
        """The layers over packed tokens x [T, hidden]: the first tokens are decode slots 0..top-1
        (top: the last segment's end), each writing its key at its column `col` [top, 1] and
        attending per segment (start, end, width) with its additive bias; then each join group's
        tokens. `size`: run the dense parts as `LayerGraphs` of that token bucket. -> hidden
        states [T, hidden]."""
        lb = self.decoder
        assert lb is not None
        top = segments[-1][1] if segments else 0

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer_keys, layer_values = self.keys[index], self.values[index]
            outs = []
            if top:  # each decode row writes its key at its own next column
                _write(layer_keys[:top], layer_values[:top], k[0, :top, :, None], v[0, :top, :, None], 0, col)
                for (a, b, w), bias in zip(segments, biases):
                    outs.append(lb.decode_attention(q[0, a:b], layer_keys[a:b, :, :w], layer_values[a:b, :, :w],
                                                    bias))
            offset = top
            for group in groups:
                outs.append(group.attend(lb, q[0], k[0], v[0], offset, layer_keys, layer_values))
                offset += group.tokens
            return torch.cat(outs) if len(outs) > 1 else outs[0]

        if size is not None:
            assert self.layer_graphs is not None
            return self.layer_graphs.run(size, lb, x, cos, sin, attend)
        for index, ops in enumerate(lb.ops):
            q, k, v = ops.qkv(x, 1, x.shape[0], cos, sin)  # [1, T, heads, hd]
            x = ops.mlp(ops.attn_out(x, attend(index, q, k, v)))
        return x

    def _pending(self, row: int) -> int:
        """Tokens of a row still to run: a placed or parked row's not in its slot yet, another's
        not in its chunks (at least its last)."""
        state = self.s._row(row)
        run = self.rows.get(row)
        if run is not None and run.slot >= 0:
            return len(state.ids) - self.lens[run.slot]
        if row in self.parked:
            return len(state.ids) - self.lens[self.parked[row][0]]
        return len(state.ids) - min(state.n_cached, len(state.ids) - 1)

    def _admit(self) -> list[int]:
        """The joining rows that enter this step: parked rows first (they continue in place),
        then in order while their pending tokens stay within PREFILL_TOKEN_BUDGET (a row with
        one token to feed costs a decode row; the first row always enters). The others join
        at a later step: a prefill of hundreds of rows at once would hold activations as large
        as the cache."""
        joining = sorted(self.joining, key=lambda h: h not in self.parked)
        self.joining, admitted, tokens = [], [], 0
        for h in joining:
            n = self._pending(h)
            if n > 1 and admitted and tokens + n > PREFILL_TOKEN_BUDGET:
                self.joining.append(h)
                continue
            admitted.append(h)
            tokens += n if n > 1 else 0
        return admitted

    def _place(self, row: int) -> None:
        """Give a joining row a slot with room for its pending tokens: its own, if it is parked
        there, else a free one its cached chunks are copied into. Pending tokens enter the slot
        at the next forward."""
        state = self.s._row(row)
        run = self.rows[row]
        if row in self.parked:
            slot, start = self.parked.pop(row)
            self._alloc(slot + 1, len(state.ids) + 1)
            run.slot, run.chunk_start = slot, start
            self.in_place += 1
            return
        cached = min(state.n_cached, len(state.ids) - 1)
        slot = self._take_slot(len(state.ids) + 1)
        placed, col = [], 0
        for chunk in truncate_chunks(state.chunks, cached):
            placed.append((slot, col, chunk))
            col += chunk_length(chunk)
        put_chunks(self.keys, self.values, placed)
        self.lens[slot], self.owner[slot] = cached, row
        run.slot, run.chunk_start = slot, cached


JOIN_PAD = 1.5  # joining rows share one attention call while padding stays under this factor
CACHE_GROWTH = 1.25  # the cache's slots and columns grow by this factor (columns rounded up to DECODE_BLOCK)
# decode attention is split where the slots after a point would read this many fewer
# (slot, column) cells: each range costs a few more kernels a layer
SEGMENT_MIN_SAVING = 4096
REORDER_EVERY = 16  # steps between checks whether sorting the slots by length pays


def decode_segments(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Contiguous slot ranges (start, end, width) of a decode step whose `lengths` (columns each
    slot attends over) are given in slot order: each range attends over its own widest slot's
    columns. A range is cut where the slots after it would read at least SEGMENT_MIN_SAVING
    fewer cells (at most their widest instead of the range's width so far)."""
    n = len(lengths)
    suffix = lengths[:]
    for i in range(n - 2, -1, -1):
        suffix[i] = max(suffix[i], suffix[i + 1])
    out, a, width = [], 0, 0
    for j in range(n):
        if j > a and (n - j) * (width - suffix[j]) >= SEGMENT_MIN_SAVING:
            out.append((a, j, width))
            a, width = j, 0
        width = max(width, lengths[j])
    if n:
        out.append((a, n, width))
    return out


def _cells(lengths: list[int]) -> int:
    """The (slot, column) cells a decode step over slots of these lengths reads."""
    return sum((b - a) * w for a, b, w in decode_segments(lengths))


def _join_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive ranges of the joining rows (`lengths`: their pending tokens, longest first)
    whose tokens padded to the range's longest stay within JOIN_PAD times the real ones."""
    out, a = [], 0
    while a < len(lengths):
        b, widest, total = a + 1, lengths[a], lengths[a]
        while b < len(lengths):
            w, t = max(widest, lengths[b]), total + lengths[b]
            if w * (b + 1 - a) > JOIN_PAD * t:
                break
            widest, total, b = w, t, b + 1
        out.append((a, b))
        a = b
    return out


class _JoinGroup:
    """Joining rows whose pending tokens run as one padded attention call: each row's tokens
    are written at its own next columns and attend causally over its own slot's columns."""

    def __init__(self, spans: list[tuple[int, int, int]], lb: LeanBatch, device: torch.device) -> None:
        self.spans = spans
        self.tokens = sum(n for _, _, n in spans)
        if len(spans) == 1:
            _, start, n = spans[0]
            c = torch.arange(start + n, device=device)[None] <= (start + torch.arange(n, device=device))[:, None]
            self.mask = lb.grouped_mask(c[None, None])
            return
        widest = max(n for _, _, n in spans)
        self.width = max(start + n for _, start, n in spans)
        self.slots = torch.tensor([slot for slot, _, _ in spans], device=device)
        self.write_slot = torch.tensor([slot for slot, _, n in spans for _ in range(n)], device=device)
        self.write_col = torch.tensor([start + i for _, start, n in spans for i in range(n)], device=device)
        # padded [rows, widest] queries from the packed tokens (a pad repeats the row's last token)
        pad, unpad, offset = [], [], 0
        for j, (_, _, n) in enumerate(spans):
            pad += [offset + min(i, n - 1) for i in range(widest)]
            unpad += [j * widest + i for i in range(n)]
            offset += n
        self.pad = torch.tensor(pad, device=device)
        self.unpad = torch.tensor(unpad, device=device)
        starts = torch.tensor([start for _, start, _ in spans], device=device)
        lengths = torch.tensor([n for _, _, n in spans], device=device)
        query_col = starts[:, None] + torch.minimum(torch.arange(widest, device=device)[None], lengths[:, None] - 1)
        c = torch.arange(self.width, device=device)[None, None] <= query_col[:, :, None]  # [rows, widest, width]
        self.mask = lb.grouped_mask(c[:, None])
        self.widest = widest

    def attend(self, lb: LeanBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
               keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Write the group's keys and values (packed tokens offset.. of k, v [T, kv_heads, hd])
        into its slots of one layer's cache and attend -> [tokens, heads * hd] in packed order."""
        end = offset + self.tokens
        if len(self.spans) == 1:
            slot, start, n = self.spans[0]
            keys[slot, :, start:start + n] = k[offset:end].transpose(0, 1)
            values[slot, :, start:start + n] = v[offset:end].transpose(0, 1)
            return lb.grouped_attention(q[None, offset:end], keys[slot:slot + 1, :, :start + n],
                                        values[slot:slot + 1, :, :start + n], self.mask)
        keys[self.write_slot, :, self.write_col] = k[offset:end]
        values[self.write_slot, :, self.write_col] = v[offset:end]
        rows = len(self.spans)
        queries = q[offset:end][self.pad].view(rows, self.widest, *q.shape[1:])
        out = lb.grouped_attention(queries, keys[:, :, :self.width].index_select(0, self.slots),
                                   values[:, :, :self.width].index_select(0, self.slots), self.mask)
        return out[self.unpad]
