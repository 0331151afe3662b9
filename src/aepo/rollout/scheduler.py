"""The continuous rollout scheduler: one running decode batch, no turn barrier.

The turn scheduler (`RolloutStrategy.run`) runs every active row to its next stop in one
`generate` call, so a turn lasts as long as its longest row. Here (docs/algorithms.md section
3.5) rows move independently through one running batch (`SlotBatch`):

- a row that stops for a tool leaves the batch; its call runs in a tool thread while the others
  decode, and the row rejoins at the first step after its result is in (the result prefilled
  beside that step);
- a branch joins as soon as its decision is taken, forked from its parent's cached prefix;
  global, fill and post-probe rows join as soon as their prompt allows;
- at most `rollout.max_active_rows` rows decode at once; the rest wait in order.

Results do not depend on the schedule. Each row samples from its own stream
(`row_uniform(seed, key, position)`, key = (kind, prompt, row_id)), and the decisions that
compete for a prompt's budget are taken in a fixed order: every row keeps a logical clock (the
step at which its next token would be sampled if nothing ever waited: one per token, tools
free), and a decision measured at logical time T is taken only once no live row of its prompt
can still produce one at or before T, in order of (T, row_id). Children start at T + 1; fills
and the rows after an AEPO probe start at the clock of the rows they follow. So a rollout comes
out the same under any batch limit and any tool latency (tested with the scripted sampler).

`penalty_scope=prompt` needs rounds (the released counter is updated once per turn of all
rows) and uses the turn scheduler.
"""
from __future__ import annotations

import heapq
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from aepo.rollout.agent import RowState, TurnOutcome
from aepo.rollout.sampler.streams import RowKey

if TYPE_CHECKING:
    from aepo.rollout.strategies import PromptGroup, RolloutStrategy

__all__ = ["ContinuousScheduler", "supports_continuous"]


def supports_continuous(sampler: Any) -> bool:
    """Whether `sampler` can run a continuous batch (`open_batch`; the torch sampler's lean
    forward). Others roll out with the turn scheduler."""
    return bool(getattr(sampler, "can_step", False))


class ContinuousScheduler:
    """Runs a strategy's rows through one running batch (see the module docstring)."""

    def __init__(self, strategy: RolloutStrategy, max_active_rows: int) -> None:
        if max_active_rows < 1:
            raise ValueError(f"rollout.max_active_rows must be >= 1, got {max_active_rows}")
        if strategy.cfg.penalty_scope == "prompt":
            raise ValueError("rollout.penalty_scope=prompt counts rounds of the turn scheduler; "
                             "set rollout.scheduler=turns with it")
        self.st = strategy
        # the base of each decision's own draw (`row_uniform`), taken from the strategy's rng
        self.decision_seed = strategy.rng.getrandbits(62)
        self.agent = strategy.agent
        self.cfg = strategy.cfg
        self.batch = strategy.sampler.open_batch(stop=self.agent.format.stop_strings(),
                                                 max_rows=max_active_rows)
        if hasattr(self.batch, "warm"):  # each prompt's tokens cached once, before its rows fork it
            self.batch.warm([g.base_row for g in strategy.groups])
        self.ready: deque[RowState] = deque()
        self.running: dict[int, RowState] = {}  # sampler handle -> row
        self.clock: dict[int, int] = {}  # id(row) -> logical time of its next token
        self.known: set[int] = set()  # id(row) of every row seen
        self.events: dict[int, list[tuple[int, int, int, TurnOutcome]]] = {}  # group -> heap
        self.waiting_events: dict[int, int] = {}  # id(row) -> its decisions not yet taken
        self.tools: list[tuple[Future, list[RowState]]] = []
        self.max_clock = 0
        self.roots: dict[int, PromptGroup] = {}  # sampler handle -> group of a running H_root sample
        self.root_queue: deque[PromptGroup] = deque()
        self.root_clock: dict[int, int] = {}  # group -> logical time after its H_root sample

    # ---------------------------------------------------------------- bookkeeping

    def _key(self, s: RowState) -> RowKey:
        return RowKey(1 if s.probe else 0, s.group, s.traj.row_id)

    def _now(self, s: RowState) -> int:
        """The logical time of `s`'s next token (running rows: counting this segment so far)."""
        t = self.clock[id(s)]
        return t + self.batch.generated(s.row) if s.row in self.running else t

    def _admit_new(self, g: PromptGroup, at: int) -> None:
        """Queue the rows of `g` made since the last look (branches, fills, post-probe rows),
        their clocks starting at `at`."""
        for s in ([g.probe] if g.probe is not None else []) + g.rows:
            if id(s) not in self.known:
                self.known.add(id(s))
                self.clock[id(s)] = at
                if not s.finished:
                    self.ready.append(s)

    # ---------------------------------------------------------------- main loop

    def run(self) -> None:
        for g in self.st.groups:
            if g.root is not None:  # AEPO's H_root sample, beside the probe
                self.roots[g.root] = g
                self.root_queue.append(g)
            self._admit_new(g, 0)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aepo-tools") as pool:
            self.pool = pool
            while True:
                self._collect_tools(block=False)
                self._settle()
                self._admit()
                if self.batch.active:
                    self.st.round = self.batch.steps
                    for handle, gen in self.batch.step():
                        if handle in self.roots:
                            self._root_ended(self.roots.pop(handle), gen)
                        else:
                            self._segment_ended(self.running.pop(handle), gen)
                    self._early_decisions()
                elif self.tools:
                    self._collect_tools(block=True)
                elif not self.ready and not self.root_queue:
                    self._settle()  # rows _admit ended at their budget may let a prompt fill
                    self._admit()
                    if not self.batch.active and not self.ready and not self.root_queue:
                        break

    def _root_ended(self, g: PromptGroup, gen: Any) -> None:
        self.st.root_sampled(g, gen)
        self.st._release(g.root)
        g.root = None
        self.root_clock[g.index] = len(gen.token_ids)

    def _early_decisions(self) -> None:
        """A segment's entropy is fixed by its first n_probe tokens (docs/algorithms.md section
        1), so the decision after a tool result is measured then, not at the segment's end: a
        branch starts up to a whole segment sooner, with the same decision."""
        n = self.cfg.n_probe
        for handle, s in self.running.items():
            if s.awaiting_decision and self.batch.generated(handle) == n:
                s.awaiting_decision = False
                entropy = self.agent.segment_entropy(self.batch.entropies(handle)[:n])
                outcome = TurnOutcome(s, s.response_len, entropy, True, None)  # type: ignore[arg-type]
                self._event(s, self.clock[id(s)] + n - 1, outcome)

    def _event(self, s: RowState, time: int, outcome: TurnOutcome) -> None:
        heapq.heappush(self.events.setdefault(s.group, []), (time, s.traj.row_id, id(outcome), outcome))
        self.waiting_events[id(s)] = self.waiting_events.get(id(s), 0) + 1

    def _admit(self) -> None:
        while self.root_queue and self.batch.free > 0:
            g = self.root_queue.popleft()
            self.batch.start(g.root, self.cfg.n_probe, RowKey(2, g.index, 0))
        budget = self.cfg.max_response_tokens
        while self.ready and self.batch.free > 0:
            s = self.ready.popleft()
            if s.finished:
                continue
            if s.response_len >= budget:
                s.finish("length")
                continue
            self.running[s.row] = s
            self.batch.start(s.row, budget - s.response_len, self._key(s))

    def _segment_ended(self, s: RowState, gen: Any) -> None:
        """`Agent.step`'s handling of one row's finished segment, for this row alone."""
        self.clock[id(s)] += len(gen.token_ids)
        self.max_clock = max(self.max_clock, self.clock[id(s)])
        outcome = self.agent._record_segment(s, gen)
        action = outcome.action
        if action.kind == "answer":
            s.finish("answer")
        elif action.kind in ("tool", "malformed"):
            if s.n_tool_calls >= self.cfg.max_tool_calls:
                s.finish("max_tool_calls")
            elif s.response_len >= self.cfg.max_response_tokens:
                s.finish("length")
            elif action.kind == "malformed":
                self._tool_results([s], self.agent._run_tools([action]))
            else:
                self.tools.append((self.pool.submit(self.agent._run_tools, [action]), [s]))
        else:
            s.finish(gen.finish if gen.finish in ("eos", "length") else "eos")
        if outcome.follows_tool:  # a segment shorter than n_probe: measured at its end
            self._event(s, self.clock[id(s)] - 1, outcome)

    def _collect_tools(self, block: bool) -> None:
        if not self.tools:
            return
        if block:
            wait([f for f, _ in self.tools], return_when=FIRST_COMPLETED)
        keep = []
        for fut, rows in self.tools:
            if fut.done():
                self._tool_results(rows, fut.result())
            else:
                keep.append((fut, rows))
        self.tools = keep

    def _tool_results(self, rows: list[RowState], calls: list[Any]) -> None:
        for s, call in zip(rows, calls):
            self.agent._append_result(s, call)
            if not s.finished:
                self.ready.append(s)

    def _settle(self) -> None:
        """Take every decision that can no longer be preceded, then let each prompt fill or
        finish its probe (`end_turn`), and free the rows nobody can fork any more."""
        for g in self.st.groups:
            heap = self.events.get(g.index)
            if heap:
                live = [s for s in ([g.probe] if g.probe is not None else []) + g.rows if not s.finished]
                horizon = min((self._now(s) for s in live), default=None)
                while heap and (horizon is None or heap[0][0] < horizon):
                    t, _, _, outcome = heapq.heappop(heap)
                    s = outcome.state
                    self.st.on_tool_feedback(g, outcome)
                    self.waiting_events[id(s)] -= 1
                    self._admit_new(g, t + 1)
                    if horizon is not None:  # children may start before the horizon
                        live = [r for r in g.rows if not r.finished]
                        horizon = min((self._now(r) for r in live), default=None)
            if g.probe is not None or not any(not s.finished for s in g.rows):
                rows = ([g.probe] if g.probe is not None else []) + g.rows
                at = max([self.clock[id(s)] for s in rows] + [self.root_clock.get(g.index, 0)])
                if not heap:
                    self.st.end_turn(g)
                    self._admit_new(g, at)
            for s in g.rows:
                if s.finished and not self.waiting_events.get(id(s)):
                    self.st._release_state(s)

    def close(self) -> None:
        """Hand the sampler back without a running batch (a later rollout opens its own)."""
        close = getattr(self.st.sampler, "close_batch", None)
        if close is not None:
            close()

    def stats(self) -> dict[str, Any]:
        """Scheduling counters: steps of the batch, rows per step, the logical critical path."""
        b = self.batch
        return {"scheduler": "continuous", "decode_steps": b.steps + getattr(self.st.sampler, "steps", 0),
                "mean_active_rows": b.row_steps / b.steps if b.steps else 0.0,
                "logical_steps": self.max_clock}
