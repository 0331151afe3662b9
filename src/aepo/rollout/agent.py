"""The per-row agent state machine shared by every rollout strategy.

One `Agent.step(rows)` is one turn for every active row of every prompt: a single
`sampler.generate` call continues all rows to their next stop string, each new segment is parsed
(answer / tool call / EOS / budget), and all tool calls of the turn go to a single `tool_fn`
call that may run them concurrently. Tool results are appended to the sampler row and to the
trajectory with response_mask 0, as token ids the run's tool format renders
(`rollout.tool_format`, `aepo.formats`). The strategies (independent, ARPO, AEPO) only decide
which rows exist; the protocol lives here.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aepo.algos.entropy import segment_entropy
from aepo.formats import get_format
from aepo.protocol import Action
from aepo.rollout.config import RolloutConfig
from aepo.types import Generation, Sampler, SegmentRecord, ToolCall, Trajectory

ToolFn = Callable[[list[tuple[str, str]]], list[ToolCall]]

__all__ = ["Agent", "RowState", "ToolFn", "TurnOutcome", "fork_row_state", "segment_entropy_value"]


def segment_entropy_value(
    entropies: Sequence[float], n_probe: int, vocab_size: int, compat: bool = False
) -> float:
    """Normalised entropy of one segment (docs/algorithms.md section 1): the sum of its first
    `n_probe` token entropies divided by log|V|, length-rescaled,

        H_seg = (n_probe / n) * sum_{t <= n} H_t / log|V|,  n = min(n_probe, len(entropies)),

    so a segment shorter than n_probe is not made calm by summing fewer tokens. `compat` gives
    the released code's value exactly: the plain sum over the first n_probe, no rescale (equal
    for segments of n_probe tokens or more). Empty segment -> 0."""
    reduce = "sum" if compat else "rescaled_sum"
    return float(segment_entropy(list(entropies), n_probe=n_probe, vocab_size=vocab_size, reduce=reduce))


@dataclass(eq=False)
class RowState:
    """One live chain: its sampler row, its growing Trajectory and the branching bookkeeping.

    `h_init` is the entropy of the chain's first model segment (a branch inherits its parent's);
    `l` counts the consecutive tool steps of the chain that branched (AEPO);
    `awaiting_decision` is set when a tool result was appended, so the segment the next turn
    generates is the one a branch decision is measured on.
    """

    row: int
    group: int
    traj: Trajectory
    h_init: float | None = None
    l: int = 0
    parent: int | None = None  # row_id of the parent chain, None for a global row
    awaiting_decision: bool = False
    probe: bool = False  # AEPO pre-monitoring probe: never branches
    # response offset where the model segment a paused `generate` call left open began
    open_start: int | None = None
    finished: bool = False
    released: bool = False
    # the continuous scheduler's stream key for a branch (`aepo.rollout.scheduler.branch_stream`)
    stream: tuple[int, ...] | None = None

    @property
    def response_len(self) -> int:
        return len(self.traj.response_ids)

    @property
    def n_tool_calls(self) -> int:
        return len(self.traj.tool_calls)

    @property
    def prompt_len(self) -> int:
        return len(self.traj.prompt_ids)

    def finish(self, reason: str) -> None:
        self.finished = True
        self.traj.finish_reason = reason


@dataclass
class TurnOutcome:
    """What one turn did to one row: the model segment it generated and how it ended."""

    state: RowState
    segment_start: int  # response offset where the new model segment starts
    entropy: float  # normalised segment entropy of the new segment
    follows_tool: bool  # the segment is the first one after a new tool result
    action: Action
    generation: Generation = field(repr=False, default=None)  # type: ignore[assignment]


def fork_row_state(
    sampler: Sampler, parent: RowState, position: int, row_id: int
) -> RowState:
    """A branch of `parent` that keeps its first `position` response tokens.

    The sampler row is forked at prompt_len + position (sharing the prefix cache), the
    trajectory prefix (tokens, masks, logprobs, entropies, segments and tool calls ending at or
    before `position`) is copied, and the chain bookkeeping (H_init, l) is inherited.
    """
    if not 0 <= position <= parent.response_len:
        raise ValueError(
            f"branch position {position} outside the parent's response of length {parent.response_len}"
        )
    p = parent.traj
    segments = [copy.copy(s) for s in p.segments if s.end <= position]
    n_tool_segments = sum(1 for s in segments if s.role == "tool")
    traj = Trajectory(
        prompt_id=p.prompt_id,
        row_id=row_id,
        prompt_ids=list(p.prompt_ids),
        response_ids=p.response_ids[:position],
        response_mask=p.response_mask[:position],
        logprobs=p.logprobs[:position],
        entropies=p.entropies[:position],
        segments=segments,
        tool_calls=[copy.copy(c) for c in p.tool_calls[:n_tool_segments]],
        parent_row_id=p.row_id,
        branch_position=position,
    )
    handle = sampler.fork(parent.row, parent.prompt_len + position)
    return RowState(
        row=handle, group=parent.group, traj=traj, h_init=parent.h_init, l=parent.l,
        parent=p.row_id, probe=False,
    )


class Agent:
    """Runs turns of the tool-use protocol for many rows at once (see module docstring)."""

    def __init__(self, sampler: Sampler, tokenizer: Any, tool_fn: ToolFn, cfg: RolloutConfig) -> None:
        if cfg.max_response_tokens < 1:
            raise ValueError(f"rollout.max_response_tokens must be >= 1, got {cfg.max_response_tokens}")
        if cfg.max_tool_calls < 0:
            raise ValueError(f"rollout.max_tool_calls must be >= 0, got {cfg.max_tool_calls}")
        if cfg.max_result_tokens < 0:
            raise ValueError(f"rollout.max_result_tokens must be >= 0, got {cfg.max_result_tokens}")
        if cfg.n_probe < 1:
            raise ValueError(f"rollout.n_probe must be >= 1, got {cfg.n_probe}")
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.tool_fn = tool_fn
        self.cfg = cfg
        self.format = get_format(cfg.tool_format)
        self.vocab_size = len(tokenizer)
        self.generate_calls = 0
        self.tool_fn_calls = 0

    # ------------------------------------------------------------------ helpers

    def segment_entropy(self, entropies: Sequence[float]) -> float:
        """Normalised segment entropy (length-rescaled sum, `segment_entropy_value`) under this
        rollout's n_probe / segment_entropy_compat settings."""
        return segment_entropy_value(
            entropies, self.cfg.n_probe, self.vocab_size, self.cfg.segment_entropy_compat
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(
        self, rows: Sequence[int], max_new_tokens: int | Sequence[int], pause: float = 0.0
    ) -> list[Generation]:
        """One sampler.generate call with the protocol's stop strings (counted); `pause` is
        passed to a sampler that can pause (`can_pause`, e.g. `TorchSampler.generate`)."""
        self.generate_calls += 1
        extra = {"pause": pause} if pause and getattr(self.sampler, "can_pause", False) else {}
        gens = self.sampler.generate(list(rows), max_new_tokens=max_new_tokens, stop=self.format.stop_strings(),
                                     **extra)
        if len(gens) != len(rows):
            raise ValueError(f"sampler.generate returned {len(gens)} generations for {len(rows)} rows")
        return gens

    def finalize_text(self, state: RowState) -> None:
        """Decode the full response into `traj.text` (a trailing EOS token string dropped)."""
        text = self.decode(state.traj.response_ids)
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos and state.traj.finish_reason == "eos" and text.endswith(eos):
            text = text[: -len(eos)]
        state.traj.text = text

    # ------------------------------------------------------------------ one turn

    def step(self, rows: Sequence[RowState]) -> list[TurnOutcome]:
        """One turn for `rows` (all prompts): generate, parse, run the tools, append results.

        Returns one TurnOutcome per row that generated, in order. Rows are finished with
        reason "answer", "eos", "length" or "max_tool_calls"; none is released here (branches
        may still fork them).
        """
        rows = list(rows)
        if len({id(s) for s in rows}) != len(rows) or len({s.row for s in rows}) != len(rows):
            raise ValueError("step() got the same row twice")
        for s in rows:
            if s.finished:
                raise ValueError(f"row {s.traj.row_id} of prompt {s.traj.prompt_id!r} is already finished")
        budget = self.cfg.max_response_tokens
        live = []
        for s in rows:
            if s.response_len >= budget:
                s.finish("length")
            else:
                live.append(s)
        if not live:
            return []
        gens = self.generate([s.row for s in live], [budget - s.response_len for s in live],
                             pause=self.cfg.pause_below)

        outcomes: list[TurnOutcome] = []
        pending: list[tuple[RowState, Action]] = []  # rows whose segment asks for a tool
        for s, gen in zip(live, gens):
            if gen.finish == "paused":  # the segment goes on in the next turn's batch
                if s.open_start is None:
                    s.open_start = s.response_len
                self._record_tokens(s, gen)
                continue
            outcome = self._record_segment(s, gen)
            outcomes.append(outcome)
            if self.end_segment(s, outcome, gen):
                pending.append((s, outcome.action))
        if pending:
            calls = self._run_tools([a for _, a in pending])
            for (s, _), call in zip(pending, calls):
                self._append_result(s, call)
        return outcomes

    def end_segment(self, s: RowState, outcome: TurnOutcome, gen: Generation) -> bool:
        """What a finished segment's action does to its row: an answer, EOS or the budget
        finishes it, and so does a tool call past max_tool_calls or the token budget. True when
        the row waits for a tool result (its call, well-formed or not, is `outcome.action`)."""
        action = outcome.action
        if action.kind == "answer":
            s.finish("answer")
        elif action.kind in ("tool", "malformed"):
            if s.n_tool_calls >= self.cfg.max_tool_calls:
                s.finish("max_tool_calls")
            elif s.response_len >= self.cfg.max_response_tokens:
                s.finish("length")
            else:
                return True
        else:
            s.finish(gen.finish if gen.finish in ("eos", "length") else "eos")
        return False

    def _record_tokens(self, s: RowState, gen: Generation) -> None:
        """Append a generation's tokens, log-probs and entropies to the row's trajectory."""
        n = len(gen.token_ids)
        if len(gen.logprobs) != n or len(gen.entropies) != n:
            raise ValueError(
                f"Generation for row {s.row} has {n} tokens, {len(gen.logprobs)} logprobs and "
                f"{len(gen.entropies)} entropies; they must match"
            )
        t = s.traj
        t.response_ids.extend(gen.token_ids)
        t.response_mask.extend([1] * n)
        t.logprobs.extend(float(x) for x in gen.logprobs)
        t.entropies.extend(float(x) for x in gen.entropies)

    def _record_segment(self, s: RowState, gen: Generation) -> TurnOutcome:
        """Record a finished model segment: with the tokens of the calls that paused it, if
        any, as one segment (its entropy, text and action are the whole segment's)."""
        t = s.traj
        start = len(t.response_ids) if s.open_start is None else s.open_start
        self._record_tokens(s, gen)
        if s.open_start is not None:
            gen = Generation(token_ids=t.response_ids[start:], logprobs=t.logprobs[start:],
                             entropies=t.entropies[start:], finish=gen.finish, stop=gen.stop)
            s.open_start = None
        text = self.decode(gen.token_ids)
        entropy = self.segment_entropy(gen.entropies)
        t.segments.append(SegmentRecord("model", start, len(t.response_ids), entropy, text))
        if s.h_init is None:
            s.h_init = entropy
        follows_tool = s.awaiting_decision
        s.awaiting_decision = False
        action = self.format.parse_action(text, gen.finish)
        return TurnOutcome(s, start, entropy, follows_tool, action, gen)

    def _run_tools(self, actions: Sequence[Action]) -> list[ToolCall]:
        """Results for the turn's actions: one tool_fn call for the well-formed ones, error
        results for malformed ones; a tool_fn that raises gives error results, not a crash."""
        results: list[ToolCall | None] = [None] * len(actions)
        wanted = [(i, a) for i, a in enumerate(actions) if a.kind == "tool"]
        for i, a in enumerate(actions):
            if a.kind == "malformed":
                results[i] = ToolCall(name=a.tag or "", argument=a.argument, result=a.error, ok=False)
        if wanted:
            calls = [(a.tag or "", a.argument) for _, a in wanted]
            self.tool_fn_calls += 1
            try:
                got = list(self.tool_fn(calls))
                if len(got) != len(calls):
                    raise ValueError(f"tool_fn returned {len(got)} results for {len(calls)} calls")
            except Exception as e:  # noqa: BLE001 - a tool failure is shown to the model, never a crash
                got = [
                    ToolCall(name=n, argument=arg, result=f"Error: {type(e).__name__}: {e}", ok=False)
                    for n, arg in calls
                ]
            for (i, _), call in zip(wanted, got):
                results[i] = call
        return [r for r in results if r is not None]

    def _append_result(self, s: RowState, call: ToolCall) -> None:
        """Append the escaped, truncated, wrapped tool result to the row (mask 0).

        When the wrapper does not fit in the response budget the row ends with reason
        "length" and nothing is appended: the call is left without a result.
        """
        remaining = self.cfg.max_response_tokens - s.response_len
        got = self.format.result_ids(self.tokenizer, str(call.result), remaining, self.cfg.max_result_tokens)
        if got is None:
            s.finish("length")
            return
        ids, text = got
        self.sampler.append(s.row, ids)
        t = s.traj
        start = len(t.response_ids)
        k = len(ids)
        t.response_ids.extend(ids)
        t.response_mask.extend([0] * k)
        t.logprobs.extend([0.0] * k)
        t.entropies.extend([0.0] * k)
        t.segments.append(SegmentRecord("tool", start, start + k, None, self.decode(ids)))
        seen = copy.copy(call)  # every field of the call, its result as the model saw it
        seen.result = text
        t.tool_calls.append(seen)
        if s.response_len >= self.cfg.max_response_tokens:
            s.finish("length")
        else:
            s.awaiting_decision = True
