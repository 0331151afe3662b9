"""DAPO's batch-level pieces (docs/algorithms.md section 5): the soft overlong reward term, and
the filter of dynamic sampling that keeps only groups whose rewards differ."""
from __future__ import annotations

from aepo.config import Config
from aepo.types import Trajectory

__all__ = ["informative_groups", "overlong_penalty", "overlong_shaping"]


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float) -> float:
    """DAPO soft overlong punishment: linear from 0 at max_len-buffer to -factor at max_len."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    return -min(1.0, (length - (max_len - buffer)) / buffer) * factor


def overlong_shaping(traj: Trajectory, cfg: Config) -> float:
    """DAPO's overlong reward term of one row (docs/algorithms.md section 5): `overlong_penalty`
    with L = the tokens the policy generated (response_mask 1), so tool results never count
    against the row, L_max = rollout.max_response_tokens, buffer actor.overlong_buffer, factor
    actor.overlong_penalty. 0 when the buffer is 0 (off)."""
    a = cfg.actor
    return overlong_penalty(sum(traj.response_mask), cfg.rollout.max_response_tokens, a.overlong_buffer,
                            a.overlong_penalty)


def informative_groups(trajs: list[Trajectory]) -> list[Trajectory]:
    """The rows of the prompts whose rewards are not all equal (those that carry a learning signal)."""
    by: dict[str, list[float]] = {}
    for t in trajs:
        by.setdefault(t.prompt_id, []).append(t.reward)
    keep = {k for k, v in by.items() if max(v) - min(v) > 1e-9}
    return [t for t in trajs if t.prompt_id in keep]

