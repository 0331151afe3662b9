"""Rollout strategies (docs/algorithms.md section 3): independent, ARPO and AEPO.

Every strategy rolls out all prompts of a batch together (the active rows of every prompt
share each `sampler.generate` call) and returns exactly `cfg.n` trajectories per prompt, one
group, with row_id 0..n-1. They differ only in which rows exist:

- independent: n global rows.
- arpo: m global rows; after each tool call the segment that follows the new result is
  measured (H_now), dH = H_now - H_init of the chain, and the chain branches by the
  `rollout.branch_decision` rule on alpha + beta dH (l = 0) while the prompt's budget lasts;
  finished prompts are filled with global rows.
- aepo: m chosen per prompt by entropy pre-monitoring; branching by the same rule on
  (alpha + gamma dH)(1 - lambda l), l = consecutive branched tool steps.
- random: ARPO's tree with every decision a coin of probability rollout.random_branch_p (the
  control for "does branching on dH beat branching anywhere?").

Both use `branch_decision` (threshold / released / sample). Every decision is observable: each
row's `Trajectory.decisions` lists the decisions on its chain and `Trajectory.m` its prompt's
global budget; `stats()["decisions"]` logs every decision of the batch.

Add a strategy with `@register_strategy("name")` on a `RolloutStrategy` subclass.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aepo.registry import Registry
from aepo.rollout.agent import Agent, RowState, ToolFn, TurnOutcome, fork_row_state
from aepo.rollout.branching import (
    BRANCH_DECISIONS,
    aepo_branch_probability,
    aepo_global_budget,
    arpo_branch_probability,
    branch_decision,
    default_global_budget,
)
from aepo.rollout.config import SCHEDULERS, RolloutConfig
from aepo.rollout.sampler.streams import row_uniform
from aepo.rollout.scheduler import ContinuousScheduler, branch_stream, stream_key, supports_continuous
from aepo.types import Generation, Sampler, Trajectory

__all__ = [
    "BRANCH_DECISIONS",
    "STRATEGIES",
    "AepoRollout",
    "ArpoRollout",
    "IndependentRollout",
    "PromptGroup",
    "RandomBranchRollout",
    "RolloutStrategy",
    "aepo_branch_probability",
    "aepo_global_budget",
    "arpo_branch_probability",
    "branch_decision",
    "default_global_budget",
    "get_strategy",
    "register_strategy",
    "rollout",
    "strategy_names",
]

STRATEGIES: Registry[type[RolloutStrategy]] = Registry("rollout strategy")


def register_strategy(name: str) -> Callable[[type[RolloutStrategy]], type[RolloutStrategy]]:
    """Class decorator: make a RolloutStrategy subclass available as `rollout.strategy=name`."""

    def deco(cls: type[RolloutStrategy]) -> type[RolloutStrategy]:
        STRATEGIES.register(name, cls, same=lambda old, new: False)  # a name is taken once
        cls.name = name
        return cls

    return deco


def strategy_names() -> list[str]:
    return STRATEGIES.names()


def get_strategy(name: str) -> type[RolloutStrategy]:
    """The strategy class registered as `name`; ValueError listing the valid names otherwise."""
    return STRATEGIES.get(name)


class _Draw:
    """A `random.Random` stand-in whose `random()` is one given number: a decision's own draw
    under the continuous scheduler (`row_uniform` of the prompt, row and tool call)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


# ----------------------------------------------------------------------------- per-prompt state


@dataclass
class PromptGroup:
    """The rows of one prompt and its budget bookkeeping."""

    index: int
    prompt_id: str
    prompt_ids: list[int]
    n: int
    base_row: int
    rows: list[RowState] = field(default_factory=list)  # in row_id order
    m: int = 0
    branches: int = 0
    l_values: list[int] = field(default_factory=list)  # l used at each branch decision
    l_prompt: int = 0  # the single per-prompt l of penalty_scope="prompt"
    new_rows_this_round: bool = False  # a branch or fill row was made this round (penalty_scope="prompt")
    probe: RowState | None = None  # AEPO probe while it runs
    root: int | None = None  # sampler row of AEPO's H_root sample while the continuous scheduler runs it
    probe_tool_entropies: list[float] = field(default_factory=list)
    h_root: float | None = None
    h_tool: float | None = None

    @property
    def budget_left(self) -> int:
        return self.n - len(self.rows)

    @property
    def probing(self) -> bool:
        return self.probe is not None

    def active(self) -> list[RowState]:
        if self.probe is not None:
            return [] if self.probe.finished else [self.probe]
        return [s for s in self.rows if not s.finished]


# ----------------------------------------------------------------------------- base strategy


class RolloutStrategy:
    """Drives an `Agent` over a batch of prompts; subclasses choose the initial rows and the
    branch decision taken after each tool call."""

    name = ""
    branching = False  # whether a decision after a tool result may fork the row (speculation)

    def __init__(
        self, sampler: Sampler, tokenizer: Any, tool_fn: ToolFn, cfg: RolloutConfig, rng: random.Random
    ) -> None:
        if cfg.n < 1:
            raise ValueError(f"rollout.n must be >= 1, got {cfg.n}")
        if cfg.branch_children < 1:
            raise ValueError(f"rollout.branch_children must be >= 1, got {cfg.branch_children}")
        if not 0 <= cfg.initial_rollouts <= cfg.n:
            raise ValueError(f"rollout.initial_rollouts must be in [0, rollout.n={cfg.n}], got {cfg.initial_rollouts}")
        if cfg.branch_decision not in BRANCH_DECISIONS:
            raise ValueError(
                f"rollout.branch_decision must be one of {', '.join(BRANCH_DECISIONS)}, got {cfg.branch_decision!r}"
            )
        self.sampler = sampler
        self.cfg = cfg
        self.rng = rng
        self.agent = Agent(sampler, tokenizer, tool_fn, cfg)
        self.groups: list[PromptGroup] = []
        self.decisions: list[dict[str, Any]] = []
        self.fills: list[dict[str, int]] = []  # {"round", "prompt", "rows"} per fill
        self.round = 0  # the index of the current round (one agent step for every active row)
        self._live: set[int] = set()
        self.scheduler: ContinuousScheduler | None = None
        if cfg.scheduler not in SCHEDULERS:
            raise ValueError(f"rollout.scheduler must be one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}")
        if cfg.scheduler == "continuous" and not supports_continuous(sampler):
            raise ValueError(f"rollout.scheduler=continuous needs a sampler with a running batch (the vllm "
                             f"backend, or the torch backend on a Llama-family model); "
                             f"{type(sampler).__name__} has none: use rollout.scheduler=turns")

    def continuous(self) -> bool:
        """Whether this rollout runs on the continuous scheduler (`aepo.rollout.scheduler`,
        `rollout.scheduler=continuous`) rather than in turns."""
        return self.scheduler is not None or self.cfg.scheduler == "continuous"

    # -------------------------------------------------------------- sampler rows

    def _fork(self, row: int, position: int | None = None) -> int:
        handle = self.sampler.fork(row, position)
        self._live.add(handle)
        return handle

    def _release(self, row: int) -> None:
        if row in self._live:
            self._live.discard(row)
            self.sampler.release(row)

    def _release_state(self, s: RowState) -> None:
        if not s.released:
            s.released = True
            self._release(s.row)

    def new_global(self, g: PromptGroup, row_id: int | None = None) -> RowState:
        """A fresh row from the prompt (forked from the prompt's base row), or the continuous
        scheduler's speculative row of that row_id (`rollout.speculate`)."""
        row_id = len(g.rows) if row_id is None else row_id
        if self.scheduler is not None and (row := self.scheduler.adopt_global(g, row_id)) is not None:
            return row
        traj = Trajectory(prompt_id=g.prompt_id, row_id=row_id, prompt_ids=list(g.prompt_ids))
        return RowState(row=self._fork(g.base_row), group=g.index, traj=traj)

    def start_globals(self, g: PromptGroup, count: int) -> None:
        for _ in range(min(count, g.budget_left)):
            g.rows.append(self.new_global(g))

    def branch(self, g: PromptGroup, parent: RowState, position: int) -> list[int]:
        """Up to Z children of `parent` at response offset `position`, within the budget."""
        made = []
        turn = parent.traj.tool_results_before(position)
        for z in range(min(self.cfg.branch_children, g.budget_left)):
            child = None
            if self.scheduler is not None:  # a branch already running speculatively
                child = self.scheduler.adopt_child(parent, position, z, row_id=len(g.rows))
            if child is None:
                child = fork_row_state(self.sampler, parent, position, row_id=len(g.rows))
            child.stream = branch_stream(stream_key(parent), turn, z)
            # the chain's decisions up to the branch point (the one that forks it included),
            # as the child inherits the tool calls up to there, and its l as this decision left
            # it (a speculative child was forked before the decision was taken)
            child.traj.decisions = [dict(d) for d in parent.traj.decisions if d["turn"] <= turn]
            child.l = parent.l
            self._live.add(child.row)
            g.rows.append(child)
            made.append(child.traj.row_id)
        if made:
            g.branches += 1
            g.new_rows_this_round = True
        return made

    # -------------------------------------------------------------- hooks

    def begin(self, groups: list[PromptGroup]) -> None:
        """Create the first rows of every prompt."""
        raise NotImplementedError

    def on_tool_feedback(self, g: PromptGroup, outcome: TurnOutcome) -> None:
        """Called for each segment that follows a new tool result (the branch decision point)."""

    def end_turn(self, g: PromptGroup) -> None:
        """After a turn: fill a prompt whose rows all finished while budget remains."""
        if not g.probing and not g.active() and g.budget_left > 0:
            rows = g.budget_left
            self.start_globals(g, rows)
            g.new_rows_this_round = True
            self.fills.append({"round": self.round, "prompt": g.index, "rows": rows})

    def end_round(self) -> None:
        """After every prompt's `end_turn` of a round."""

    # -------------------------------------------------------------- main loop

    def run(self, prompts: Sequence[tuple[str, Sequence[int]]]) -> tuple[list[Trajectory], dict[str, Any]]:
        """Roll out every prompt; exactly cfg.n trajectories per prompt, grouped in input order."""
        for i, item in enumerate(prompts):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"prompts[{i}] must be a (prompt_id, prompt_ids) pair, got {item!r}")
            if len(item[1]) == 0:
                raise ValueError(f"prompts[{i}] ({item[0]!r}) has no prompt tokens")
        try:
            self.groups = []
            for i, (pid, ids) in enumerate(prompts):
                handle = self.sampler.new_row(list(ids))
                self._live.add(handle)
                self.groups.append(PromptGroup(i, str(pid), list(ids), self.cfg.n, handle))
            if self.continuous():
                self.scheduler = ContinuousScheduler(self, self.cfg.max_active_rows)
            self.begin(self.groups)
            self.round = 0
            if self.scheduler is not None:
                self.scheduler.run()
            else:
                self.run_turns()
        finally:
            for handle in list(self._live):
                self._release(handle)
            if self.scheduler is not None:
                self.scheduler.close()
        trajectories = []
        for g in self.groups:
            if len(g.rows) != g.n:  # an invariant of the budget accounting
                raise RuntimeError(f"prompt {g.prompt_id!r} ended with {len(g.rows)} rows, expected {g.n}")
            for s in g.rows:
                self.agent.finalize_text(s)
                s.traj.m = g.m
                trajectories.append(s.traj)
        return trajectories, self.stats()

    def run_turns(self) -> None:
        """The turn scheduler: one `Agent.step` (one generate call) for every active row of
        every prompt per round; decisions, fills and releases after each round."""
        while True:
            active = [s for g in self.groups for s in g.active()]
            if not active:
                break
            for outcome in self.agent.step(active):
                if outcome.follows_tool:
                    self.on_tool_feedback(self.groups[outcome.state.group], outcome)
            for g in self.groups:
                self.end_turn(g)
                for s in g.rows:
                    if s.finished:
                        self._release_state(s)
            self.end_round()
            for g in self.groups:
                g.new_rows_this_round = False
            self.round += 1

    def stats(self) -> dict[str, Any]:
        """Batch statistics of the rollout (docs/algorithms.md section 3.3 item 3)."""
        rows = [s.traj for g in self.groups for s in g.rows]
        all_l = [l for g in self.groups for l in g.l_values]
        unique = [len({tuple(s.traj.response_ids) for s in g.rows}) for g in self.groups]
        return {
            "strategy": self.name,
            "m": [g.m for g in self.groups],
            "branches": sum(g.branches for g in self.groups),
            "branches_per_prompt": [g.branches for g in self.groups],
            "l_values": [list(g.l_values) for g in self.groups],
            "mean_l": sum(all_l) / len(all_l) if all_l else 0.0,
            "tool_calls_per_row": sum(t.n_tool_calls for t in rows) / len(rows) if rows else 0.0,
            "finish_reasons": dict(Counter(t.finish_reason for t in rows)),
            "rows_per_prompt": [len(g.rows) for g in self.groups],
            "unique_rows": sum(unique) / len(unique) if unique else 0.0,
            "h_root": [g.h_root for g in self.groups],
            "h_tool": [g.h_tool for g in self.groups],
            "decisions": list(self.decisions),
            "fills": list(self.fills),
            "generate_calls": self.agent.generate_calls,
            "tool_fn_calls": self.agent.tool_fn_calls,
            **self.schedule_stats(rows),
        }

    def schedule_stats(self, rows: list[Trajectory]) -> dict[str, Any]:
        """How the rollout was scheduled: `decode_steps` (sampling steps of the batch, prefill
        steps included), `mean_active_rows` (tokens per step), `critical_path_tokens` (the most
        model tokens of any row, inherited prefix included)."""
        out: dict[str, Any] = {
            "scheduler": "continuous" if self.scheduler is not None else "turns",
            "critical_path_tokens": max((sum(t.response_mask) for t in rows), default=0),
        }
        if self.scheduler is not None:
            out.update(self.scheduler.stats())
        else:
            steps, row_steps = getattr(self.sampler, "steps", None), getattr(self.sampler, "row_steps", None)
            if steps is not None:
                out["decode_steps"] = steps
                out["mean_active_rows"] = row_steps / steps if steps else 0.0
        return out

    def decide(
        self, g: PromptGroup, s: RowState, outcome: TurnOutcome, coef: float, penalty: float, l: int
    ) -> tuple[float, bool, int]:
        """The branch decision for `s` at `outcome` (the segment after a new tool result) by the
        `rollout.branch_decision` rule -> (p, branched, budget_left). Records it on the row's
        trajectory (`Trajectory.decisions`) before any fork, so a child inherits it."""
        return self._decide_with(g, s, outcome, self.cfg.branch_decision, self.cfg.branch_alpha, coef, penalty, l)

    def _decide_with(
        self, g: PromptGroup, s: RowState, outcome: TurnOutcome, rule: str, alpha: float, coef: float,
        penalty: float = 0.0, l: int = 0,
    ) -> tuple[float, bool, int]:
        delta_h = outcome.entropy - s.h_init
        budget_left = g.budget_left
        # the tool-call index of the decision: the results before the measured segment (the
        # turn's own tool call, if the segment made one, already ran and is not counted)
        turn = s.traj.tool_results_before(outcome.segment_start)
        rng = self.rng
        if self.scheduler is not None:  # its own draw, whatever order the decisions come in
            rng = _Draw(row_uniform(self.scheduler.decision_seed, (3, g.index, s.traj.row_id), turn))
        p, wants = branch_decision(rule, alpha, coef, delta_h, penalty, l, self.cfg.branch_tau, rng)
        branched = bool(wants and budget_left > 0)
        s.traj.decisions.append({
            "dH": float(delta_h), "l": int(l), "p": float(p), "branched": branched,
            "turn": turn, "row_id": s.traj.row_id,
        })
        return p, branched, budget_left

    def _log_decision(
        self, g: PromptGroup, s: RowState, outcome: TurnOutcome, p: float, l: int, budget_left: int,
        children: list[int],
    ) -> None:
        self.decisions.append({
            "prompt": g.index, "row_id": s.traj.row_id, "round": self.round, "position": outcome.segment_start,
            "turn": s.traj.decisions[-1]["turn"], "rule": self.cfg.branch_decision,
            "h_init": s.h_init, "h_now": outcome.entropy, "dH": outcome.entropy - s.h_init,
            "p": p, "l": l, "budget_left": budget_left, "branched": bool(children), "children": children,
        })


@register_strategy("independent")
class IndependentRollout(RolloutStrategy):
    """n independent rows per prompt (GRPO, DAPO, ...)."""

    def begin(self, groups: list[PromptGroup]) -> None:
        for g in groups:
            g.m = g.n
            self.start_globals(g, g.n)


@register_strategy("arpo")
class ArpoRollout(RolloutStrategy):
    """ARPO entropy-based adaptive branching (docs/algorithms.md section 3.2), with the released defects
    fixed: H_init belongs to the chain, dH is measured after the new tool result."""

    branching = True

    def begin(self, groups: list[PromptGroup]) -> None:
        for g in groups:
            g.m = default_global_budget(self.cfg)
            self.start_globals(g, g.m)

    def on_tool_feedback(self, g: PromptGroup, outcome: TurnOutcome) -> None:
        s = outcome.state
        if s.probe:
            return
        p, branched, budget_left = self.decide(g, s, outcome, self.cfg.branch_beta, 0.0, 0)
        children = self.branch(g, s, outcome.segment_start) if branched else []
        self._log_decision(g, s, outcome, p, 0, budget_left, children)


@register_strategy("aepo")
class AepoRollout(RolloutStrategy):
    """AEPO dynamic entropy-balanced rollout (docs/algorithms.md section 3.3): entropy pre-monitoring sets
    m per prompt; branching is penalised after consecutive branched tool steps."""

    branching = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.cfg.penalty_scope not in ("chain", "prompt"):
            raise ValueError(
                f"rollout.penalty_scope must be 'chain' or 'prompt', got {self.cfg.penalty_scope!r}"
            )

    # -------------------------------------------------------------- pre-monitoring

    def begin(self, groups: list[PromptGroup]) -> None:
        if not self.cfg.premonitor:
            for g in groups:
                g.m = default_global_budget(self.cfg)
                self.start_globals(g, g.m)
            return
        # H_root: one short sample per prompt, all prompts in one generate call; the continuous
        # scheduler runs them as rows of its batch beside the probes (`root_sampled`)
        roots = [self._fork(g.base_row) for g in groups]
        if self.continuous():
            for g, handle in zip(groups, roots):
                g.root = handle
        else:
            for g, handle, gen in zip(groups, roots, self.agent.generate(roots, self.cfg.n_probe)):
                self.root_sampled(g, gen)
                self._release(handle)
        # One probe trajectory per prompt, run to completion before m is chosen.
        for g in groups:
            g.probe = self.new_global(g, row_id=0)
            g.probe.probe = True

    def root_sampled(self, g: PromptGroup, gen: Generation) -> None:
        """H_root from the prompt's root sample (its first n_probe token entropies)."""
        g.h_root = self.agent.segment_entropy(gen.entropies[: self.cfg.n_probe])

    def _finish_probe(self, g: PromptGroup) -> None:
        probe = g.probe
        assert probe is not None
        g.probe = None
        ents = g.probe_tool_entropies
        g.h_tool = sum(ents) / len(ents) if ents else g.h_root
        g.m = aepo_global_budget(g.n, g.h_root, g.h_tool, self.cfg.beta_pm, self.cfg.m_compat)
        if self.cfg.reuse_probe:
            g.rows.append(probe)  # row_id 0, one of the m global rows
            self.start_globals(g, g.m - 1)
        else:
            self._release_state(probe)
            self.start_globals(g, g.m)

    def end_turn(self, g: PromptGroup) -> None:
        if g.probe is not None:
            if not g.probe.finished or g.h_root is None:
                return
            self._finish_probe(g)
            if self.scheduler is not None:
                # rows started speculatively may have ended already: the continuous scheduler
                # fills only once their decisions are taken
                return
        super().end_turn(g)

    # -------------------------------------------------------------- branching

    def on_tool_feedback(self, g: PromptGroup, outcome: TurnOutcome) -> None:
        s = outcome.state
        if s.probe:
            g.probe_tool_entropies.append(outcome.entropy)
            return
        cfg = self.cfg
        per_prompt = cfg.penalty_scope == "prompt"
        l = g.l_prompt if per_prompt else s.l
        p, branched, budget_left = self.decide(g, s, outcome, cfg.branch_gamma, cfg.branch_penalty, l)
        # chain scope: a branched step extends the chain's run of consecutive branches, any other
        # step resets it; set before forking so the children start with the chain's new l.
        # Prompt scope changes l only at the end of the round (`end_round`).
        s.l = l + 1 if branched else 0
        children = self.branch(g, s, outcome.segment_start) if branched else []
        g.l_values.append(l)
        self._log_decision(g, s, outcome, p, l, budget_left, children)

    def end_round(self) -> None:
        """penalty_scope="prompt", the released counter (docs/algorithms.md section 3.3 item 2):
        one l per prompt, read by every decision of a round and updated once after it. When the
        round made any new row in the batch (a branch or a fill), each prompt's l becomes l + 1 if
        that prompt got new rows (fills count) and 0 otherwise; a round without new rows anywhere
        leaves every l as it was."""
        if self.cfg.penalty_scope != "prompt" or not any(g.new_rows_this_round for g in self.groups):
            return
        for g in self.groups:
            g.l_prompt = g.l_prompt + 1 if g.new_rows_this_round else 0


@register_strategy("random")
class RandomBranchRollout(ArpoRollout):
    """The random-branch control (docs/algorithms.md section 3.4): ARPO's tree (m global rows,
    a decision after every tool result, fills) with each decision a coin of probability
    rollout.random_branch_p, whatever dH is. dH is still measured and logged."""

    def on_tool_feedback(self, g: PromptGroup, outcome: TurnOutcome) -> None:
        s = outcome.state
        if s.probe:
            return
        p = self.cfg.random_branch_p
        # the "sample" rule with a constant score: alpha = p, no entropy term, no penalty
        _, branched, budget_left = self._decide_with(g, s, outcome, "sample", p, 0.0)
        children = self.branch(g, s, outcome.segment_start) if branched else []
        self._log_decision(g, s, outcome, p, 0, budget_left, children)


def rollout(
    strategy: str,
    prompts: Sequence[tuple[str, Sequence[int]]],
    sampler: Sampler,
    tokenizer: Any,
    tool_fn: ToolFn,
    cfg: RolloutConfig,
    rng: random.Random,
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Roll out `prompts` ((prompt_id, prompt_ids) pairs) with the named strategy.

    Returns exactly cfg.n trajectories per prompt (grouped in input order, row_id 0..n-1) and
    the batch statistics (m, branches, l values, tool calls per row, finish reasons, rows per
    prompt, unique rows, decisions). Every sampler row it creates is released before returning.
    """
    cls = get_strategy(strategy)
    return cls(sampler, tokenizer, tool_fn, cfg, rng).run(prompts)
