"""The tool-use protocol (parsing) and the per-row agent (masks, segments, limits, tool results)."""
from __future__ import annotations

import math
import random

import pytest
from scripted_sampler import CharTokenizer, FakeTools, Reply, ScriptedSampler, nats

from aepo.config import RolloutConfig
from aepo.protocol import (
    Action,
    extract_answer,
    extract_boxed,
    format_result,
    parse_action,
    stop_strings,
    tool_tags,
)
from aepo.rollout import rollout
from aepo.rollout.agent import Agent, segment_entropy_value

TOK = CharTokenizer()


# ----------------------------------------------------------------------------- protocol


def test_tags_and_stop_strings():
    assert tool_tags() == ("search", "python", "calc")
    assert set(stop_strings()) == {"</search>", "</python>", "</calc>", "</answer>"}
    assert format_result("abc") == "<result>\nabc\n</result>"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I should look it up <search>capital of France</search>", Action("tool", "search", "capital of France")),
        ("<python>\nprint(1)\n</python>\n", Action("tool", "python", "print(1)")),
        ("<calc>2+3</calc>", Action("tool", "calc", "2+3")),
        # the argument starts at the LAST opening tag of the closing tag's kind
        ("<search>a</search> then <search> b </search>", Action("tool", "search", "b")),
        ("<search>x <search>y</search>", Action("tool", "search", "y")),
        ("<search>q <python>x</search>", Action("tool", "search", "q <python>x")),
        ("so <answer> Paris </answer>", Action("answer", "answer", "Paris")),
        ("<answer></answer>", Action("answer", "answer", "")),
        ("just thinking, no tags", Action("none")),
        ("<search>unfinished", Action("none")),
        ("", Action("none")),
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


@pytest.mark.parametrize(
    "text, tag, message",
    [
        ("oops</search>", "search", "</search> without a matching <search>"),
        ("<python>x</search>", "search", "</search> without a matching <search>"),
        ("<calc>   </calc>", "calc", "empty argument in <calc></calc>"),
        ("so the answer is 3</answer>", "answer", "</answer> without a matching <answer>"),
    ],
)
def test_parse_action_malformed(text, tag, message):
    action = parse_action(text)
    assert action.kind == "malformed" and action.tag == tag and action.tool is None
    assert action.error.startswith("Error: ") and message in action.error


def test_extract_answer_and_boxed():
    assert extract_answer("<answer>a</answer> later <answer> b </answer>") == "b"
    assert extract_answer("x <answer>so \\boxed{\\frac{1}{2}} ok</answer>") == "\\frac{1}{2}"
    assert extract_answer("no answer here") is None
    assert extract_answer("<answer>open only") is None
    assert extract_answer("closing only</answer>") is None
    assert extract_boxed("\\boxed{a} and \\boxed{b{c}}") == "b{c}"
    assert extract_boxed("\\boxed{ok} \\boxed{unbalanced") == "ok"
    assert extract_boxed("nothing") is None


# ----------------------------------------------------------------------------- agent

PROMPT = ("p0", TOK.encode("Q:"))


def one_row(script, tools=None, **cfg_kw):
    """Roll out one row of PROMPT with `script`; returns (trajectory, sampler, tools)."""
    sampler = ScriptedSampler(TOK, script)
    tools = tools if tools is not None else FakeTools()
    cfg = RolloutConfig(n=1, **cfg_kw)
    trajs, _ = rollout("independent", [PROMPT], sampler, TOK, tools, cfg, random.Random(0))
    assert len(trajs) == 1 and not sampler.live_rows
    return trajs[0], sampler, tools


def test_masks_logprobs_segments_hand_computed():
    fractions = [0.1, 0.3, 0.5, 0.7, 0.9]

    def script(ctx, draw):
        if "<result>" not in ctx:
            return Reply("go<search>x</search>", [nats(f, TOK) for f in fractions])
        return Reply("<answer>y</answer>", nats(0.2, TOK))

    t, sampler, tools = one_row(script, n_probe=3, max_response_tokens=64)
    seg1, result, seg2 = "go<search>x</search>", "<result>\nfound x\n</result>", "<answer>y</answer>"
    assert t.response_ids == TOK.encode(seg1 + result + seg2)
    assert (len(TOK.encode(seg1)), len(TOK.encode(result)), len(TOK.encode(seg2))) == (5, 11, 3)
    assert t.response_mask == [1] * 5 + [0] * 11 + [1] * 3
    assert t.logprobs == pytest.approx([-0.5, -0.51, -0.52, -0.53, -0.54] + [0.0] * 11 + [-0.5, -0.51, -0.52])
    log_v = math.log(len(TOK))
    assert t.entropies == pytest.approx([f * log_v for f in fractions] + [0.0] * 11 + [0.2 * log_v] * 3)
    assert [(s.role, s.start, s.end, s.text) for s in t.segments] == [
        ("model", 0, 5, seg1), ("tool", 5, 16, result), ("model", 16, 19, seg2)
    ]
    # segment entropy: sum of the first n_probe=3 token entropies / log|V| = 0.1+0.3+0.5; the
    # 3-token answer segment is exactly n_probe long, so no length rescaling: 3 * 0.2
    assert t.segments[0].entropy == pytest.approx(0.9, abs=1e-6)
    assert t.segments[1].entropy is None
    assert t.segments[2].entropy == pytest.approx(0.6, abs=1e-6)
    assert [(c.name, c.argument, c.result, c.ok) for c in t.tool_calls] == [("search", "x", "found x", True)]
    assert tools.batches == [[("search", "x")]]
    assert t.finish_reason == "answer" and t.text == seg1 + result + seg2
    assert t.parent_row_id is None and t.branch_position is None
    # the tool tokens went into the sampler row; budgets shrink by what the response holds
    appends = [e for e in sampler.log if e[0] == "append"]
    assert [e[2] for e in appends] == [TOK.encode(result)]
    assert [[b for _, b in call] for call in sampler.generate_calls] == [[64], [64 - 16]]
    assert all(e[3] == stop_strings() for e in sampler.log if e[0] == "generate")


def test_segment_entropy_rescaled_sum_vs_released_sum():
    ents = [nats(f, TOK) for f in (0.1, 0.3, 0.5, 0.7)]
    v = len(TOK)
    # at least n_probe tokens: both forms are the plain sum of the first n_probe, 0.1+0.3+0.5
    assert segment_entropy_value(ents, n_probe=3, vocab_size=v) == pytest.approx(0.9, abs=1e-6)
    assert segment_entropy_value(ents, n_probe=3, vocab_size=v, compat=True) == pytest.approx(0.9, abs=1e-6)
    # shorter than n_probe: rescaled by n_probe / n = 20 / 4 (the released form sums 4 tokens)
    assert segment_entropy_value(ents, n_probe=20, vocab_size=v) == pytest.approx(20 / 4 * 1.6, abs=1e-5)
    assert segment_entropy_value(ents, n_probe=20, vocab_size=v, compat=True) == pytest.approx(1.6, abs=1e-6)
    assert segment_entropy_value([], n_probe=20, vocab_size=v) == 0.0

    def script(ctx, draw):
        return Reply("ab<answer>c</answer>", [nats(f, TOK) for f in (0.1, 0.3, 0.5, 0.7, 0.9)])

    t, _, _ = one_row(script, n_probe=2, segment_entropy_compat=True)
    assert t.segments[0].entropy == pytest.approx(0.4, abs=1e-6)  # 0.1 + 0.3, summed


def test_malformed_call_gives_error_result_and_rollout_continues():
    def script(ctx, draw):
        if ctx.count("<result>") == 0:
            return "oops</search>"
        if ctx.count("<result>") == 1:
            return "<calc> </calc>"
        return "<answer>z</answer>"

    t, _, tools = one_row(script)
    assert tools.batches == []  # malformed calls never reach the tools
    assert t.finish_reason == "answer"
    assert [s.role for s in t.segments] == ["model", "tool", "model", "tool", "model"]
    # the error names the tags, escaped like any tool output
    assert "&lt;/search> without a matching &lt;search>" in t.segments[1].text
    assert t.segments[1].text.startswith("<result>\nError: ")
    assert "empty argument" in t.segments[3].text
    assert [(c.name, c.ok) for c in t.tool_calls] == [("search", False), ("calc", False)]
    err = t.segments[1]
    assert set(t.response_mask[: err.start]) == {1} and set(t.response_mask[err.start: err.end]) == {0}


def test_tool_fn_exception_becomes_error_result():
    def boom(calls):
        raise RuntimeError("backend down")

    def script(ctx, draw):
        return "<answer>done</answer>" if "<result>" in ctx else "<search>q</search>"

    t, _, _ = one_row(script, tools=boom)
    assert t.finish_reason == "answer"
    assert t.tool_calls[0].ok is False and t.tool_calls[0].result == "Error: RuntimeError: backend down"


def test_max_tool_calls_ends_the_row():
    t, _, tools = one_row(lambda ctx, draw: "<search>q</search>", max_tool_calls=2)
    assert t.finish_reason == "max_tool_calls"
    assert len(tools.batches) == 2 and t.n_tool_calls == 2
    assert [s.role for s in t.segments] == ["model", "tool", "model", "tool", "model"]
    t0, _, tools0 = one_row(lambda ctx, draw: "<search>q</search>", max_tool_calls=0)
    assert t0.finish_reason == "max_tool_calls" and tools0.batches == [] and t0.n_tool_calls == 0


def test_max_response_tokens_single_and_multi_turn():
    t, sampler, _ = one_row(lambda ctx, draw: "abcdefghijklmnop", max_response_tokens=10)
    assert t.finish_reason == "length" and t.response_ids == TOK.encode("abcdefghij")
    assert sampler.generate_calls[0][0][1] == 10

    def script(ctx, draw):
        return "x" * 40 if "<result>" in ctx else "<search>q</search>"

    t, sampler, _ = one_row(script, max_response_tokens=30)
    used = 3 + len(TOK.encode(format_result("found q")))  # 3 + 11
    assert [call[0][1] for call in sampler.generate_calls] == [30, 30 - used]
    assert len(t.response_ids) == 30 and t.finish_reason == "length"
    assert t.response_mask == [1] * 3 + [0] * 11 + [1] * 16


def test_tool_result_truncated_to_max_result_tokens():
    tools = FakeTools(lambda name, arg: "0123456789abcdef")
    t, _, _ = one_row(
        lambda ctx, draw: "<answer>a</answer>" if "<result>" in ctx else "<python>f()</python>",
        tools=tools, max_result_tokens=5,
    )
    assert t.segments[1].text == "<result>\n01234\n</result>"
    assert t.tool_calls[0].result == "01234"
    assert t.response_mask.count(0) == len(TOK.encode(format_result("01234")))


def test_tool_result_cut_at_the_response_budget():
    # 8 tokens: the call takes 3, the wrapper 4 (<result>, \n, \n, </result>), the body keeps 1
    t, sampler, _ = one_row(lambda ctx, draw: "<search>q</search>", max_response_tokens=8)
    assert len(t.response_ids) == 8 and t.finish_reason == "length"
    assert t.response_ids[3:] == TOK.encode(format_result("f"))
    assert t.segments[1].text == "<result>\nf\n</result>" and t.tool_calls[0].result == "f"
    assert len(sampler.generate_calls) == 1


def test_no_partial_wrapper_when_it_does_not_fit():
    # 6 tokens: the call takes 3, 3 are left, the wrapper needs 4: nothing is appended
    t, sampler, tools = one_row(lambda ctx, draw: "<search>q</search>", max_response_tokens=6)
    assert t.finish_reason == "length" and t.response_ids == TOK.encode("<search>q</search>")
    assert [s.role for s in t.segments] == ["model"] and t.tool_calls == []
    assert not [e for e in sampler.log if e[0] == "append"]
    assert tools.batches == [[("search", "q")]]


def test_eos_finish_and_text():
    t, _, _ = one_row(lambda ctx, draw: "no tags at all")
    assert t.finish_reason == "eos"
    assert t.response_ids[-1] == TOK.eos_token_id and t.text == "no tags at all"


def test_one_tool_fn_call_per_turn_for_all_rows_of_all_prompts():
    sampler = ScriptedSampler(TOK, lambda ctx, draw: "<answer>a</answer>" if "<result>" in ctx
                              else f"<search>{ctx[:2]}{draw}</search>")
    tools = FakeTools()
    prompts = [("a", TOK.encode("A:")), ("b", TOK.encode("B:"))]
    trajs, stats = rollout("independent", prompts, sampler, TOK, tools, RolloutConfig(n=2), random.Random(0))
    assert len(tools.batches) == 1
    assert sorted(tools.batches[0]) == [("search", "A:0"), ("search", "A:1"), ("search", "B:0"), ("search", "B:1")]
    assert stats["tool_fn_calls"] == 1 and stats["generate_calls"] == 2
    # each row got the result of its own call
    assert [t.tool_calls[0].result for t in trajs] == ["found A:0", "found A:1", "found B:0", "found B:1"]


def test_step_rejects_duplicate_and_finished_rows():
    sampler = ScriptedSampler(TOK, lambda ctx, draw: "<answer>a</answer>")
    agent = Agent(sampler, TOK, FakeTools(), RolloutConfig())
    from aepo.rollout.agent import RowState
    from aepo.types import Trajectory

    state = RowState(row=sampler.new_row([5]), group=0, traj=Trajectory("p", 0, [5]))
    with pytest.raises(ValueError, match="same row twice"):
        agent.step([state, state])
    agent.step([state])
    assert state.finished
    with pytest.raises(ValueError, match="already finished"):
        agent.step([state])


@pytest.mark.parametrize("field, value", [("max_response_tokens", 0), ("max_tool_calls", -1),
                                          ("max_result_tokens", -1), ("n_probe", 0)])
def test_agent_rejects_bad_limits(field, value):
    with pytest.raises(ValueError, match=field):
        Agent(ScriptedSampler(TOK, lambda c, d: ""), TOK, FakeTools(), RolloutConfig(**{field: value}))
