"""Per-row random streams: the uniform number behind a row's token depends only on
(seed, the row's key, the token's position), never on which rows shared the batch.

The continuous scheduler (`aepo.rollout.scheduler`) runs rows in an order set by tool
latencies and slot limits; drawing from one generator in batch order would make every token
depend on that order. A counter-based hash (splitmix64, three rounds of its mixer over the
seed, the key and the position) gives each (row, position) its own number instead, so a
rollout is reproduced whatever the schedule (docs/algorithms.md section 3.5).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["RowKey", "row_uniform", "stream_state", "uniform_at"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


class RowKey(NamedTuple):
    """Who a row is, independent of its sampler handle: `kind` 0 a group row, 1 AEPO's probe,
    2 AEPO's root sample; `group` the prompt's index in the batch; `row` its row_id."""

    kind: int
    group: int
    row: int


def _mix(z: int) -> int:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK
    return z ^ (z >> 31)


def stream_state(seed: int, key: Sequence[int]) -> int:
    """The hash state of a row's stream after its seed and key: `uniform_at` turns it and a
    position into the row's number (a running row computes it once, not once a token)."""
    z = _mix((int(seed) * _GOLDEN + 1) & _MASK)
    for part in key:
        z = _mix((z + (int(part) & _MASK) * _GOLDEN + 0x632BE59BD9B4E019) & _MASK)
    return z


def uniform_at(state: int, position: int) -> float:
    """The number at `position` of the stream whose `stream_state` is `state`."""
    z = _mix((state + (int(position) & _MASK) * _GOLDEN + 0x632BE59BD9B4E019) & _MASK)
    return (z >> 40) / float(1 << 24)


def row_uniform(seed: int, key: Sequence[int], position: int) -> float:
    """A number in [0, 1) on a 2^-24 grid (exact in float32), a function of its arguments only."""
    return uniform_at(stream_state(seed, key), position)
