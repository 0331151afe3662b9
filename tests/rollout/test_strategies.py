"""Rollout strategies: budget accounting, branching formulas and bookkeeping, pre-monitoring."""
from __future__ import annotations

import math
import random
import re

import pytest
from scripted_sampler import CharTokenizer, FakeTools, PausingSampler, Reply, ScriptedSampler, nats

from aepo.config import RolloutConfig
from aepo.rollout import rollout
from aepo.rollout.agent import Agent, segment_entropy_value
from aepo.rollout.strategies import (
    BRANCH_DECISIONS,
    RolloutStrategy,
    aepo_branch_probability,
    aepo_global_budget,
    arpo_branch_probability,
    branch_decision,
    default_global_budget,
    get_strategy,
    register_strategy,
    strategy_names,
)

TOK = CharTokenizer()


class FixedRng(random.Random):
    """random() returns the given values in turn (then repeats the last); records each draw."""

    def __init__(self, values):
        super().__init__(0)
        self.values, self.drawn = list(values), []

    def random(self):
        v = self.values[min(len(self.drawn), len(self.values) - 1)]
        self.drawn.append(v)
        return v


def seg(h_seg, n_probe=20):
    """Per-token entropy (nats) that makes a segment's entropy `h_seg` under n_probe: the
    length-rescaled sum (docs/algorithms.md section 1) of any segment of constant per-token entropy
    H is n_probe * H / log|V|, whatever its length."""
    return nats(h_seg / n_probe, TOK)


def prompts_of(*texts):
    return [(f"p{i}", TOK.encode(t)) for i, t in enumerate(texts)]


def tool_chain(k_calls, entropy=0.3):
    """Every row makes `k_calls` searches (arguments vary with the draw) and then answers."""

    def script(ctx, draw):
        k = ctx.count("<result>")
        if k < k_calls:
            return Reply(f"<search>q{k}.{draw}</search>", nats(entropy, TOK))
        return Reply(f"<answer>a{draw}</answer>", nats(entropy, TOK))

    return script


def run(strategy, script, prompts, rng=None, tools=None, **cfg_kw):
    sampler = ScriptedSampler(TOK, script)
    cfg = RolloutConfig(**cfg_kw)
    trajs, stats = rollout(strategy, prompts, sampler, TOK, tools or FakeTools(), cfg, rng or random.Random(0))
    return trajs, stats, sampler


def check_invariants(trajs, stats, sampler, prompts, n):
    """Exactly n rows per prompt in row_id order, consistent masks, branch prefixes, rows released."""
    assert len(trajs) == n * len(prompts)
    assert stats["rows_per_prompt"] == [n] * len(prompts)
    for gi, (pid, pids) in enumerate(prompts):
        group = trajs[gi * n:(gi + 1) * n]
        assert [t.row_id for t in group] == list(range(n))
        assert all(t.prompt_id == pid and t.prompt_ids == pids for t in group)
        for t in group:
            assert len(t.response_ids) == len(t.response_mask) == len(t.logprobs) == len(t.entropies)
            for seg in t.segments:
                mask = t.response_mask[seg.start:seg.end]
                assert set(mask) <= ({1} if seg.role == "model" else {0})
            for i, m in enumerate(t.response_mask):
                if m == 0:
                    assert t.logprobs[i] == 0.0 and t.entropies[i] == 0.0
            assert sum(1 for s in t.segments if s.role == "tool") == t.n_tool_calls
            if t.parent_row_id is None:
                assert t.branch_position is None
                continue
            parent = group[t.parent_row_id]
            bp = t.branch_position
            assert t.parent_row_id < t.row_id
            # the fork point is right after one of the parent's tool results
            assert any(s.role == "tool" and s.end == bp for s in parent.segments)
            assert t.response_ids[:bp] == parent.response_ids[:bp]
            assert t.response_mask[:bp] == parent.response_mask[:bp]
            assert t.logprobs[:bp] == parent.logprobs[:bp] and t.entropies[:bp] == parent.entropies[:bp]
            n_tools = sum(1 for s in parent.segments if s.role == "tool" and s.end <= bp)
            assert [c.argument for c in t.tool_calls[:n_tools]] == [c.argument for c in parent.tool_calls[:n_tools]]
    # every row the strategy created is released exactly once
    created = [e[1] for e in sampler.log if e[0] == "new_row"] + [e[3] for e in sampler.log if e[0] == "fork"]
    released = [e[1] for e in sampler.log if e[0] == "release"]
    assert sorted(created) == sorted(released) and not sampler.live_rows
    branched_rows = sum(1 for t in trajs if t.parent_row_id is not None)
    assert stats["branches"] <= branched_rows
    assert sum(len(d["children"]) for d in stats["decisions"]) == branched_rows
    check_row_decisions(trajs, stats, prompts, n)


def prefix_tool_calls(t, position):
    return sum(1 for s in t.segments if s.role == "tool" and s.end <= position)


def check_row_decisions(trajs, stats, prompts, n):
    """Trajectory.m and Trajectory.decisions agree with the strategy's stats: every row carries
    its prompt's m; a row's own decisions (row_id == its row_id) are exactly the logged ones;
    a branch's list starts with its parent's decisions up to the branch point, the last of which
    is the parent's branched decision at that tool call."""
    own = []
    for gi in range(len(prompts)):
        group = trajs[gi * n:(gi + 1) * n]
        for t in group:
            assert t.m == stats["m"][gi]
            for d in t.decisions:
                assert set(d) == {"dH", "l", "p", "branched", "turn", "row_id"}
            turns = [d["turn"] for d in t.decisions]
            assert turns == sorted(set(turns))  # one decision per tool call of the chain, in order
            mine = [d for d in t.decisions if d["row_id"] == t.row_id]
            inherited = t.decisions[:len(t.decisions) - len(mine)]
            assert t.decisions[len(inherited):] == mine  # inherited ones first
            for d in mine:  # a decision follows a tool result the row holds
                assert 1 <= d["turn"] <= t.n_tool_calls
            if t.parent_row_id is None:
                assert inherited == []
            else:
                parent = group[t.parent_row_id]
                assert inherited == parent.decisions[:len(inherited)]
                last = inherited[-1]
                assert last["row_id"] == t.parent_row_id and last["branched"] is True
                assert last["turn"] == prefix_tool_calls(t, t.branch_position)
                assert len(inherited) == sum(1 for d in parent.decisions if d["turn"] <= last["turn"])
            own += [(gi, d["row_id"], d["turn"], d["dH"], d["l"], d["p"], d["branched"]) for d in mine]
    logged = [(d["prompt"], d["row_id"], d["turn"], d["dH"], d["l"], d["p"], d["branched"])
              for d in stats["decisions"]]
    assert sorted(own) == sorted(logged)
    assert sum(1 for *_, branched in own if branched) == stats["branches"]


# ----------------------------------------------------------------------------- registry and formulas


def test_registry():
    assert {"independent", "arpo", "aepo"} <= set(strategy_names())
    with pytest.raises(ValueError, match="unknown rollout strategy 'nope'; valid: independent, arpo, aepo"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("arpo")(type("Dup", (RolloutStrategy,), {}))


def test_branch_probability_formulas():
    assert arpo_branch_probability(0.5, 0.2, 0.3) == pytest.approx(0.56)
    assert arpo_branch_probability(0.5, 0.2, -3.0) == 0.0  # 0.5 - 0.6 clipped
    assert arpo_branch_probability(0.5, 0.2, 3.0) == 1.0  # 1.1 clipped
    assert aepo_branch_probability(0.5, 0.2, 0.3, 0.05, 0) == pytest.approx(0.56)
    assert aepo_branch_probability(0.5, 0.2, 0.3, 0.05, 2) == pytest.approx(0.56 * 0.9)
    assert aepo_branch_probability(0.5, 0.2, 0.3, 0.05, 25) == 0.0  # (1 - 1.25) < 0
    assert aepo_branch_probability(1.0, 1.0, 0.5, 0.05, 0) == 1.0


@pytest.mark.parametrize(
    "n, h_root, h_tool, beta_pm, m, m_compat",
    [
        (8, 0.6, 0.2, 0.5, 4, 5),  # 8 * sigmoid(0.2) = 4.3987
        (12, 0.2, 0.6, 0.5, 5, 6),  # 12 * sigmoid(-0.2) = 5.4020
        (5, 0.4, 0.4, 0.5, 3, 3),  # 2.5 rounds half-up; int(2.5) + 1 = 3
        (4, 0.4, 0.4, 0.5, 2, 3),  # exactly 2; the released +1 gives 3
        (8, 0.0, 1.0, 20.0, 1, 1),  # 8 * 2e-9 -> 0 -> clamped to 1
        (8, 1.0, 0.0, 20.0, 8, 8),  # 7.99999998 -> 8; int() + 1 = 8
        (1, 0.9, 0.1, 0.5, 1, 1),
    ],
)
def test_global_budget_formula(n, h_root, h_tool, beta_pm, m, m_compat):
    assert aepo_global_budget(n, h_root, h_tool, beta_pm) == m
    assert aepo_global_budget(n, h_root, h_tool, beta_pm, compat=True) == m_compat


def test_global_budget_rejects_bad_n_and_default_m():
    with pytest.raises(ValueError, match="n must be >= 1"):
        aepo_global_budget(0, 0.1, 0.2, 0.5)
    assert default_global_budget(RolloutConfig(n=8)) == 4
    assert default_global_budget(RolloutConfig(n=8, initial_rollouts=3)) == 3
    assert default_global_budget(RolloutConfig(n=1)) == 1


# ----------------------------------------------------------------------------- budget accounting

BRANCHING = [
    ("arpo", {"branch_decision": "sample"}),
    ("arpo", {"branch_decision": "threshold"}),
    ("aepo", {"branch_decision": "sample"}),
    ("aepo", {"branch_decision": "threshold", "branch_tau": 0.5}),
    ("aepo", {"branch_decision": "sample", "premonitor": False}),
    ("aepo", {"branch_decision": "sample", "reuse_probe": False, "penalty_scope": "prompt"}),
]


def mixed_script(ctx, draw):
    """Prompt A: three tool calls; B: answers at once; C: every other draw answers."""
    k = ctx.count("<result>")
    if ctx.startswith("B") or (ctx.startswith("C") and draw % 2 == 0):
        return Reply(f"<answer>b{draw}</answer>", nats(0.4, TOK))
    if k < 3:
        return Reply(f"<search>{ctx[0]}{k}.{draw}</search>", nats(0.2 + 0.2 * k, TOK))
    return Reply(f"<answer>{draw}</answer>", nats(0.1, TOK))


@pytest.mark.parametrize("strategy, extra", BRANCHING)
@pytest.mark.parametrize("always", [True, False])
@pytest.mark.parametrize("z", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_exactly_n_rows_per_prompt(strategy, extra, always, z, n):
    prompts = prompts_of("A?", "B?", "C?")
    # alpha 1 with no entropy term: P = 1 (every draw branches); alpha 0: P = 0 (none does)
    knobs = {"branch_alpha": 1.0 if always else 0.0, "branch_beta": 0.0, "branch_gamma": 0.0, "branch_penalty": 0.0}
    trajs, stats, sampler = run(strategy, mixed_script, prompts, n=n, branch_children=z, **knobs, **extra)
    check_invariants(trajs, stats, sampler, prompts, n)
    for d in stats["decisions"]:
        assert d["branched"] == (always and d["budget_left"] > 0)
        if d["branched"]:
            assert len(d["children"]) == min(z, d["budget_left"])
    if not always:
        assert stats["branches"] == 0 and all(t.parent_row_id is None for t in trajs)
    assert stats["branches_per_prompt"][1] == 0  # prompt B never calls a tool
    assert sum(stats["finish_reasons"].values()) == 3 * n


def test_every_draw_branches_fills_budget_from_the_tree():
    # one global row, P = 1, Z = 2: the first decision forks two children (budget 3 left)
    trajs, stats, sampler = run("arpo", tool_chain(3), prompts_of("Q"), n=4, initial_rollouts=1,
                                branch_alpha=1.0, branch_beta=0.0, branch_children=2, branch_decision="sample")
    check_invariants(trajs, stats, sampler, prompts_of("Q"), 4)
    assert [(t.row_id, t.parent_row_id) for t in trajs] == [(0, None), (1, 0), (2, 0), (3, 0)]
    assert stats["branches"] == 2 and stats["m"] == [1]


def test_rows_finishing_early_are_filled_with_global_rows():
    # no tool calls at all: no decision can happen, the m = 2 rows finish and 3 fill rows follow
    trajs, stats, sampler = run("arpo", lambda ctx, draw: f"<answer>{draw}</answer>", prompts_of("Q"), n=5,
                                branch_alpha=1.0, branch_beta=0.0)
    check_invariants(trajs, stats, sampler, prompts_of("Q"), 5)
    assert stats["m"] == [2] and stats["branches"] == 0 and stats["decisions"] == []
    assert [len(call) for call in sampler.generate_calls] == [2, 3]
    assert stats["unique_rows"] == 5.0 and stats["finish_reasons"] == {"answer": 5}


# ----------------------------------------------------------------------------- turns, forks, release


def test_one_generate_call_per_turn_for_all_rows_of_all_prompts():
    prompts = prompts_of("A", "B")
    _, _, sampler = run("independent", tool_chain(2), prompts, n=2)
    assert [len(call) for call in sampler.generate_calls] == [4, 4, 4]
    # ARPO, n=3, m=1, P=1 (hand-traced): turn 1 row0; turn 2 row0 (decides: fork row1);
    # turn 3 row0 (decides: fork row2, answers) + row1; turn 4 row1 (no budget) + row2.
    trajs, stats, sampler = run("arpo", tool_chain(2), prompts, n=3, initial_rollouts=1,
                                branch_alpha=1.0, branch_beta=0.0, branch_decision="sample")
    assert [len(call) for call in sampler.generate_calls] == [2, 2, 4, 4]
    assert stats["generate_calls"] == 4
    for call in sampler.generate_calls:
        rows = [r for r, _ in call]
        assert len(set(rows)) == len(rows)
    forks = [e for e in sampler.log if e[0] == "fork"]
    # base rows are 0 and 1; globals are forked from them with no position; branches at a position
    seg0 = len(TOK.encode("<search>q0.0</search>"))
    res0 = len(TOK.encode("<result>\nfound q0.0\n</result>"))
    seg1 = len(TOK.encode("<search>q1.0</search>"))
    res1 = len(TOK.encode("<result>\nfound q1.0\n</result>"))
    branch_forks = [e for e in forks if e[2] is not None]
    prompt_len = len(TOK.encode("A"))
    assert [e[2] for e in branch_forks] == [prompt_len + seg0 + res0] * 2 + [prompt_len + seg0 + res0 + seg1 + res1] * 2
    assert [t.branch_position for t in trajs] == [None, seg0 + res0, seg0 + res0 + seg1 + res1] * 2
    check_invariants(trajs, stats, sampler, prompts, 3)


def test_rows_released_when_the_sampler_fails():
    def script(ctx, draw):
        if ctx.count("<result>") == 1 and draw == 1:
            raise RuntimeError("device lost")
        return tool_chain(2)(ctx, draw)

    sampler = ScriptedSampler(TOK, script)
    with pytest.raises(RuntimeError, match="device lost"):
        rollout("arpo", prompts_of("Q"), sampler, TOK, FakeTools(),
                RolloutConfig(n=4, branch_alpha=1.0, branch_beta=0.0), random.Random(0))
    assert not sampler.live_rows


@pytest.mark.parametrize("kw, message", [
    ({"n": 0}, "rollout.n"), ({"branch_children": 0}, "branch_children"),
    ({"n": 2, "initial_rollouts": 3}, "initial_rollouts"),
    ({"branch_decision": "coin"}, "branch_decision"), ({"penalty_scope": "batch"}, "penalty_scope"),
])
def test_bad_config_is_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        run("aepo", tool_chain(1), prompts_of("Q"), **kw)


def test_bad_prompts_are_rejected():
    with pytest.raises(ValueError, match="no prompt tokens"):
        run("arpo", tool_chain(1), [("p0", [])])
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        run("arpo", tool_chain(1), [("p0",)])


# ----------------------------------------------------------------------------- ARPO: dH and H_init


def entropy_script(first, after):
    """First segment: entropy `first`; after the k-th result: entropy after[k-1]."""

    def script(ctx, draw):
        k = ctx.count("<result>")
        h = first if k == 0 else after[k - 1]
        text = f"<search>s{k}.{draw}</search>" if k < len(after) else f"<answer>{draw}</answer>"
        return Reply(text, seg(h))

    return script


@pytest.mark.parametrize("draw, branches", [(0.69, True), (0.71, False)])
def test_arpo_dh_measured_on_the_segment_after_the_new_result(draw, branches):
    # H_init = 0.2 (first segment); the segment after result 1 has 0.9, after result 2 has 0.0.
    # Decision 1: P = clip(0 + 1 * (0.9 - 0.2)) = 0.7 (the released defect would use dH = 0).
    rng = FixedRng([draw, 0.99])
    trajs, stats, sampler = run("arpo", entropy_script(0.2, [0.9, 0.0]), prompts_of("Q"), rng=rng,
                                n=2, initial_rollouts=1, branch_alpha=0.0, branch_beta=1.0, branch_decision="sample")
    first = stats["decisions"][0]
    assert first["row_id"] == 0 and first["h_init"] == pytest.approx(0.2, abs=1e-6)
    assert first["h_now"] == pytest.approx(0.9, abs=1e-6) and first["p"] == pytest.approx(0.7, abs=1e-6)
    assert first["branched"] is branches
    assert rng.drawn[0] == draw
    second = stats["decisions"][1]
    assert second["row_id"] == 0 and second["p"] == 0.0  # 0.0 - 0.2 < 0
    assert (trajs[1].parent_row_id == 0) is branches
    check_invariants(trajs, stats, sampler, prompts_of("Q"), 2)


def test_h_init_is_per_chain_and_does_not_leak_across_prompts_or_calls():
    def script(ctx, draw):
        k = ctx.count("<result>")
        first = {"A": 0.1, "B": 0.7}[ctx[0]]
        # a branch's own first segment (draw 1 after result 1) is very calm: it must not become H_init
        h = first if k == 0 else (0.05 if (k == 1 and draw > 0) else 0.5)
        text = f"<search>{ctx[0]}{k}.{draw}</search>" if k < 3 else "<answer>x</answer>"
        return Reply(text, seg(h))

    for order in (("A", "B"), ("B", "A")):  # a second call with the prompts in other slots
        prompts = prompts_of(*order)
        trajs, stats, sampler = run("arpo", script, prompts, n=3, initial_rollouts=1,
                                    branch_alpha=1.0, branch_beta=0.0, branch_decision="sample")
        check_invariants(trajs, stats, sampler, prompts, 3)
        for d in stats["decisions"]:
            expected = {"A": 0.1, "B": 0.7}[order[d["prompt"]]]
            assert d["h_init"] == pytest.approx(expected, abs=1e-6)  # children inherit the root's
        child_decisions = [d for d in stats["decisions"] if d["row_id"] > 0]
        assert child_decisions  # branches made decisions of their own


# ----------------------------------------------------------------------------- AEPO: l counter


def replay_l(decisions, trajs_by_prompt, scope, penalty, tau, fills=()):
    """Independent replay of the consecutive-branch counter from the decision log. Chain scope:
    l per chain, updated at each decision. Prompt scope (the released counter): l per prompt,
    read by every decision of a round, updated after the round when the batch made new rows
    (l + 1 for a prompt that branched or was filled in the round, else 0)."""
    chain_l: dict[tuple[int, int], int] = {}
    prompt_l: dict[int, int] = {}
    rounds = sorted({d["round"] for d in decisions} | {f["round"] for f in fills})
    for r in rounds:
        made = set()
        for d in (d for d in decisions if d["round"] == r):
            key = (d["prompt"], d["row_id"])
            expected = prompt_l.get(d["prompt"], 0) if scope == "prompt" else chain_l.get(key, 0)
            assert d["l"] == expected, d
            assert d["p"] == pytest.approx(max(0.0, 1.0 - penalty * expected))
            assert d["branched"] == (d["budget_left"] > 0 and d["p"] > tau)
            new_l = expected + 1 if d["branched"] else 0
            chain_l[key] = new_l
            if d["branched"]:
                made.add(d["prompt"])
            for c in d["children"]:
                chain_l[(d["prompt"], c)] = new_l  # a child starts with its parent's l at the fork
                assert trajs_by_prompt[d["prompt"]][c].parent_row_id == d["row_id"]
        made |= {f["prompt"] for f in fills if f["round"] == r}
        if made:
            for prompt in range(len(trajs_by_prompt)):
                prompt_l[prompt] = prompt_l.get(prompt, 0) + 1 if prompt in made else 0


@pytest.mark.parametrize("scope", ["chain", "prompt"])
def test_aepo_consecutive_branch_counter(scope):
    # P = 1 * (1 - 0.3 l): l=0 -> 1, l=1 -> 0.7 (both > tau 0.5), l=2 -> 0.4 (no branch, reset)
    prompts = prompts_of("A", "B")
    n = 10
    trajs, stats, sampler = run(
        "aepo", tool_chain(6), prompts, n=n, premonitor=False, initial_rollouts=1, branch_alpha=1.0,
        branch_gamma=0.0, branch_penalty=0.3, branch_decision="threshold", branch_tau=0.5, penalty_scope=scope,
    )
    check_invariants(trajs, stats, sampler, prompts, n)
    by_prompt = [trajs[i * n:(i + 1) * n] for i in range(2)]
    replay_l(stats["decisions"], by_prompt, scope, 0.3, 0.5, stats["fills"])
    root = [d["l"] for d in stats["decisions"] if d["prompt"] == 0 and d["row_id"] == 0]
    assert root[:3] == [0, 1, 2]  # consecutive branches, then a reset
    if scope == "chain":
        assert root[3] == 0
        # row 1 was forked by the root's first (l=0) branch: its chain starts at l = 1
        assert next(d["l"] for d in stats["decisions"] if d["prompt"] == 0 and d["row_id"] == 1) == 1
    assert stats["l_values"][0] == [d["l"] for d in stats["decisions"] if d["prompt"] == 0]
    all_l = [d["l"] for d in stats["decisions"]]
    assert stats["mean_l"] == pytest.approx(sum(all_l) / len(all_l))


def test_prompt_scope_counter_is_read_per_round_and_counts_fills():
    """The released counter: one l per prompt, the same for every decision of a round, updated
    once after it; a fill counts as new rows; a round without new rows leaves l as it was."""
    # P = 1 * (1 - 0.3 l) > 0.5 branches at l = 0 and 1. Two global rows decide in one round.
    kw = dict(premonitor=False, branch_alpha=1.0, branch_gamma=0.0, branch_penalty=0.3,
              branch_decision="threshold", branch_tau=0.5, penalty_scope="prompt")
    _, stats, _ = run("aepo", tool_chain(3), prompts_of("A"), n=8, initial_rollouts=2, **kw)
    first = [d for d in stats["decisions"] if d["row_id"] in (0, 1)]
    r0 = first[0]["round"]
    same_round = [d for d in first if d["round"] == r0]
    assert [d["l"] for d in same_round] == [0, 0]  # per decision it would be [0, 1]
    assert all(d["branched"] for d in same_round)
    assert all(d["l"] == 1 for d in stats["decisions"] if d["round"] == r0 + 1)

    # the first row answers at once, is filled by two rows that search: the fill round sets l = 1,
    # the round of their searches (no new rows) keeps it, so their decisions see l = 1
    def script(ctx, draw):
        k = ctx.count("<result>")
        if k == 0 and draw == 0:
            return Reply("<answer>x</answer>", nats(0.3, TOK))
        return Reply(f"<search>q{k}.{draw}</search>" if k < 1 else "<answer>y</answer>", nats(0.3, TOK))

    _, stats, _ = run("aepo", script, prompts_of("A"), n=3, initial_rollouts=1, **kw)
    assert stats["fills"] == [{"round": 0, "prompt": 0, "rows": 2}]
    assert [d["l"] for d in stats["decisions"]] == [1, 1]
    assert [d["p"] for d in stats["decisions"]] == [pytest.approx(0.7), pytest.approx(0.7)]
    _, chain, _ = run("aepo", script, prompts_of("A"), n=3, initial_rollouts=1, **{**kw, "penalty_scope": "chain"})
    assert [d["l"] for d in chain["decisions"]] == [0, 0]


def test_aepo_sample_decision_uses_a_bernoulli_draw():
    # P = (0.5 + 0.2 * (0.8 - 0.3)) * (1 - 0.05 * 0) = 0.6 for the first decision
    rng = FixedRng([0.59, 0.61, 0.99])
    _, stats, _ = run("aepo", entropy_script(0.3, [0.8, 0.8, 0.8]), prompts_of("Q"), rng=rng, n=3,
                      premonitor=False, initial_rollouts=1, branch_decision="sample", branch_alpha=0.5)
    d0 = stats["decisions"][0]
    assert d0["p"] == pytest.approx(0.6, abs=1e-6) and d0["branched"] and d0["l"] == 0
    # second decision of the root chain: l = 1, P = 0.6 * 0.95 = 0.57 < draw 0.61
    root = [d for d in stats["decisions"] if d["row_id"] == 0]
    assert root[1]["l"] == 1 and root[1]["p"] == pytest.approx(0.57, abs=1e-6) and not root[1]["branched"]
    assert rng.drawn[:2] == [0.59, 0.61]


# ----------------------------------------------------------------------------- AEPO: pre-monitoring


PM_N_PROBE = 4  # n_probe of the pre-monitoring tests


def premonitor_script(ctx, draw):
    """A: H_root 0.6, probe tool segments 0.3 and 0.1 (H_tool 0.2). B: probe answers at once.
    Segment entropies under n_probe = PM_N_PROBE."""
    k = ctx.count("<result>")
    if ctx.startswith("B"):
        return Reply(f"<answer>b{draw}</answer>", seg(0.6 if draw == 0 else 0.45, PM_N_PROBE))
    if k == 0:
        return Reply(f"<search>a.{draw}</search>", seg(0.6 if draw == 0 else 0.5, PM_N_PROBE))
    if k == 1:
        return Reply(f"<search>b.{draw}</search>", seg(0.3, PM_N_PROBE))
    return Reply(f"<answer>{draw}</answer>", seg(0.1, PM_N_PROBE))


def base_forks_between_generates(sampler, base_row):
    """How many rows were forked from `base_row` before each generate call (and after the last)."""
    counts, current = [], 0
    for e in sampler.log:
        if e[0] == "fork" and e[1] == base_row:
            current += 1
        elif e[0] == "generate":
            counts.append(current)
            current = 0
    return [c for c in counts[1:] + [current]]


@pytest.mark.parametrize("compat, m_a, m_b", [(False, 4, 4), (True, 5, 5)])
def test_aepo_premonitor_sets_m_and_reuses_the_probe(compat, m_a, m_b):
    prompts = prompts_of("A", "B")
    n, n_probe = 8, PM_N_PROBE
    trajs, stats, sampler = run("aepo", premonitor_script, prompts, n=n, n_probe=n_probe, beta_pm=0.5,
                                m_compat=compat, branch_alpha=0.0, branch_gamma=0.0)
    check_invariants(trajs, stats, sampler, prompts, n)
    assert stats["h_root"] == pytest.approx([0.6, 0.6], abs=1e-6)
    assert stats["h_tool"] == pytest.approx([0.2, 0.6], abs=1e-6)  # B made no tool call: H_tool = H_root
    assert stats["m"] == [m_a, m_b]
    # the root probe: one short generate call for all prompts, n_probe tokens each
    assert sampler.generate_calls[0] == [(2, n_probe), (3, n_probe)]
    assert 2 in sampler.released and 3 in sampler.released
    # the probe trajectory is row 0; the other m - 1 global rows start once it has finished
    assert trajs[0].text.startswith("<search>a.1</search>") and trajs[0].finish_reason == "answer"
    assert trajs[n].text == "<answer>b1</answer>"
    # prompt A: probe fork; m - 1 globals after the probe; then the fill of n - m rows
    counts_a = [c for c in base_forks_between_generates(sampler, 0) if c]
    assert counts_a == [1, m_a - 1, n - m_a]


def test_aepo_probe_thrown_away_without_reuse_probe():
    prompts = prompts_of("A")
    n = 6
    trajs, stats, sampler = run("aepo", premonitor_script, prompts, n=n, n_probe=PM_N_PROBE, reuse_probe=False,
                                branch_alpha=0.0, branch_gamma=0.0)
    check_invariants(trajs, stats, sampler, prompts, n)
    m = aepo_global_budget(n, 0.6, 0.2, 0.5)
    assert stats["m"] == [m] == [3]
    assert all(not t.text.startswith("<search>a.1</search>") for t in trajs)  # the probe's own text
    assert [c for c in base_forks_between_generates(sampler, 0) if c] == [1, m, n - m]


def test_aepo_without_premonitor_uses_initial_rollouts():
    trajs, stats, sampler = run("aepo", premonitor_script, prompts_of("A", "B"), n=6, n_probe=PM_N_PROBE,
                                premonitor=False,
                                initial_rollouts=2, branch_alpha=0.0, branch_gamma=0.0)
    assert stats["m"] == [2, 2] and stats["h_root"] == [None, None]
    assert [b for _, b in sampler.generate_calls[0]] == [256] * 4  # no short probe call
    check_invariants(trajs, stats, sampler, prompts_of("A", "B"), 6)


# ----------------------------------------------------------------------------- segment entropy scale


def test_segment_entropy_is_the_length_rescaled_sum():
    # docs/algorithms.md section 1: H_seg = (n_probe / n) * sum_{t <= n} H_t / log|V|, n = min(n_probe, len)
    log_v = math.log(len(TOK))
    agent = Agent(ScriptedSampler(TOK, tool_chain(0)), TOK, FakeTools(), RolloutConfig(n_probe=4))
    assert agent.segment_entropy([1.0, 2.0]) == pytest.approx((4 / 2) * 3.0 / log_v)  # short: rescaled
    assert agent.segment_entropy([1.0, 2.0, 3.0, 4.0, 50.0]) == pytest.approx(10.0 / log_v)  # cut at 4
    assert agent.segment_entropy([]) == 0.0
    compat = Agent(ScriptedSampler(TOK, tool_chain(0)), TOK, FakeTools(),
                   RolloutConfig(n_probe=4, segment_entropy_compat=True))
    assert compat.segment_entropy([1.0, 2.0]) == pytest.approx(3.0 / log_v)  # released: plain sum
    assert compat.segment_entropy([1.0, 2.0, 3.0, 4.0, 50.0]) == pytest.approx(10.0 / log_v)
    assert segment_entropy_value([0.5] * 30, 20, 100) == pytest.approx(10.0 / math.log(100))
    assert segment_entropy_value([0.5] * 5, 20, 100) == pytest.approx(10.0 / math.log(100))
    assert segment_entropy_value([0.5] * 5, 20, 100, compat=True) == pytest.approx(2.5 / math.log(100))


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("body, n_tokens", [("abcde", 7), ("y" * 30, 32)])
def test_rollout_records_segment_entropy_on_the_sum_scale(compat, body, n_tokens):
    # every token 0.05 of log|V|: the segment <answer>BODY</answer> (generation stops at the
    # closing tag) holds n_tokens * 0.05 summed; rescaled to n_probe = 20 tokens: 1.0
    trajs, _, _ = run("independent", lambda ctx, draw: Reply(f"<answer>{body}</answer>", nats(0.05, TOK)),
                      prompts_of("Q"), n=1, segment_entropy_compat=compat)
    (segment,) = trajs[0].segments
    assert segment.end - segment.start == n_tokens
    plain_sum = 0.05 * min(n_tokens, 20)
    assert segment.entropy == pytest.approx(plain_sum if compat else 1.0, abs=1e-6)


# ----------------------------------------------------------------------------- branch_decision rules


def test_threshold_rule_exact_boundary_and_no_draws():
    rng = FixedRng([0.0])
    # (alpha + coef dH)(1 - lambda l) > tau, strict: exactly tau does not branch
    assert branch_decision("threshold", 0.5, 0.2, 0.0, 0.05, 0, 0.5, rng) == (0.5, False)
    assert branch_decision("threshold", 0.25, 0.5, 0.5, 0.0, 0, 0.5, rng) == (0.5, False)  # 0.25 + 0.25
    p, b = branch_decision("threshold", 0.5, 0.2, 1e-9, 0.05, 0, 0.5, rng)
    assert b and p > 0.5
    # with l = 2 the penalty factor 0.9 moves the boundary to dH = (0.5 / 0.9 - 0.5) / 0.2 = 0.2778
    p, b = branch_decision("threshold", 0.5, 0.2, 0.25, 0.05, 2, 0.5, rng)
    assert p == pytest.approx(0.495) and not b
    p, b = branch_decision("threshold", 0.5, 0.2, 0.3, 0.05, 2, 0.5, rng)
    assert p == pytest.approx(0.504) and b
    # the score is not clipped: with tau >= 1 a large dH still branches
    assert branch_decision("threshold", 0.5, 0.2, 5.0, 0.0, 0, 1.2, rng) == (pytest.approx(1.5), True)
    assert rng.drawn == []  # deterministic given dH


@pytest.mark.parametrize("delta_h, branches", [(-0.1, False), (0.0, False), (1e-6, True), (0.3, True), (4.0, True)])
def test_threshold_rule_for_arpo_branches_exactly_when_dh_is_positive(delta_h, branches):
    assert branch_decision("threshold", 0.5, 0.2, delta_h, 0.0, 0, 0.5, random.Random(0))[1] is branches


def test_released_rule_against_an_independent_computation():
    cases = [(dh, l) for dh in (-2.0, -0.5, 0.0, 0.3, 1.0, 2.5) for l in (0, 1, 3, 6)] * 20
    rng, ref = random.Random(1234), random.Random(1234)
    branched = 0
    for dh, l in cases:
        p, b = branch_decision("released", 0.5, 0.2, dh, 0.05, l, 0.5, rng)
        u = ref.random()
        expected = (u + 0.2 * dh) * (1 - 0.05 * l)
        assert p == pytest.approx(expected, abs=1e-12) and b == (expected >= 0.5)
        branched += b
    assert 0 < branched < len(cases)  # U matters: neither always nor never
    # the boundary is inclusive (>=), and alpha plays no part
    assert branch_decision("released", 0.0, 0.5, 0.5, 0.0, 0, 0.5, FixedRng([0.25])) == (0.5, True)
    assert branch_decision("released", 9.0, 0.5, 0.5, 0.0, 0, 0.5, FixedRng([0.2]))[1] is False


@pytest.mark.parametrize("delta_h, l, p", [(0.5, 2, 0.54), (0.0, 0, 0.5), (-1.0, 0, 0.3)])
def test_sample_rule_frequency_matches_p(delta_h, l, p):
    rng = random.Random(7)
    draws = [branch_decision("sample", 0.5, 0.2, delta_h, 0.05, l, 0.5, rng) for _ in range(20000)]
    assert all(q == pytest.approx(p) for q, _ in draws)
    freq = sum(b for _, b in draws) / len(draws)
    assert abs(freq - p) < 0.015  # 4 sigma of a Bernoulli mean over 20000 draws


def test_sample_rule_clips_and_uses_one_draw_per_decision():
    rng = FixedRng([0.999, 0.0])
    assert branch_decision("sample", 0.5, 0.2, 10.0, 0.05, 0, 0.5, rng) == (1.0, True)
    assert branch_decision("sample", 0.5, 0.2, -10.0, 0.05, 0, 0.5, rng) == (0.0, False)
    assert rng.drawn == [0.999, 0.0]
    with pytest.raises(ValueError, match="branch_decision"):
        branch_decision("coin", 0.5, 0.2, 0.0, 0.0, 0, 0.5, rng)
    assert BRANCH_DECISIONS == ("threshold", "released", "sample")


def test_penalty_never_turns_into_a_bonus():
    # lambda l > 1: the factor is floored at 0, so a negative base cannot flip into a branch
    assert branch_decision("threshold", 0.5, 0.2, -5.0, 0.05, 30, 0.0, random.Random(0)) == (0.0, False)
    assert branch_decision("released", 0.5, 0.2, -5.0, 0.05, 30, 0.5, random.Random(0)) == (0.0, False)
    assert aepo_branch_probability(0.5, 0.2, -5.0, 0.05, 30) == 0.0


# ----------------------------------------------------------------------------- rules in the strategies


@pytest.mark.parametrize("strategy", ["arpo", "aepo"])
@pytest.mark.parametrize("rule, draws, branches", [
    # decision 1: H_init 0.2, H_now 0.9 -> dH 0.7; decision 2: H_now 0.0 -> dH -0.2 (alpha 0.5, coef 0.2)
    ("threshold", [0.99, 0.0], [True, False]),  # 0.64 > 0.5; 0.46 < 0.5; no draw at all
    ("sample", [0.99, 0.0], [False, True]),  # 0.99 >= 0.64; 0.0 < 0.46
    ("released", [0.35, 0.6], [False, True]),  # 0.35 + 0.14 < 0.5; 0.6 - 0.04 >= 0.5
    ("released", [0.36, 0.53], [True, False]),  # 0.50 >= 0.5; (0.53 - 0.04) * 0.95 < 0.5 (AEPO l = 1)
])
def test_strategies_honour_branch_decision(strategy, rule, draws, branches):
    rng = FixedRng(draws)
    kw = {"premonitor": False} if strategy == "aepo" else {}
    trajs, stats, sampler = run(strategy, entropy_script(0.2, [0.9, 0.0]), prompts_of("Q"), rng=rng, n=3,
                                initial_rollouts=1, branch_decision=rule, branch_beta=0.2, branch_gamma=0.2,
                                **kw)
    check_invariants(trajs, stats, sampler, prompts_of("Q"), 3)
    root = [d for d in stats["decisions"] if d["row_id"] == 0]
    assert [d["dH"] for d in root] == pytest.approx([0.7, -0.2], abs=1e-6)
    assert [d["branched"] for d in root] == branches
    assert all(d["rule"] == rule for d in stats["decisions"])
    if rule == "threshold":
        assert rng.drawn == []
    else:
        assert rng.drawn[:2] == draws
    assert trajs[0].decisions[:2] == [
        {"dH": pytest.approx(0.7, abs=1e-6), "l": 0, "p": pytest.approx(root[0]["p"]), "branched": branches[0],
         "turn": 1, "row_id": 0},
        {"dH": pytest.approx(-0.2, abs=1e-6), "l": int(strategy == "aepo" and branches[0]),
         "p": pytest.approx(root[1]["p"]), "branched": branches[1], "turn": 2, "row_id": 0},
    ]


# ----------------------------------------------------------------------------- m and decisions on rows


@pytest.mark.parametrize("rule", BRANCH_DECISIONS)
@pytest.mark.parametrize("scope", ["chain", "prompt"])
def test_rows_carry_m_and_their_chain_of_decisions(rule, scope):
    # H_init 0.5; after a result 0.1, 0.5 or 1.3 by turn and draw: dH in {-0.4, 0, 0.8}, so every
    # rule branches on some decisions and not on others; Z = 2, and branches branch again
    def script(ctx, draw):
        k = ctx.count("<result>")
        text = f"<search>{ctx[0]}{k}.{draw}</search>" if k < 4 else f"<answer>{draw}</answer>"
        return Reply(text, seg(0.5 if k == 0 else [0.1, 0.5, 1.3][(k + 2 * draw) % 3]))

    prompts = prompts_of("A", "B", "C")
    n = 9
    trajs, stats, sampler = run("aepo", script, prompts, rng=random.Random(3), n=n, n_probe=20,
                                branch_decision=rule, penalty_scope=scope, branch_children=2)
    check_invariants(trajs, stats, sampler, prompts, n)  # includes check_row_decisions
    assert stats["branches"] > 0 and any(t.parent_row_id is not None and t.parent_row_id > 0 for t in trajs)
    assert all(t.m == m for i, m in enumerate(stats["m"]) for t in trajs[i * n:(i + 1) * n])
    assert any(d["dH"] <= 0 for d in stats["decisions"]) and any(d["dH"] > 0 for d in stats["decisions"])
    # sum over the global rows' own decisions plus every branch's own decisions = branch events;
    # the global rows alone hold the branches made from a global row
    own_branched = [sum(d["branched"] for d in t.decisions if d["row_id"] == t.row_id) for t in trajs]
    assert sum(own_branched) == stats["branches"]
    from_globals = sum(1 for d in stats["decisions"] if d["branched"]
                       and trajs[d["prompt"] * n + d["row_id"]].parent_row_id is None)
    assert sum(b for t, b in zip(trajs, own_branched) if t.parent_row_id is None) == from_globals
    if scope == "chain":
        # l of each decision = the run of branched decisions that ends just before it on the chain
        for t in trajs:
            for i, d in enumerate(t.decisions):
                run_length = 0
                for prev in reversed(t.decisions[:i]):
                    if not prev["branched"]:
                        break
                    run_length += 1
                assert d["l"] == run_length, (t.row_id, i, t.decisions)


def test_independent_rows_have_m_n_and_no_decisions():
    trajs, stats, sampler = run("independent", tool_chain(2), prompts_of("A", "B"), n=3)
    assert [t.m for t in trajs] == [3] * 6 and all(t.decisions == [] for t in trajs)
    check_invariants(trajs, stats, sampler, prompts_of("A", "B"), 3)


# ----------------------------------------------------------------------------- paused segments


def run_paused(strategy, script, prompts, every=2, **cfg_kw):
    sampler = PausingSampler(TOK, script, every=every)
    cfg = RolloutConfig(pause_below=0.25, **cfg_kw)
    trajs, stats = rollout(strategy, prompts, sampler, TOK, FakeTools(), cfg, random.Random(0))
    return trajs, stats, sampler


def trajectory_fields(t):
    return (t.prompt_id, t.row_id, t.response_ids, t.response_mask, t.logprobs, t.entropies,
            [(s.role, s.start, s.end, s.entropy, s.text) for s in t.segments],
            [(c.name, c.argument, c.result) for c in t.tool_calls], t.finish_reason)


@pytest.mark.parametrize("every", [1, 2, 5])
def test_paused_segments_give_the_same_independent_rollout(every):
    """A segment split over several generate calls is recorded as the one segment it is: the
    same tokens, scores, segment entropies and texts, actions and tool calls."""
    prompts = prompts_of("A?", "B?", "C?")
    plain, plain_stats, _ = run("independent", mixed_script, prompts, n=4)
    paused, stats, sampler = run_paused("independent", mixed_script, prompts, every=every, n=4)
    assert sampler.pauses > 0 and not sampler.open
    assert stats["generate_calls"] > plain_stats["generate_calls"]
    assert [trajectory_fields(t) for t in paused] == [trajectory_fields(t) for t in plain]


REPLY = re.compile(r"(<search>[^<]*</search>|<answer>[^<]*</answer>|<eos>)")


@pytest.mark.parametrize("strategy, extra", BRANCHING)
def test_paused_segments_keep_trees_and_decisions_whole(strategy, extra):
    """Branching strategies over a sampler that pauses every 2 tokens: the invariants hold, every
    model segment is one whole scripted reply, and each decision is measured on a whole one."""
    prompts = prompts_of("A?", "B?", "C?")
    knobs = {"branch_alpha": 1.0, "branch_beta": 0.0, "branch_gamma": 0.0, "branch_penalty": 0.0}
    trajs, stats, sampler = run_paused(strategy, mixed_script, prompts, n=5, **knobs, **extra)
    assert sampler.pauses > 0
    check_invariants(trajs, stats, sampler, prompts, 5)
    for t in trajs:
        for s in t.segments:
            if s.role == "model":
                assert REPLY.fullmatch(s.text), s.text
                ents = t.entropies[s.start:s.end]
                assert s.entropy == pytest.approx(segment_entropy_value(ents, 20, len(TOK), False))


def test_threshold_rule_at_the_defaults_depends_on_beta():
    """alpha (0.4) is kept apart from tau (0.5), so the threshold rule branches when
    beta dH > tau - alpha: beta sets the bar (dH > 0.5 at beta 0.2, dH > 0.25 at beta 0.4)."""
    cfg = RolloutConfig()
    assert (cfg.branch_alpha, cfg.branch_tau, cfg.branch_decision) == (0.4, 0.5, "threshold")
    rng = FixedRng([0.0])

    def branches(beta, dh):
        return branch_decision("threshold", cfg.branch_alpha, beta, dh, 0.0, 0, cfg.branch_tau, rng)[1]

    assert [branches(0.2, dh) for dh in (0.1, 0.49, 0.51, 1.0)] == [False, False, True, True]
    assert [branches(0.4, dh) for dh in (0.1, 0.24, 0.26, 1.0)] == [False, False, True, True]
    assert branches(0.4, 0.3) and not branches(0.2, 0.3)  # the same step, another beta
    assert rng.drawn == []  # deterministic: no draw
    # AEPO's penalty raises the bar: (0.4 + 0.2 dH)(1 - 0.05 l) > 0.5 needs dH > 0.632 at l = 1
    p1, b1 = branch_decision("threshold", 0.4, 0.2, 0.63, 0.05, 1, 0.5, rng)
    p2, b2 = branch_decision("threshold", 0.4, 0.2, 0.64, 0.05, 1, 0.5, rng)
    assert p1 == pytest.approx((0.4 + 0.2 * 0.63) * 0.95) and not b1 and b2


def test_released_aepo_preset_runs_what_the_published_scripts_ran():
    """algo=released_aepo: m = k / 2 without pre-monitoring, the released rule with one draw per
    decision, the per-prompt counter, the unrescaled segment sum; GRPO's advantage."""
    import dataclasses

    from aepo.algos import advantage_spec
    from aepo.config import load_config

    cfg = load_config(None, ["algo=released_aepo", "rollout.n=6", "rollout.n_probe=20"])
    assert advantage_spec(cfg.actor.adv_estimator).per_token is None  # no entropy factor
    assert cfg.actor.policy_loss == "aepo"
    r = cfg.rollout
    assert (r.strategy, r.premonitor, r.branch_decision, r.penalty_scope, r.segment_entropy_compat) == (
        "aepo", False, "released", "prompt", True)
    rng = FixedRng([0.9])  # U = 0.9: (0.9 + 0.2 dH)(1 - 0.05 l) >= 0.5 at every decision here
    sampler = ScriptedSampler(TOK, tool_chain(2, entropy=0.01))
    trajs, stats = rollout("aepo", prompts_of("A", "B"), sampler, TOK, FakeTools(), dataclasses.replace(r), rng)
    assert stats["m"] == [3, 3] and stats["h_root"] == [None, None]  # no probe
    assert len(rng.drawn) == len(stats["decisions"]) > 0
    first = stats["decisions"][0]
    assert first["l"] == 0 and first["p"] == pytest.approx(0.9 + 0.2 * first["dH"]) and first["branched"]
    # the segment entropy is the plain sum: a 10-token segment of a shorter reply sums 10 terms
    short = Agent(sampler, TOK, FakeTools(), r).segment_entropy([nats(0.01, TOK)] * 10)
    assert short == pytest.approx(0.1, rel=1e-5)


def test_random_branch_control_branches_by_a_coin_whatever_dh():
    """strategy "random": ARPO's tree, each decision a coin of probability random_branch_p."""
    prompts = prompts_of("A", "B")
    rng = FixedRng([0.1, 0.9])  # draws below 0.5 branch, above do not, in turn
    trajs, stats, sampler = run("random", tool_chain(3), prompts, rng=rng, n=6, random_branch_p=0.5)
    check_invariants(trajs, stats, sampler, prompts, 6)
    assert stats["m"] == [3, 3]
    decisions = stats["decisions"]
    draws = rng.drawn[:len(decisions)]
    for d, u in zip(decisions, draws):
        assert d["p"] == 0.5 and d["branched"] == (u < 0.5 and d["budget_left"] > 0)
    assert any(d["branched"] for d in decisions) and not all(d["branched"] for d in decisions)
    _, never, _ = run("random", tool_chain(3), prompts, n=6, random_branch_p=0.0)
    assert never["branches"] == 0
