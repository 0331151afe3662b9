"""Seeds and the learning-rate schedule of an RL run: randomness is derived from (seed, step), so
a run resumed from a checkpoint continues exactly as the uninterrupted run would have."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from aepo.config import Config

__all__ = ["lr_lambda", "step_seed", "step_tasks"]

T = TypeVar("T")


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """The seed of one random stream (`salt`) of step `step` of a run seeded `seed`."""
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """The LR multiplier of optimizer step i: linear warm-up over trainer.warmup_steps, then
    constant or (trainer.lr_schedule "cosine") cosine decay to 0.1 at trainer.total_steps."""
    t = cfg.trainer

    def f(i: int) -> float:
        if t.warmup_steps and i < t.warmup_steps:
            return (i + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            span = max(1, t.total_steps - t.warmup_steps)
            progress = min(1.0, (i - t.warmup_steps) / span)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return f


def step_tasks(tasks: Sequence[T], step: int, per_step: int, seed: int, salt: int = 0) -> list[T]:
    """The `per_step` prompts of `step` (`salt` shifts to further prompts, for dynamic sampling):
    consecutive slices of a seeded permutation of `tasks` per epoch."""
    n, k = len(tasks), per_step
    start = (step * k + salt * k) % max(n, 1)
    epoch = (step * k + salt * k) // max(n, 1)
    order = np.random.default_rng(step_seed(seed, epoch, 17)).permutation(n)
    idx = [order[(start + i) % n] for i in range(min(k, n))]
    return [tasks[i] for i in idx]
