"""The continuous scheduler's running batch on the vLLM engine: rows submitted as they are ready.

`VLLMSampler.generate` runs one turn's rows through a batch of its own and returns when the
last one ends, so a turn waits for its longest row. `EngineBatch` gives the continuous scheduler
(`aepo.rollout.scheduler`, docs/algorithms.md section 3.5) the same running-batch interface as
the torch sampler's `SlotBatch`, on the engine:

- `start(row, budget, key)` submits the row's segment as one request at once (its whole token
  list as a token-id prompt; the prefix cache serves what the engine has seen, e.g. a fork's
  prefix or a row continued after its tool result). vLLM's own scheduler batches the requests
  and prefills new ones beside the running decode;
- `step()` runs one engine step and returns the rows whose segment ended: EOS and the budget
  end the request in the engine, a stop string is matched here on the new token
  (`aepo.rollout.sampler.stops`) and the request aborted. The others' tokens so far are readable
  (`generated`, `entropies`) for the scheduler's early branch decisions, and are already in the
  row's ids, so a fork of a running row sees them;
- a request's seed is a function of (sampler seed, the row's stream key, the row's length when
  the segment starts), and vLLM draws a seeded request's tokens from its own generator, so what
  a row samples does not depend on which rows ran beside it or when it was submitted.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aepo.rollout.sampler.running import RunningBatch
from aepo.rollout.sampler.stops import segment_finish, stop_spec
from aepo.rollout.sampler.streams import stream_state
from aepo.types import Generation

if TYPE_CHECKING:
    from aepo.rollout.sampler.vllm_sampler import VLLMSampler

__all__ = ["EngineBatch", "segment_seed"]


def segment_seed(seed: int, key: Sequence[int], position: int) -> int:
    """The engine seed of the segment that row `key` starts at token `position`."""
    return stream_state(seed, (*key, position)) % (2**31 - 1)


@dataclass
class _Request:
    """One row's segment in the engine: its request id and the tokens returned so far."""

    request_id: str
    budget: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)


class EngineBatch(RunningBatch):
    """One running batch of a `VLLMSampler`'s rows (see the module docstring)."""

    def __init__(self, sampler: VLLMSampler, stop: Sequence[str], max_rows: int = 256) -> None:
        super().__init__(max_rows)
        self.s = sampler
        self.engine = sampler.backend.llm.llm_engine
        self.tokenizer = sampler.backend.tokenizer
        self.spec = stop_spec(self.tokenizer, sampler.vocab_size, stop)
        self.rows: dict[int, _Request]
        self.handles: dict[str, int] = {}  # request id -> row
        self._ids = itertools.count()

    def start(self, row: int, budget: int, key: Sequence[int] = (), *, seed: int | None = None) -> None:
        """Submit `row`'s next segment of at most `budget` tokens, seeded by its stream `key`
        (`segment_seed`) or by `seed`."""
        ids = self.s._row(row).ids
        if budget >= 0:  # the engine refuses a request past its max_model_len
            budget = max(0, min(int(budget), self.s.backend.max_model_len - len(ids)))
        if not self._accept(row, budget):
            return
        request_id = f"aepo-{row}-{next(self._ids)}"
        if seed is None:
            seed = segment_seed(self.s.seed, key, len(ids))
        params = self.s._params(budget, seed)
        params.output_kind = self.s.backend.delta_outputs
        self.engine.add_request(request_id, {"prompt_token_ids": list(ids)}, params,
                                lora_request=self.s.backend.lora_request)
        self.rows[row] = _Request(request_id, budget)
        self.handles[request_id] = row
        self.s.backend._prompt_tokens += len(ids)

    def step(self) -> list[tuple[int, Generation]]:
        """One engine step; (row, Generation) for each request that finished (the rows leave the
        batch). Rows started with no budget are returned at once."""
        ended, self.done = self.done, []
        if not self.rows:
            return ended
        outputs = [(self.handles.get(out.request_id), out) for out in self.engine.step()]
        outputs = [(row, out) for row, out in outputs if row is not None]  # dropped: None
        self.steps += 1
        news, tables = [], []
        for row, out in outputs:
            c = out.outputs[0]
            tokens = [int(t) for t in c.token_ids]
            logprobs, rows = self.s._top_rows(tokens, c.logprobs)
            news.append((tokens, logprobs))
            tables += rows
        entropies = iter(self.s._entropies(tables))  # one call for the step's tokens
        for (row, out), (tokens, logprobs) in zip(outputs, news):
            req = self.rows[row]
            if not req.tokens:
                self.s.backend._cached_tokens += int(getattr(out, "num_cached_tokens", 0) or 0)
            finish = None
            for token, logprob, entropy in zip(tokens, logprobs, list(itertools.islice(entropies, len(tokens)))):
                req.tokens.append(token)  # one a step, unless the engine runs ahead
                req.logprobs.append(logprob)
                req.entropies.append(entropy)
                self.s._rows[row].ids.append(token)
                self.row_steps += 1
                finish = segment_finish(self.tokenizer, self.spec, (), req.tokens, req.budget)
                if finish is not None:
                    break
            if finish is None and out.finished:
                finish = self.s._finish_reason(out.outputs[0])
            if finish is not None:
                if not out.finished:  # a stop string: the engine matches none (`_params`)
                    self.engine.abort_request([req.request_id])
                del self.rows[row], self.handles[req.request_id]
                ended.append((row, Generation(req.tokens, req.logprobs, req.entropies, finish=finish[0],
                                              stop=finish[1])))
        return ended

    def flush(self, row: int) -> None:
        """Nothing to move: a running row's tokens are in its ids as they arrive, and the
        engine's prefix cache holds their keys."""

    def drop(self, row: int) -> None:
        """Abort a running row's request without a result (its sampler row is being released)."""
        req = self.rows.pop(row, None)
        if req is not None:
            del self.handles[req.request_id]
            self.engine.abort_request([req.request_id])
        self.done = [(r, g) for r, g in self.done if r != row]

    def close(self) -> None:
        """Abort whatever still runs (a rollout that failed midway), so the engine is clean."""
        for row in list(self.rows):
            self.drop(row)
