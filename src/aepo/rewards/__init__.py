"""Rewards for tool-using rollouts (docs/algorithms.md section 7): format gate (`format`), QA
matching (`qa`), math equivalence (`math`, with the expression evaluator `expression`), and the
scorer registry with the format-gated score (`scoring`). Pass@k and diversity are in `metrics`.
"""
from aepo.protocol import extract_answer, extract_boxed, model_text, parse_tool_calls, split_response
from aepo.rewards import math as _math_module
from aepo.rewards.format import DEFAULT_EOS_TOKENS, check_format, check_format_parts, trajectory_parts
from aepo.rewards.math import math_equal
from aepo.rewards.qa import em, f1, normalize_answer
from aepo.rewards.scoring import (
    AnswerScore,
    Scorer,
    available_scorers,
    get_scorer,
    math_scorer,
    qa_scorer,
    register_scorer,
    score,
    score_parts,
    score_trajectory,
    scorer_name_for,
)

_builtin_math_equal = _math_module._builtin_math_equal  # for tests of the built-in checker alone

__all__ = [
    "DEFAULT_EOS_TOKENS",
    "AnswerScore",
    "Scorer",
    "available_scorers",
    "check_format",
    "check_format_parts",
    "em",
    "extract_answer",
    "extract_boxed",
    "f1",
    "get_scorer",
    "math_equal",
    "math_scorer",
    "model_text",
    "normalize_answer",
    "parse_tool_calls",
    "qa_scorer",
    "register_scorer",
    "score",
    "score_parts",
    "score_trajectory",
    "scorer_name_for",
    "split_response",
    "trajectory_parts",
]
