"""Rewards for tool-using rollouts (docs/algorithms.md section 7): the scorer registry and the
format-gated score of a response.

    score("<think>..</think><answer>Paris</answer>", ["Paris"], "hotpotqa")
    -> {"reward": 1.0, "f1": 1.0, "em": 1.0, "acc": 1.0, "format_ok": True, "answer": "Paris", ...}

Rewards read only what the model wrote: the answer and the tool calls come from model parts
only (`aepo.protocol.model_text`), so a tool that prints `<answer>...</answer>` answers nothing.
Look-alike tags (`＜answer＞`) are read as tags (`aepo.protocol.canonical_tags`), and an answer
with a result tag in it or after it (a tool's forged `</result>` that landed in model text, or
a result block after the answer) has accuracy 0. `reward.qa_metric` picks the QA reward: token
F1 (`f1`, the paper's) or exact match (`em`). `score_trajectory` is the function the trainer
and the evaluation use.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, get_args

from aepo.formats import get_format
from aepo.protocol import (
    RESULT_TAG,
    Part,
    canonical_tags,
    checked_role,
    model_text,
    split_response,
)
from aepo.rewards.format import trajectory_parts
from aepo.rewards.math import PURE_NUMBER_RE, math_equal
from aepo.rewards.qa import _as_gold_list, em, f1

if TYPE_CHECKING:
    from aepo.types import Trajectory

__all__ = [
    "QA_METRICS",
    "AnswerScore",
    "QaMetric",
    "Scorer",
    "available_scorers",
    "get_scorer",
    "math_scorer",
    "qa_scorer",
    "register_scorer",
    "score",
    "score_parts",
    "score_trajectory",
    "scorer_name_for",
]

QaMetric = Literal["f1", "em"]
QA_METRICS: tuple[str, ...] = get_args(QaMetric)
_RESULT_TAG_RE = re.compile(rf"</?{RESULT_TAG}>")


class AnswerScore(TypedDict):
    """What a scorer returns for one extracted answer; `reward` is before the format gate."""

    reward: float
    f1: float
    em: float
    acc: float


Scorer = Callable[[str, list[str]], AnswerScore]
_SCORERS: dict[str, Scorer] = {}
_MATH_SOURCES = ("math", "gsm8k", "math500", "aime24", "aime25", "aime", "amc", "amc23")
_QA_SOURCES = (
    "qa",
    "2wiki",
    "2wikimultihopqa",
    "hotpotqa",
    "musique",
    "bamboogle",
    "nq",
    "triviaqa",
    "popqa",
    "gaia",
    "hle",
    "webwalker",
    "webwalkerqa",
    "frames",
    "xbench",
    "demo",
)


def register_scorer(name: str, *aliases: str) -> Callable[[Scorer], Scorer]:
    """Decorator: make `fn(answer, golds) -> AnswerScore` the scorer for these data sources."""
    names = (name, *aliases)
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"scorer name must be a non-empty string, got {n!r}")

    def deco(fn: Scorer) -> Scorer:
        for n in names:
            _SCORERS[n.strip().lower()] = fn
        return fn

    return deco


def available_scorers() -> list[str]:
    """Every registered data-source name."""
    return sorted(_SCORERS)


def _looks_math(golds: Sequence[str]) -> bool:
    return bool(golds) and all(
        "\\" in g or "$" in g or PURE_NUMBER_RE.fullmatch(g.replace(",", "").strip()) for g in golds
    )


def scorer_name_for(data_source: str | None, golds: Sequence[str] = ()) -> str:
    """The registry key used for `data_source`.

    Tried in order: the name itself (lower-cased); its last path part ("openai/gsm8k" ->
    "gsm8k"); the longest registered name it starts with ("aime24_test" -> "aime24");
    otherwise "math" when every gold answer is a number or contains LaTeX, else "qa".
    """
    if data_source:
        key = data_source.strip().lower()
        for cand in (key, key.rsplit("/", 1)[-1]):
            if cand in _SCORERS:
                return cand
        tail = key.rsplit("/", 1)[-1]
        prefixes = [n for n in _SCORERS if tail.startswith(n)]
        if prefixes:
            return max(prefixes, key=len)
    return "math" if _looks_math(list(golds)) else "qa"


def get_scorer(data_source: str | None, golds: Sequence[str] = ()) -> Scorer:
    """The scorer function for `data_source` (see `scorer_name_for`)."""
    return _SCORERS[scorer_name_for(data_source, golds)]


def _checked_golds(golds: Any) -> list[str]:
    """The gold answers as strings, empty ones dropped; ValueError when none is left (an empty
    gold would be matched by an empty-looking answer such as "-" or ".")."""
    gold_list = _as_gold_list(golds)
    if not gold_list:
        raise ValueError(f"golds must hold at least one non-empty gold answer, got {golds!r}")
    return gold_list


@register_scorer(*_QA_SOURCES)
def qa_scorer(answer: str, golds: list[str]) -> AnswerScore:
    """Token F1 as reward; accuracy is exact match, or numeric equality for numeric golds
    ("1.95" vs "1.95 m"), in which case F1 is 1 too."""
    golds = _checked_golds(golds)
    f1_val, em_val = f1(answer, golds), em(answer, golds)
    numeric = any(math_equal(answer, g) for g in golds if any(c.isdigit() for c in g))
    acc = float(em_val > 0 or numeric)
    if acc:
        f1_val = 1.0
    return AnswerScore(reward=f1_val, f1=f1_val, em=em_val, acc=acc)


@register_scorer(*_MATH_SOURCES)
def math_scorer(answer: str, golds: list[str]) -> AnswerScore:
    """1/0 math equivalence as reward, F1 and accuracy; EM is the normalised string match."""
    golds = _checked_golds(golds)
    acc = float(any(math_equal(answer, g) for g in golds))
    return AnswerScore(reward=acc, f1=acc, em=em(answer, golds), acc=acc)


def score(
    response_text: str,
    golds: str | float | Sequence[Any],
    data_source: str | None = None,
    *,
    multi_tool_bonus: float = 0.0,
    format_penalty: float = -1.0,
    qa_metric: str = "f1",
    tool_format: str = "tags",
) -> dict[str, Any]:
    """`score_parts` of a joined response text, cut at its result blocks (`split_response`).

    For text-only callers (SFT data, external reward hooks); rollouts use `score_trajectory`.
    """
    if not isinstance(response_text, str):
        raise ValueError(f"response_text must be a str, got {type(response_text).__name__}")
    return score_parts(split_response(response_text), golds, data_source, multi_tool_bonus=multi_tool_bonus,
                       format_penalty=format_penalty, qa_metric=qa_metric, tool_format=tool_format)


def score_trajectory(
    traj: Trajectory,
    golds: str | float | Sequence[Any],
    data_source: str | None = None,
    *,
    multi_tool_bonus: float = 0.0,
    format_penalty: float = -1.0,
    qa_metric: str = "f1",
    tool_format: str = "tags",
) -> dict[str, Any]:
    """`score_parts` of a rollout, its tool output known by position (`trajectory_parts`)."""
    return score_parts(trajectory_parts(traj), golds, data_source, multi_tool_bonus=multi_tool_bonus,
                       format_penalty=format_penalty, qa_metric=qa_metric, tool_format=tool_format)


def score_parts(
    parts: Sequence[Part],
    golds: str | float | Sequence[Any],
    data_source: str | None = None,
    *,
    multi_tool_bonus: float = 0.0,
    format_penalty: float = -1.0,
    qa_metric: str = "f1",
    tool_format: str = "tags",
) -> dict[str, Any]:
    """Format-gated reward of one response given as ("model" | "tool", text) parts.

    Invalid format (`check_format_parts`): reward = `format_penalty`. Otherwise the scorer's
    reward (QA: F1, or exact match with `qa_metric="em"`; math: 1/0 equivalence) plus
    `multi_tool_bonus` when the model called more than one kind of tool and that reward is
    > 0. The answer and the tool calls are read from model parts only, look-alike tags read as
    tags. f1/em/acc are computed from the extracted answer whatever the format, so evaluation
    accuracy does not depend on the gate, except that they are 0 when a result tag sits in or
    after the answer (`_answer_is_final`). Empty golds are dropped; ValueError when none is
    left. Keys: reward, f1, em, acc, format_ok, format_reason, answer, scorer.
    """
    if qa_metric not in QA_METRICS:
        raise ValueError(f"qa_metric must be one of {', '.join(map(repr, QA_METRICS))}, got {qa_metric!r}")
    fmt = get_format(tool_format)
    parts = [(checked_role(role), canonical_tags(str(text))) for role, text in parts]
    gold_list = _checked_golds(golds)
    ok, reason = fmt.check_format_parts(parts)
    own = model_text(parts)
    found = fmt.answer_span(own)
    answer = None if found is None else found[1]
    name = scorer_name_for(data_source, gold_list)
    scorer = _SCORERS[name]
    zero = AnswerScore(reward=0.0, f1=0.0, em=0.0, acc=0.0)
    got = scorer(answer, gold_list) if answer and _answer_is_final(parts, found) else zero
    base = float(got["acc"] if qa_metric == "em" and scorer is qa_scorer else got["reward"])
    if not ok:
        reward = float(format_penalty)
    else:
        reward = base
        kinds = {n for n, _ in fmt.tool_calls_in(own)}
        if multi_tool_bonus and len(kinds) > 1 and base > 0:
            reward += multi_tool_bonus
    return {
        "reward": reward,
        "f1": float(got["f1"]),
        "em": float(got["em"]),
        "acc": float(got["acc"]),
        "format_ok": ok,
        "format_reason": reason,
        "answer": answer,
        "scorer": name,
    }


def _answer_is_final(parts: Sequence[Part], found: tuple[int, str] | None) -> bool:
    """Whether no result tag sits in or after the answer starting at model-text offset
    `found[0]`: no tool part after it, no `<result>` / `</result>` in the model text from it on.

    A rollout ends at its answer, so a result block after an answer means the "answer" was
    tool text whose `</result>` was not escaped (cut into a model part by `split_response`),
    and a result tag inside the answer means the same. Such an answer scores 0."""
    if found is None:
        return False
    offset, seen = found[0], 0
    for role, text in parts:
        if role != "model":
            if seen > offset:
                return False
            continue
        if seen + len(text) > offset and _RESULT_TAG_RE.search(text, max(0, offset - seen)):
            return False
        seen += len(text)
    return True
