"""The format gate: whether a response follows the tag protocol (docs/algorithms.md section 7).

A response is a list of parts, ("model", text) written by the policy and ("tool", text)
inserted by the environment. `trajectory_parts` takes them from a rollout's segments by token
position; `aepo.protocol.split_response` cuts a joined text at its `<result>` blocks. Each tool
part is one opaque result block, and a result tag inside model text is a format failure (the
model forging environment output).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from aepo.formats.tags import DEFAULT_EOS_TOKENS, check_format, check_format_parts
from aepo.protocol import Part, checked_role, split_response

if TYPE_CHECKING:
    from aepo.types import Trajectory

__all__ = ["DEFAULT_EOS_TOKENS", "check_format", "check_format_parts", "trajectory_parts"]



def trajectory_parts(traj: Trajectory) -> list[Part]:
    """The parts of a rollout, by position: one per segment (`Trajectory.segments`), so tool
    output is known by where the environment inserted it, never by the tags it contains.

    A trailing end-of-sequence string that `traj.text` dropped is dropped here too. A
    trajectory without segments falls back to `split_response(traj.text)`.
    """
    segments = getattr(traj, "segments", None) or []
    if not segments:
        return split_response(str(getattr(traj, "text", "")))
    parts: list[Part] = [(checked_role(seg.role), str(seg.text)) for seg in segments]
    return _drop_final_eos(parts, str(getattr(traj, "text", "")), getattr(traj, "finish_reason", ""))


def _drop_final_eos(parts: list[Part], text: str, finish_reason: str) -> list[Part]:
    """Cut from the last model part what the decoded `text` left off after it (the EOS string)."""
    joined = "".join(t for _, t in parts)
    extra = len(joined) - len(text)
    if finish_reason != "eos" or not text or extra <= 0 or not joined.startswith(text):
        return parts
    role, last = parts[-1]
    if role != "model" or len(last) < extra:
        return parts
    return [*parts[:-1], ("model", last[:-extra])]
