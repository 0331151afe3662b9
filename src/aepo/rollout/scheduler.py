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
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from time import perf_counter
from typing import TYPE_CHECKING, Any

from aepo.rollout.agent import RowState, TurnOutcome, fork_row_state
from aepo.rollout.sampler.streams import RowKey

if TYPE_CHECKING:
    from aepo.rollout.strategies import PromptGroup, RolloutStrategy

__all__ = ["TOOL_BATCHES", "ContinuousScheduler", "branch_stream", "stream_key", "supports_continuous"]

TOOL_BATCHES = 8  # steps' tool batches that may run at once (each one tool_fn call)
TOOL_GRACE_BACKOFF = 16  # steps without a grace wait after a step's tool calls outlasted one


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
        self.agent = strategy.agent
        self.cfg = strategy.cfg
        # the base of each decision's own draw (`row_uniform`), taken from the strategy's rng
        self.decision_seed = strategy.rng.getrandbits(62)
        self.speculate = bool(strategy.cfg.speculate)
        self.batch = strategy.sampler.open_batch(stop=self.agent.format.stop_strings(),
                                                 max_rows=max_active_rows)
        if hasattr(self.batch, "warm"):  # each prompt's tokens cached once, before its rows fork it
            self.batch.warm([g.base_row for g in strategy.groups])
        self.ready: deque[RowState] = deque()
        self.running: dict[int, RowState] = {}  # sampler handle -> row
        self.clock: dict[int, int] = {}  # id(row) -> logical time of its next token, for every row seen
        self.events: dict[int, list[tuple[int, int, int, TurnOutcome]]] = {}  # group -> heap
        self.waiting_events: dict[int, int] = {}  # id(row) -> its decisions not yet taken
        self.tools: list[tuple[Future, list[RowState]]] = []
        self.step_calls: list[tuple[RowState, Any]] = []  # this step's well-formed tool calls
        self.max_clock = 0
        self.roots: dict[int, PromptGroup] = {}  # sampler handle -> group of a running H_root sample
        self.root_queue: deque[PromptGroup] = deque()
        self.root_clock: dict[int, int] = {}  # group -> logical time after its H_root sample
        # speculation (rollout.speculate): rows a pending decision may confirm, run before it
        self.spec: dict[int, RowState] = {}  # id(row) -> a speculative row not yet adopted
        self.spec_children: dict[tuple[int, int], list[RowState]] = {}  # (id(parent), turn) -> children
        # group -> row_id -> a fresh row (global or fill) not made yet; its decisions wait aside
        self.spec_fresh: dict[int, dict[int, RowState]] = {}
        # id(row) -> id(fresh row) whose start its clock counts from: a fresh row not made yet and
        # the branches started on it; their decisions wait in spec_events until it is made
        self.anchor: dict[int, int] = {}
        self.spec_events: dict[int, list[tuple[int, int, TurnOutcome]]] = {}  # id(row) -> (time, fork time, outcome)
        self.dropped: set[int] = set()  # id(row) of the speculative rows dropped
        # every row given a clock, kept alive so that no id() key above is reused in this rollout
        # (a released probe or a dropped row would otherwise free its id for a new row)
        self.seen: list[RowState] = []
        self.dropped_tokens = 0
        self.adopt_at = 0  # logical start of the fresh rows being made (after a probe, or a fill)
        # tool grace (`_tool_grace`): the mean step time, the first step that may wait, counters
        self.step_seconds: float | None = None  # the mean step time (a running mean)
        self.grace_from = 0
        self.grace_waits = self.grace_timeouts = 0

    # ---------------------------------------------------------------- bookkeeping

    def _clock_from(self, s: RowState, at: int) -> None:
        """Start `s`'s logical clock at `at` (and keep `s` alive: the scheduler's state is keyed by id)."""
        self.clock[id(s)] = at
        self.seen.append(s)

    def _now(self, s: RowState) -> int:
        """The logical time of `s`'s next token (running rows: counting this segment so far)."""
        t = self.clock[id(s)]
        return t + self.batch.generated(s.row) if s.row in self.running else t

    def _admit_new(self, g: PromptGroup, at: int) -> None:
        """Queue the rows of `g` made since the last look (branches, fills, post-probe rows),
        their clocks starting at `at`."""
        for s in ([g.probe] if g.probe is not None else []) + g.rows:
            if id(s) not in self.clock:
                self._clock_from(s, at)
                if not s.finished:
                    self.ready.append(s)

    def _live(self, g: PromptGroup) -> list[RowState]:
        """Rows of `g` that may still take a decision: unfinished rows and speculative ones."""
        rows = [s for s in g.rows if not s.finished]
        # a speculative fresh row's clock (and its branches') counts only from when it is made
        return rows + [s for s in self.spec.values() if s.group == g.index and not s.finished
                       and id(s) not in self.anchor]

    # ---------------------------------------------------------------- main loop

    def run(self) -> None:
        for g in self.st.groups:
            if g.root is not None:  # AEPO's H_root sample, beside the probe
                self.roots[g.root] = g
                self.root_queue.append(g)
            self._admit_new(g, 0)
            if self.speculate and (g.probe is not None or self.st.branching):
                self._speculate_fresh(g)
        # several steps' calls may be in flight at once; each batch runs its calls concurrently
        with ThreadPoolExecutor(max_workers=TOOL_BATCHES, thread_name_prefix="aepo-tools") as pool:
            while True:
                self._collect_tools(block=False)
                self._settle()
                self._admit()
                if self.batch.active:
                    self.st.round = self.batch.steps
                    start = perf_counter()
                    ended = self.batch.step()
                    seconds = perf_counter() - start
                    self.step_seconds = seconds if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * seconds
                    for handle, gen in ended:
                        if handle in self.roots:
                            self._root_ended(self.roots.pop(handle), gen)
                        else:
                            self._segment_ended(self.running.pop(handle), gen)
                    submitted = None
                    if self.step_calls:  # the step's calls in one tool_fn call, run concurrently
                        rows, actions = zip(*self.step_calls)
                        submitted = pool.submit(self.agent._run_tools, list(actions))
                        self.tools.append((submitted, list(rows)))
                        self.step_calls = []
                    self._early_decisions()
                    if submitted is not None:
                        self._tool_grace(submitted)
                elif self.tools:
                    self._collect_tools(block=True)
                elif not self.ready and not self.root_queue:
                    self._settle()  # rows _admit ended at their budget may let a prompt fill
                    self._admit()
                    if not self.batch.active and not self.ready and not self.root_queue:
                        break

    def _tool_grace(self, submitted: Future) -> None:
        """Give the step's tool calls up to one step's time (a running mean) before the next step:
        calls that answer within a step rejoin at the next one, as the logical schedule has it
        (on a CPU the calls otherwise compete with the decode for the cores). A call that takes
        longer runs beside the decode, and grace pauses for `TOOL_GRACE_BACKOFF` steps, so slow
        tools (a web search) cost the batch at most one step's wait in that many."""
        if self.batch.steps < self.grace_from:
            return
        self.grace_waits += 1
        done, _ = wait([submitted], timeout=self.step_seconds)
        if not done:
            self.grace_timeouts += 1
            self.grace_from = self.batch.steps + TOOL_GRACE_BACKOFF

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
            if s.awaiting_decision and self.batch.generated(handle) >= n:  # an engine step may return several
                s.awaiting_decision = False
                entropy = self.agent.segment_entropy(self.batch.entropies(handle)[:n])
                outcome = TurnOutcome(s, s.response_len, entropy, True, None)  # type: ignore[arg-type]
                self._event(s, self.clock[id(s)] + n - 1, self.clock[id(s)], outcome)

    def _event(self, s: RowState, time: int, fork_time: int, outcome: TurnOutcome) -> None:
        """A decision measured at logical `time`; its branches' clocks start at `fork_time`
        (the parent's first token after the tool result). A probe's measurements only feed
        H_tool (a mean), so they are taken at once."""
        if s.probe:
            self.st.on_tool_feedback(self.st.groups[s.group], outcome)
            return
        self.waiting_events[id(s)] = self.waiting_events.get(id(s), 0) + 1
        if id(s) in self.anchor:  # on a fresh row not made yet: the logical time is not known
            self.spec_events.setdefault(id(s), []).append((time, fork_time, outcome))
            return
        heapq.heappush(self.events.setdefault(s.group, []),
                       (time, s.traj.row_id, id(outcome), (fork_time, outcome)))

    def _admit(self) -> None:
        while self.root_queue and self.batch.free > 0:
            g = self.root_queue.popleft()
            self.batch.start(g.root, self.cfg.n_probe, RowKey(2, g.index, 0))
        budget = self.cfg.max_response_tokens
        if self.speculate and len(self.ready) > self.batch.free:
            self.ready = deque(sorted(self.ready, key=self._start_order))
        while self.ready and self.batch.free > 0:
            s = self.ready.popleft()
            if s.finished:
                continue
            if s.response_len >= budget:
                s.finish("length")
                self._drop_children_of(s)
                continue
            self.running[s.row] = s
            self.batch.start(s.row, budget - s.response_len, stream_key(s))

    def _start_order(self, s: RowState) -> tuple[int, int]:
        """Which ready rows a full batch starts first under speculation: the trees' own rows,
        then speculative fresh rows (nearly always made: 91% on the demo), then speculative
        branches (made only when their decision branches: 6%), each earliest logical clock
        first. Without speculation rows start in the order they became ready (clock order was
        no better there). No token changes, only when it is sampled (benchmarks/RESULTS.md,
        "Continuous batching, fifth round")."""
        kind = 0 if id(s) not in self.spec else 1 if s.stream is None else 2
        return kind, self.clock[id(s)]

    def _segment_ended(self, s: RowState, gen: Any) -> None:
        """`Agent.step`'s handling of one row's finished segment, for this row alone."""
        self.clock[id(s)] += len(gen.token_ids)
        if id(s) not in self.spec:  # a speculative row's counts once it is made (`_adopt`)
            self.max_clock = max(self.max_clock, self.clock[id(s)])
        outcome = self.agent._record_segment(s, gen)
        if self.agent.end_segment(s, outcome, gen):
            action = outcome.action
            if action.kind == "malformed":  # its error result needs no tool
                self._tool_results([s], self.agent._run_tools([action]))
            else:
                self.step_calls.append((s, action))
        if outcome.follows_tool:  # a segment shorter than n_probe: measured at its end
            n = len(gen.token_ids)
            self._event(s, self.clock[id(s)] - 1, self.clock[id(s)] - n, outcome)

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
            if id(s) in self.dropped:
                continue
            self.agent._append_result(s, call)
            if not s.finished:
                self.ready.append(s)
                if self._may_branch(s):
                    self._speculate_children(s)

    # ---------------------------------------------------------------- speculation

    def _may_branch(self, s: RowState) -> bool:
        """Whether speculation starts the branches of `s`'s tool result: a row of its prompt, a
        speculative branch (its children's stream keys follow from its own), or a fresh row
        while the prompt probes (it may become a global row); not a fill (it takes the prompt's
        whole remaining budget, so it never branches)."""
        if not (self.speculate and self.st.branching) or s.probe:
            return False
        if id(s) not in self.spec or s.stream is not None:  # a row of the trees, or a branch
            return True
        return self.st.groups[s.group].probe is not None

    def _speculate_children(self, s: RowState) -> None:
        """Start the Z branches a decision on this tool result may make, at the fork point."""
        g = self.st.groups[s.group]
        turn = s.n_tool_calls
        kids = []
        for z in range(min(self.cfg.branch_children, g.budget_left)):
            child = fork_row_state(self.st.sampler, s, s.response_len, row_id=-1)
            child.stream = branch_stream(stream_key(s), turn, z)
            self.st._live.add(child.row)
            self.spec[id(child)] = child
            self._clock_from(child, self.clock[id(s)])
            if id(s) in self.anchor:
                self.anchor[id(child)] = self.anchor[id(s)]
            self.ready.append(child)
            kids.append(child)
        if kids:
            self.spec_children[(id(s), turn)] = kids

    def _speculate_fresh(self, g: PromptGroup) -> None:
        """Start every fresh row the prompt may still make, one per row_id not yet taken: AEPO's
        global rows (beside the probe) and the fills of a tree that ends with budget left. A
        fresh row's stream depends on its row_id alone, so the one a fill makes as row r is the
        one started here; it is dropped once a branch takes r. Clocks are rebased when made."""
        first = len(g.rows) if g.probe is None else (1 if self.cfg.reuse_probe else 0)
        rows = {}
        for row_id in range(first, g.n):
            s = self.st.new_global(g, row_id=row_id)
            self.spec[id(s)] = s
            self._clock_from(s, 0)
            self.anchor[id(s)] = id(s)
            self.ready.append(s)
            rows[row_id] = s
        self.spec_fresh[g.index] = rows

    def _prune_fresh(self, g: PromptGroup) -> None:
        """Drop the speculative fresh rows whose row_id the prompt has given to another row."""
        fresh = self.spec_fresh.get(g.index, {})
        for row_id in [r for r in fresh if r < len(g.rows)]:
            self._drop(fresh.pop(row_id))

    def adopt_child(self, parent: RowState, position: int, z: int, row_id: int) -> RowState | None:
        """The speculative branch z of `parent` at `position`, now row `row_id` (None: none)."""
        turn = parent.traj.tool_results_before(position)
        kids = self.spec_children.get((id(parent), turn))
        if not kids or z >= len(kids):
            return None
        child = kids[z]
        kids[z] = None  # type: ignore[call-overload]
        self._adopt(child, row_id, 0)
        return child

    def adopt_global(self, g: PromptGroup, row_id: int) -> RowState | None:
        """The speculative fresh row `row_id` of a prompt making its global rows (its probe
        just ended) or a fill, if any; its clock starts at `adopt_at`."""
        s = self.spec_fresh.get(g.index, {}).pop(row_id, None)
        if s is not None:
            self._adopt(s, row_id, self.adopt_at)
        return s

    def _adopt(self, s: RowState, row_id: int, shift: int) -> None:
        """Make a speculative row a row of its prompt: its row_id (branches) or its clock
        (fresh rows, `shift`), its decisions queued with their logical times."""
        del self.spec[id(s)]
        s.traj.row_id = row_id
        for (parent, _), kids in self.spec_children.items():  # its own branches, started before
            if parent == id(s):
                for kid in kids:
                    if kid is not None:
                        kid.traj.parent_row_id = kid.parent = row_id
        heap = self.events.setdefault(s.group, [])
        heap[:] = [(t, row_id, k, v) if v[1].state is s else (t, r, k, v) for t, r, k, v in heap]
        for f in [f for f in (s, *self.spec.values()) if self.anchor.get(id(f)) == id(s)]:
            del self.anchor[id(f)]  # a fresh row made, and the branches started on it
            self.clock[id(f)] += shift
            for time, fork_time, outcome in self.spec_events.pop(id(f), []):
                heap.append((time + shift, f.traj.row_id, id(outcome), (fork_time + shift, outcome)))
        heapq.heapify(heap)
        self.max_clock = max(self.max_clock, self.clock[id(s)])

    def _drop(self, s: RowState) -> None:
        """Forget a speculative row no decision made: its tokens, its slot, its decisions."""
        self.spec.pop(id(s), None)
        self.dropped.add(id(s))
        self.dropped_tokens += sum(s.traj.response_mask[s.traj.branch_position or 0:])
        if s.row in self.running:
            self.dropped_tokens += self.batch.generated(s.row)
            del self.running[s.row]
        if any(r is s for r in self.ready):
            self.ready = deque(r for r in self.ready if r is not s)
        heap = self.events.get(s.group)
        if heap:
            self.events[s.group] = [e for e in heap if e[3][1].state is not s]
            heapq.heapify(self.events[s.group])
        self.waiting_events.pop(id(s), None)
        self.spec_events.pop(id(s), None)
        self.anchor.pop(id(s), None)
        s.finished = True
        self.st._release_state(s)
        self._drop_children_of(s)

    def _drop_children_of(self, s: RowState, turn: int | None = None) -> None:
        for key in [k for k in self.spec_children if k[0] == id(s) and (turn is None or k[1] == turn)]:
            for child in self.spec_children.pop(key):
                if child is not None:
                    self._drop(child)

    # ---------------------------------------------------------------- decisions

    def _settle(self) -> None:
        """Take every decision that can no longer be preceded, let each prompt finish its probe
        or fill (`end_turn`), and free the rows nobody can fork any more."""
        for g in self.st.groups:
            if g.probe is not None:
                self.adopt_at = max(self.clock[id(g.probe)], self.root_clock.get(g.index, 0))
                self.st.end_turn(g)
                if g.probe is not None:
                    continue  # while m is unknown, no decision of the prompt is taken
                self._admit_new(g, self.adopt_at)
                self._prune_fresh(g)
                for s in self.spec_fresh.get(g.index, {}).values():
                    self._drop_children_of(s)  # the rest can only be fills, which never branch
            while True:
                heap = self.events.get(g.index)
                while heap:
                    horizon = min((self._now(s) for s in self._live(g)), default=None)
                    if horizon is not None and heap[0][0] >= horizon:
                        break
                    _, _, _, (fork_time, outcome) = heapq.heappop(heap)
                    s = outcome.state
                    self.st.on_tool_feedback(g, outcome)
                    self.waiting_events[id(s)] -= 1
                    turn = s.traj.tool_results_before(outcome.segment_start)
                    self._drop_children_of(s, turn)
                    self._admit_new(g, fork_time)
                    self._prune_fresh(g)
                    heap = self.events.get(g.index)
                if heap or g.budget_left == 0 or any(not s.finished for s in g.rows):
                    break
                # the prompt's rows ended with budget left: a fill (`end_turn`); fresh rows that
                # ran speculatively may come with decisions measured already (the next pass)
                self.adopt_at = max([self.clock[id(s)] for s in g.rows], default=0)
                rows = len(g.rows)
                self.st.end_turn(g)
                if len(g.rows) == rows:
                    break  # a strategy that does not fill
                self._admit_new(g, self.adopt_at)
                self._prune_fresh(g)
            for s in g.rows:
                if s.finished and not self.waiting_events.get(id(s)):
                    self.st._release_state(s)

    def close(self) -> None:
        """Hand the sampler back without a running batch (a later rollout opens its own)."""
        close = getattr(self.st.sampler, "close_batch", None)
        if close is not None:
            close()

    def stats(self) -> dict[str, Any]:
        """Scheduling counters: steps of the batch, rows per step, the logical critical path,
        tokens spent on speculative rows that no decision made, the tool-grace waits and how
        many of them ran out (`_tool_grace`), and the batch's own counters (`stats`; the torch
        batch's peak cache in GiB among them)."""
        b = self.batch
        return {"scheduler": "continuous", "decode_steps": b.steps + getattr(self.st.sampler, "steps", 0),
                "mean_active_rows": b.row_steps / b.steps if b.steps else 0.0,
                "logical_steps": self.max_clock, "speculative_dropped_tokens": self.dropped_tokens,
                "tool_grace_waits": self.grace_waits, "tool_grace_timeouts": self.grace_timeouts, **b.stats()}


def stream_key(s: RowState) -> tuple[int, ...]:
    """A row's stream key: a branch's `branch_stream`, else (kind, prompt, row_id) (`RowKey`)."""
    if s.stream is not None:
        return s.stream
    return RowKey(1 if s.probe else 0, s.group, s.traj.row_id)


def branch_stream(parent: Sequence[int], turn: int, z: int) -> tuple[int, ...]:
    """The stream key of branch z of the row whose key is `parent`, forked after its tool call
    `turn`: the parent's key, then (turn, 4 + z). It follows the tree's shape alone, so it is
    known before any row_id on the way is: a branch samples the same tokens whether it started
    at its decision or speculatively before it, also when its parent is itself speculative."""
    return (*parent, turn, 4 + z)
