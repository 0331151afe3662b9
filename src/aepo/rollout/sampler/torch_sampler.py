"""Batched, KV-cached sampler for HF causal LMs in plain torch (CPU or CUDA).

Implements `aepo.types.Sampler`. Each row keeps

- its token ids (prompt, generated and appended),
- its KV cache as a list of immutable *chunks*, each (keys, values) of consecutive positions,
  per layer a tensor [kv_heads, n, head_dim] (post-RoPE),
- how many of its tokens are in that cache; the rest are *pending* (appended tool results,
  and the last sampled token) and enter the cache at the next `generate` (one prefill).

`fork` copies the id list and shares the chunks (a partial chunk is a view), so a branch
never recomputes or copies its shared prefix; since chunks are never written in place,
sharing is safe. `generate` gathers the rows into one batch: caches left-padded to a common
length C, pending tokens left-padded to a common length P, then the decode columns; a 2-D
key mask marks the pads (holes in the middle are fine) and every row keeps its own positions.
After the call, each row gets one new chunk with the positions it filled. On CPU the lean path
orders a call's rows by pending length and prefills them in passes of similar lengths, each
cut to its own columns (`LeanBatch.prefill`): after a tool turn, rows' pending tokens differ
several-fold, and one padded pass spent about a third of its time on padding.

Three forward paths compute the same thing (the tests check each against a plain HF forward):

- the *lean* path, for the Llama family (Llama, Qwen2, Qwen3: RMSNorm, RoPE, GQA, q/k-norm,
  qkv bias, SwiGLU), calls the HF model's own submodules on a preallocated batch cache written
  in place, skipping the per-step overhead of the HF forward (mask building, cache objects,
  output classes); cos/sin come from a table built once per call;
- its *packed* variant, for small float32 models of that family with plain `nn.Linear` layers
  (the built-in demo models), also stacks the q/k/v and gate/up weights (copies rebuilt when a
  parameter's version changes, i.e. after an optimizer step) and fuses the residual adds, so a
  CPU decode step runs about half as many kernels;
- on CUDA, the lean path's decode steps are replayed as CUDA graphs (`DecodeGraphs`): at real
  model sizes an eager step is bound by its hundreds of kernel launches;
- the *HF* path, for any other architecture with a standard full-attention cache, calls the
  model's forward with a `DynamicCache` and an explicit 4-D mask.

Sampling draws one uniform number per row and inverts the CDF (`torch.multinomial` draws one
exponential per vocabulary entry, which dominates a small model's step).

Per generated token the sampler returns the token's log-probability under
softmax(logits / temperature) (before top-p/top-k filtering: what the trainer recomputes) and
the full-vocabulary entropy of that distribution, both in float32. `temperature=0` means greedy
decoding; its log-probabilities and entropies are then those of the untempered softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from aepo.rollout.sampler.continuous import SlotBatch
from aepo.rollout.sampler.hf import HFBatch
from aepo.rollout.sampler.layout import DECODE_BLOCK, Layout, chunk_length, put_chunks, truncate_chunks
from aepo.rollout.sampler.lean import (
    LEAN_MODEL_TYPES,
    LeanBatch,
    PackedModel,
    adapter_flags,
    pack_llama_weights,
    parameter_versions,
    supports_lean_forward,
)
from aepo.rollout.sampler.rows import Row, RowTable
from aepo.rollout.sampler.slot_graphs import LayerGraphs
from aepo.rollout.sampler.stops import StopSpec, segment_finish, stop_spec
from aepo.types import Generation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# `generate(..., pause=...)` leaves rows this close to their budget running: a new call's
# prefill and cache gather cost about as much as a few decode steps
PAUSE_MIN_TOKENS = 8


def _usable_cache(state: Row) -> int:
    """Cached positions a generate call reuses: at least one token per row must be fed to get
    its next-token logits."""
    return min(state.n_cached, len(state.ids) - 1)


class TorchSampler(RowTable):
    """KV-cached batched sampler over a HF causal LM; see the module docstring.

    `max_batch_rows` bounds how many rows share one forward (larger calls are split);
    `eos_token_ids` defaults to the tokenizer's and the generation config's EOS ids;
    `lean` forces (True) or forbids (False) the compact Llama-family forward (default: use it
    when the architecture supports it); `pack_weights` allows (default) or forbids its packed
    variant for small float32 models; `decode_graphs` replays each lean decode step as a CUDA
    graph (default: on for CUDA; `True` on a CPU runs the same static-shape steps without
    capture, which the tests use to check them); `graph_cache`: a dict shared by the samplers of
    one model (a backend's), where the running batches' layer graphs outlive a sampler.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        max_batch_rows: int = 256,
        eos_token_ids: Sequence[int] | None = None,
        lean: bool | None = None,
        pack_weights: bool | None = None,
        decode_graphs: bool | None = None,
        graph_cache: dict | None = None,
    ) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.max_batch_rows = int(max_batch_rows)
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype
        RowTable.__init__(self, int(model.get_output_embeddings().weight.shape[0]))
        if lean is None:
            lean = supports_lean_forward(model)
        elif lean and not supports_lean_forward(model):
            raise ValueError(
                f"lean=True but model type {getattr(model.config, 'model_type', '?')!r} is not supported by "
                f"the compact forward (supported: {', '.join(LEAN_MODEL_TYPES)} with full attention)"
            )
        self.lean = bool(lean)
        # small float32 models: stacked weight copies, fewer kernels per step (CPU decode is
        # dominated by per-kernel overhead at that size)
        self.pack_weights = self.lean if pack_weights is None else bool(pack_weights and self.lean)
        if decode_graphs is None:
            decode_graphs = self.device.type == "cuda"
        self.decode_graphs = bool(decode_graphs and self.lean)
        self.eos_token_ids = set(
            self._default_eos(model, tokenizer) if eos_token_ids is None else eos_token_ids
        )
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        # the per-row streams of a continuous batch (`SlotBatch`) start from this
        self.seed = int(self.generator.initial_seed())
        self.batch: SlotBatch | None = None
        self._own_cache: dict = {}
        self.steps = 0  # sampling steps of `generate` (its prefill's first token included)
        self.row_steps = 0  # tokens sampled by them
        self._packed: PackedModel | None = None
        # "layers": (packed weights, parameter addresses and mode, the LayerGraphs captured on
        # them); a backend passes one dict to all its samplers, so the graphs outlive a rollout
        self._graph_cache = {} if graph_cache is None else graph_cache

    # ---------------------------------------------------------------- row bookkeeping

    @staticmethod
    def _default_eos(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        ids: list[int] = []
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.append(int(tokenizer.eos_token_id))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.append(gen_eos)
        elif gen_eos is not None:
            ids.extend(int(i) for i in gen_eos)
        return ids

    def fork(self, row: int, position: int | None = None) -> int:
        """New row with the first `position` tokens of `row` (all when None), sharing its cache."""
        if self.batch is not None:
            self.batch.flush(row)
        state, n = self._fork_length(row, position)
        n_cached = min(state.n_cached, n)
        chunks = truncate_chunks(state.chunks, n_cached)
        open_kept = len(state.open) - (len(state.ids) - n)  # of a paused segment, before `position`
        return self._add(Row(ids=state.ids[:n], chunks=chunks, n_cached=n_cached,
                             open=state.open[:open_kept] if open_kept > 0 else []))

    def release(self, row: int) -> None:
        """Free a row's memory (and its slot in a running batch); the handle is invalid afterwards."""
        if self.batch is not None:
            self.batch.drop(row)
        RowTable.release(self, row)

    @property
    def can_step(self) -> bool:
        """Whether `open_batch` works: the continuous batch needs the lean forward."""
        return self.lean

    def open_batch(self, stop: Sequence[str] = (), max_rows: int = 256) -> SlotBatch:
        """The sampler's running batch (`SlotBatch`) for rows that stop at `stop`; rows join
        with `start(row, budget, key)` and advance with `step()`. One per sampler."""
        if self.batch is not None:
            raise ValueError("this sampler already has a running batch")
        self.batch = SlotBatch(self, stop, max_rows)
        return self.batch

    def layer_graphs(self) -> LayerGraphs:
        """The running batches' layer graphs (`LayerGraphs`), kept while the weights they were
        captured on stay where they are: the same packed copies, the same parameter tensors, the
        same train/eval mode and LoRA adapters on or off alike (a graph replays what it captured,
        wherever the weights went and whatever a flag now says)."""
        packed = self._packed_weights()
        where = (tuple(p.data_ptr() for p in self.model.parameters()), self.model.training,
                 adapter_flags(self.model))
        kept = self._graph_cache.get("layers")
        if kept is None or kept[0] is not packed or kept[1] != where:  # held, so `is` is safe
            kept = self._graph_cache["layers"] = (packed, where, LayerGraphs(capture=self.device.type == "cuda"))
        return kept[2]

    def close_batch(self) -> None:
        """End the running batch (its rows keep their tokens and cache chunks)."""
        if self.batch is not None and self.batch.active:
            raise ValueError(f"the running batch still has {self.batch.active} rows")
        if self.batch is not None:
            self.batch.close()  # parked rows' positions into their chunks
        self.batch = None

    def cached_length(self, row: int) -> int:
        """How many of the row's tokens already have keys/values in its cache."""
        if self.batch is not None:
            self.batch.flush(row)
        return self._row(row).n_cached

    # ---------------------------------------------------------------- stop strings

    def _stop_spec(self, stop: tuple[str, ...]) -> StopSpec:
        return stop_spec(self.tokenizer, self.vocab_size, stop, self._own_cache)

    # ---------------------------------------------------------------- sampling

    def _sample(
        self, logits: torch.Tensor, uniforms: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [B], their log-probs and the entropies under softmax(logits / T), float32.
        `uniforms` [B, 1]: the numbers to invert the CDF at (default: from the generator)."""
        logits = logits.float()
        scaled = logits / self.temperature if self.temperature not in (0.0, 1.0) else logits
        logp = torch.log_softmax(scaled, dim=-1)
        probs = logp.exp()
        entropy = -torch.bmm(probs[:, None, :], logp[:, :, None])[:, 0, 0]
        # -inf logits make 0 * -inf = nan above; entr() treats 0 log 0 as 0. On CPU a check is
        # cheap; on an accelerator the fix is computed without a host sync.
        if self.device.type != "cpu":
            entropy = torch.where(entropy.isnan(), torch.special.entr(probs).sum(-1), entropy)
        elif torch.isnan(entropy).any():
            entropy = torch.special.entr(probs).sum(-1)
        if self.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            tokens = self._draw(self._filtered(scaled, probs), uniforms)
        token_logp = logp.gather(-1, tokens[:, None])[:, 0]
        return tokens, token_logp, entropy

    def _filtered(self, scaled: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sampling weights (proportional to the probabilities) after top-k and top-p; 0 = excluded."""
        if 0 < self.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, self.top_k, dim=-1).values[:, -1:]
            weights = weights.masked_fill(scaled < kth, 0.0)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(weights, dim=-1, descending=True)
            sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
            above = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
            sorted_p = sorted_p.masked_fill(above >= self.top_p, 0.0)
            weights = torch.zeros_like(weights).scatter_(-1, order, sorted_p)
        return weights

    def _draw(self, weights: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """One index per row with probability proportional to `weights` (inverse-CDF sampling).

        One uniform number per row instead of one per vocabulary entry (what
        `torch.multinomial` draws), which dominates the step time of small models.
        """
        cdf = torch.cumsum(weights, dim=-1)
        u = uniforms if uniforms is not None else torch.rand(
            weights.shape[0], 1, generator=self.generator, device=weights.device)
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
        tokens = tokens.clamp_(max=weights.shape[-1] - 1)
        # Float rounding at the very top of the CDF could land on an excluded tail token.
        excluded = weights.gather(-1, tokens[:, None])[:, 0] <= 0
        if weights.device.type != "cpu" or excluded.any():
            tokens = torch.where(excluded, weights.argmax(-1), tokens)
        return tokens

    # ---------------------------------------------------------------- generation

    def _packed_weights(self) -> PackedModel | None:
        """Packed copies of a small model's weights, rebuilt whenever a parameter changed
        (an optimizer step bumps the parameters' version counters)."""
        if not self.pack_weights:
            return None
        if self._packed is None or self._packed.versions != parameter_versions(self.model):
            self._packed = pack_llama_weights(self.model)
            if self._packed is None:
                self.pack_weights = False
        return self._packed

    can_pause = True  # `generate` takes `pause`

    def generate(
        self,
        rows: Sequence[int],
        max_new_tokens: int | Sequence[int],
        stop: Sequence[str] = (),
        pause: float = 0.0,
    ) -> list[Generation]:
        """Continue each row until a stop string, EOS or its token budget; one Generation per row.

        `pause` > 0: once at most that fraction of a batch's rows is still going and some row
        ended on a stop string, the rest end with finish "paused" (their segment continues at
        their next call, stop strings matched across the pause). An agent loop passes it so
        that the rows waiting on a tool result do not wait for a turn's longest row: they and
        the paused rows decode together in the next turn's batch."""
        if not 0.0 <= pause < 1.0:
            raise ValueError(f"pause must be in [0, 1) (a fraction of a batch's rows; 0 = off), got {pause}")
        handles, budgets = self._budgets(rows, max_new_tokens)
        if self.batch is not None:  # rows parked in the running batch: their positions into chunks
            for handle in handles:
                self.batch.flush(handle)
        spec = self._stop_spec(tuple(stop))
        results: list[Generation | None] = [None] * len(handles)
        todo = []
        for i, budget in enumerate(budgets):
            if budget == 0:
                results[i] = Generation(token_ids=[], logprobs=[], entropies=[], finish="length")
            else:
                todo.append(i)
        with torch.inference_mode():
            for start in range(0, len(todo), self.max_batch_rows):
                group = todo[start : start + self.max_batch_rows]
                outs = self._generate_batch(
                    [handles[i] for i in group], [budgets[i] for i in group], spec, pause
                )
                for i, out in zip(group, outs):
                    results[i] = out
        return results  # type: ignore[return-value]

    @staticmethod
    def _should_pause(
        active: list[int],
        finish: list[tuple[str, str | None] | None],
        generated: list[list[int]],
        budgets: list[int],
    ) -> bool:
        """Pause the `active` rows: some row ended on a stop string (a tool call, whose row goes
        on next turn) and the active rows still have more than `PAUSE_MIN_TOKENS` to go."""
        stopped = any(f is not None and f[0] == "stop" for f in finish)
        return stopped and max(budgets[i] - len(generated[i]) for i in active) > PAUSE_MIN_TOKENS

    def _segment_finish(
        self, generated: list[int], spec: StopSpec, budget: int, before: list[int] | None = None
    ) -> tuple[str, str | None] | None:
        """How a segment whose last token was just sampled ends (`aepo.rollout.sampler.stops`)."""
        return segment_finish(self.tokenizer, spec, self.eos_token_ids, generated, budget, before)

    def _layout(self, states: list[Row], use_cached: list[int], budget: int) -> Layout:
        device = self.device
        pending = [s.ids[c:] for s, c in zip(states, use_cached)]
        c_len, p_len = max(use_cached), max(len(p) for p in pending)
        total = c_len + p_len + budget - 1
        batch = len(states)
        key_valid = torch.zeros(batch, total, dtype=torch.bool)
        tokens = torch.zeros(batch, p_len, dtype=torch.long)
        positions = torch.zeros(batch, p_len, dtype=torch.long)
        for i, (cached, ids) in enumerate(zip(use_cached, pending)):
            n = len(ids)
            key_valid[i, c_len - cached : c_len] = True
            key_valid[i, c_len + p_len - n : c_len + p_len] = True
            key_valid[i, c_len + p_len :] = True
            tokens[i, p_len - n :] = torch.tensor(ids, dtype=torch.long)
            positions[i, p_len - n :] = torch.arange(cached, cached + n)
        next_positions = torch.tensor([c + len(p) for c, p in zip(use_cached, pending)], dtype=torch.long)
        return Layout(
            c_len,
            p_len,
            total,
            key_valid.to(device),
            tokens.to(device),
            positions.to(device),
            next_positions.to(device),
        )

    def _gather_cache(
        self, states: list[Row], use_cached: list[int], columns: int, c_len: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Left-padded batch cache with the rows' chunks: per layer, keys and values [B, kv_heads,
        columns, head_dim] (None for the HF path with nothing cached)."""
        first = next((s.chunks[0] for s, c in zip(states, use_cached) if c > 0), None)
        if first is None:
            if not self.lean:
                return None
            config = self.model.config
            layers = int(config.num_hidden_layers)
            n_kv = int(config.num_key_value_heads)
            head_dim = int(self.model.model.layers[0].self_attn.head_dim)
            shapes = [((n_kv, head_dim), (n_kv, head_dim))] * layers
        else:
            shapes = [((k.shape[0], k.shape[2]), (v.shape[0], v.shape[2])) for k, v in zip(*first)]
        batch = len(states)
        keys = [torch.zeros(batch, k[0], columns, k[1], dtype=self.dtype, device=self.device) for k, _ in shapes]
        values = [torch.zeros(batch, v[0], columns, v[1], dtype=self.dtype, device=self.device) for _, v in shapes]
        placed = []
        for i, (state, cached) in enumerate(zip(states, use_cached)):
            offset = c_len - cached
            for chunk in truncate_chunks(state.chunks, cached):
                placed.append((i, offset, chunk))
                offset += chunk_length(chunk)
        put_chunks(keys, values, placed)
        return keys, values

    def _generate_batch(
        self, handles: list[int], budgets: list[int], spec: StopSpec, pause: float = 0.0
    ) -> list[Generation]:
        """`_generate_rows`, with the rows of a CPU lean batch ordered by pending length, longest
        first, so its prefill runs in passes of similar lengths (`LeanBatch.prefill`); results
        in the callers' order."""
        if not (self.lean and self.device.type == "cpu") or len(handles) < 2:
            return self._generate_rows(handles, budgets, spec, pause)
        pending = [len(s.ids) - _usable_cache(s) for s in (self._rows[h] for h in handles)]
        order = sorted(range(len(handles)), key=lambda i: -pending[i])
        outs = self._generate_rows([handles[i] for i in order], [budgets[i] for i in order], spec, pause)
        results: list[Generation] = [None] * len(order)  # type: ignore[list-item]
        for k, i in enumerate(order):
            results[i] = outs[k]
        return results

    def _generate_rows(
        self, handles: list[int], budgets: list[int], spec: StopSpec, pause: float = 0.0
    ) -> list[Generation]:
        states = [self._rows[h] for h in handles]
        use_cached = [_usable_cache(s) for s in states]
        max_budget = max(budgets)
        layout = self._layout(states, use_cached, max_budget)
        c_len, p_len = layout.cache_len, layout.pending_len
        if self.lean:
            columns = min(layout.total_len, c_len + p_len + DECODE_BLOCK)
            cache = self._gather_cache(states, use_cached, columns, c_len)
            assert cache is not None
            engine: LeanBatch | HFBatch = LeanBatch(
                self.model, layout, *cache, packed=self._packed_weights()
            )
            if self.decode_graphs:
                engine.use_decode_graphs(capture=self.device.type == "cuda")
        else:
            cache = self._gather_cache(states, use_cached, c_len, c_len) if c_len > 0 else None
            engine = HFBatch(self.model, layout, *(cache or (None, None)))

        batch = len(states)
        generated: list[list[int]] = [[] for _ in range(batch)]
        logprob_cols: list[torch.Tensor] = []
        entropy_cols: list[torch.Tensor] = []
        finish: list[tuple[str, str | None] | None] = [None] * batch
        slots = list(range(batch))  # batch slot -> row index; shrinks when the batch is compacted
        last_col = c_len + p_len  # first decode column

        def close(rows: list[tuple[int, int]], free: bool = False) -> None:
            """Each (row index, batch slot)'s positions filled here become one more chunk of the
            row (`free`: the batch's last call, its cache freed as they are copied out)."""
            spans = []
            for i, slot in rows:
                state = states[i]
                n_fed = len(state.ids) - use_cached[i] - 1 + len(generated[i])
                start = c_len + p_len - (len(state.ids) - use_cached[i])
                spans.append((slot, start, start + n_fed))
            chunks = engine.take(spans, free=free)
            for (i, _), (_, start, end), chunk in zip(rows, spans, chunks):
                state = states[i]
                state.chunks = truncate_chunks(state.chunks, use_cached[i]) + [chunk]
                state.n_cached = use_cached[i] + end - start
                state.ids.extend(generated[i])

        logits = engine.prefill()
        positions = layout.next_positions
        slot_rows: torch.Tensor | None = None  # device copy of `slots` once the batch is compacted
        step = 0
        while True:
            tokens, token_logp, entropy = self._sample(logits)
            self.steps += 1
            self.row_steps += sum(1 for i in slots if finish[i] is None)
            if slot_rows is None:
                logprob_cols.append(token_logp)
                entropy_cols.append(entropy)
            else:
                blank = torch.full((batch,), float("nan"), device=self.device)
                logprob_cols.append(blank.index_copy(0, slot_rows, token_logp))
                entropy_cols.append(blank.index_copy(0, slot_rows, entropy))
            for slot_index, (i, token) in enumerate(zip(slots, tokens.tolist())):
                if finish[i] is not None:
                    continue
                generated[i].append(token)
                finish[i] = self._segment_finish(generated[i], spec, budgets[i], states[i].open)
            active = [k for k, i in enumerate(slots) if finish[i] is None]
            if not active:
                break
            if pause and len(active) <= pause * batch and self._should_pause(
                [slots[k] for k in active], finish, generated, budgets
            ):
                for k in active:
                    finish[slots[k]] = ("paused", None)
                break
            if len(active) <= len(slots) // 2 and len(slots) >= 8:
                close([(i, k) for k, i in enumerate(slots) if finish[i] is not None])
                keep = torch.tensor(active, device=self.device)
                engine.keep(keep)
                layout.key_valid = layout.key_valid.index_select(0, keep)
                positions = positions.index_select(0, keep)
                tokens = tokens.index_select(0, keep)
                slots = [slots[k] for k in active]
                slot_rows = torch.tensor(slots, device=self.device)
            logits = engine.decode(tokens, positions + step, last_col + step)
            step += 1

        close([(i, k) for k, i in enumerate(slots)], free=True)
        for i, state in enumerate(states):
            state.open = state.open + generated[i] if finish[i][0] == "paused" else []  # type: ignore[index]
        logprobs = torch.stack(logprob_cols, 1).tolist()
        entropies = torch.stack(entropy_cols, 1).tolist()
        outs = []
        for i in range(batch):
            n = len(generated[i])
            reason, matched = finish[i]  # type: ignore[misc]
            outs.append(
                Generation(
                    token_ids=generated[i],
                    logprobs=logprobs[i][:n],
                    entropies=entropies[i][:n],
                    finish=reason,
                    stop=matched,
                )
            )  # type: ignore[arg-type]
        return outs
