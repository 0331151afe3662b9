"""Rollouts: the tool-use protocol, the per-row agent, the strategies and the samplers.

    trajectories, stats = rollout("aepo", prompts, sampler, tokenizer, tool_fn, cfg, rng)
"""
from __future__ import annotations

from typing import Any

from aepo.protocol import (
    Action,
    escape_protocol_tags,
    extract_answer,
    extract_boxed,
    format_result,
    parse_action,
)
from aepo.rollout.agent import Agent, RowState, ToolFn, TurnOutcome, segment_entropy_value
from aepo.rollout.strategies import (
    STRATEGIES,
    RolloutStrategy,
    aepo_branch_probability,
    aepo_global_budget,
    arpo_branch_probability,
    get_strategy,
    register_strategy,
    rollout,
    strategy_names,
)
from aepo.types import Generation, Sampler, SegmentRecord, ToolCall, Trajectory

__all__ = [
    "STRATEGIES",
    "Action",
    "Agent",
    "Generation",
    "RolloutStrategy",
    "RowState",
    "Sampler",
    "SegmentRecord",
    "ToolCall",
    "ToolFn",
    "TorchSampler",
    "Trajectory",
    "TurnOutcome",
    "aepo_branch_probability",
    "aepo_global_budget",
    "arpo_branch_probability",
    "escape_protocol_tags",
    "extract_answer",
    "extract_boxed",
    "format_result",
    "get_strategy",
    "parse_action",
    "register_strategy",
    "rollout",
    "segment_entropy_value",
    "strategy_names",
]


def __getattr__(name: str) -> Any:
    """`TorchSampler` is imported on first use (it pulls in transformers)."""
    if name == "TorchSampler":
        from aepo.rollout.sampler import TorchSampler

        return TorchSampler
    raise AttributeError(f"module 'aepo.rollout' has no attribute {name!r}")
