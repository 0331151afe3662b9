"""Token-level audit of rollout rows: the properties exact token-in/token-out training rests on
(docs/algorithms.md section 2.1), checked row by row. `aepo audit ROWS.jsonl --model M` runs it
on `aepo rollout`'s rows; the trainer runs it on every step's rows (`audit/*` metrics, warning
once on a violation).

Checks (each names the first problem of a row, or passes it):
- `ids_text`: each segment's text is the decoding of its ids, and each tool segment's ids are
  what the format appends for the result the model saw (re-encoding gives the same ids).
- `loss_mask`: segments tile the response; the mask is 1 exactly on model segments, and
  log-probs are 0 wherever it is 0.
- `reward_input`: the parts the reward reads (`trajectory_parts`) are the model and tool spans
  by position, so no tool-result text reaches the reward as the model's.
- `finish`: every row has a finish reason, and it agrees with the last segment (an answer ends
  with "answer"; a row cut inside a turn says "length" or "eos").
- `tool_results`: every tool call the model made got a result, except a last call refused by
  `max_tool_calls` or cut by the budget, and the row's tool calls match its tool segments.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aepo.formats import get_format
from aepo.rewards.format import trajectory_parts
from aepo.types import SegmentRecord, ToolCall, Trajectory

__all__ = ["AUDIT_CHECKS", "FINISH_REASONS", "audit_counts", "audit_row", "audit_rows", "row_record",
           "trajectory_of"]

AUDIT_CHECKS: tuple[str, ...] = ("ids_text", "loss_mask", "reward_input", "finish", "tool_results")
FINISH_REASONS: tuple[str, ...] = ("answer", "eos", "length", "max_tool_calls")


def row_record(traj: Trajectory, tokenizer: Any, tool_format: str) -> dict[str, Any]:
    """A rollout row as JSON: the tree fields, the text, and the token-level record the audit
    reads (ids, mask, log-probs, segment spans, tool calls, the format)."""
    return {
        "prompt_id": traj.prompt_id, "row_id": traj.row_id, "parent_row_id": traj.parent_row_id,
        "branch_position": traj.branch_position, "prompt": tokenizer.decode(traj.prompt_ids), "text": traj.text,
        "segments": [{"role": s.role, "start": s.start, "end": s.end, "entropy": s.entropy, "text": s.text}
                     for s in traj.segments],
        "tool_calls": [{"name": c.name, "argument": c.argument, "ok": c.ok, "result": c.result}
                       for c in traj.tool_calls],
        "finish_reason": traj.finish_reason, "n_tokens": len(traj.response_ids),
        "m": traj.m, "decisions": traj.decisions, "tool_format": tool_format,
        "prompt_ids": list(traj.prompt_ids), "response_ids": list(traj.response_ids),
        "response_mask": list(traj.response_mask), "logprobs": [round(float(x), 6) for x in traj.logprobs],
    }


def trajectory_of(row: Mapping[str, Any]) -> Trajectory:
    """A `row_record` back as a Trajectory (KeyError naming a missing field)."""
    missing = [k for k in ("prompt_ids", "response_ids", "response_mask", "segments") if k not in row]
    if missing:
        raise KeyError(f"row {row.get('prompt_id')!r}/{row.get('row_id')!r} has no {', '.join(missing)}: audit "
                       "needs rows written by `aepo rollout` (token ids, mask and segment spans)")
    return Trajectory(
        prompt_id=str(row.get("prompt_id")), row_id=int(row.get("row_id", 0)),
        prompt_ids=list(row["prompt_ids"]), response_ids=list(row["response_ids"]),
        response_mask=list(row["response_mask"]), logprobs=list(row.get("logprobs") or [0.0] * len(row["response_ids"])),
        segments=[SegmentRecord(s["role"], int(s["start"]), int(s["end"]), s.get("entropy"), s.get("text", ""))
                  for s in row["segments"]],
        tool_calls=[ToolCall(c.get("name", ""), c.get("argument", ""), c.get("result", ""), c.get("ok", True))
                    for c in row.get("tool_calls", [])],
        finish_reason=str(row.get("finish_reason", "")), text=str(row.get("text", "")),
    )


def _decode(tok: Any, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def _ids_text(tr: Trajectory, tok: Any, fmt: Any) -> str | None:
    calls = iter(tr.tool_calls)
    before, after = fmt.wrapper(tok)
    head, tail = tok.encode(before, add_special_tokens=False), tok.encode(after, add_special_tokens=False)
    for k, seg in enumerate(tr.segments):
        ids = tr.response_ids[seg.start:seg.end]
        if _decode(tok, ids) != seg.text:
            return f"segment {k} ({seg.role}) text is not the decoding of its ids"
        if seg.role == "tool":
            call = next(calls, None)
            if call is None:
                return f"tool segment {k} has no tool call record"
            # encoded in one piece when uncut, else wrapper + cut body + wrapper (ToolFormat.result_ids)
            whole = list(tok.encode(before + call.result + after, add_special_tokens=False))
            parts = [*head, *tok.encode(call.result, add_special_tokens=False), *tail]
            if ids not in (whole, parts):
                return f"tool segment {k}: its ids are not what the format appends for the result the model saw"
    return None


def _loss_mask(tr: Trajectory) -> str | None:
    n = len(tr.response_ids)
    if len(tr.response_mask) != n or len(tr.logprobs) != n:
        return f"{n} ids but {len(tr.response_mask)} mask entries and {len(tr.logprobs)} log-probs"
    at = 0
    for k, seg in enumerate(tr.segments):
        if seg.start != at or seg.end < seg.start:
            return f"segment {k} spans [{seg.start}, {seg.end}), expected to start at {at}"
        want = 1 if seg.role == "model" else 0
        if any(m != want for m in tr.response_mask[seg.start:seg.end]):
            return f"segment {k} ({seg.role}) has mask values other than {want}"
        if not want and any(lp != 0.0 for lp in tr.logprobs[seg.start:seg.end]):
            return f"tool segment {k} has non-zero log-probs"
        at = seg.end
    if at != n:
        return f"segments cover {at} of {n} response tokens"
    return None


def _reward_input(tr: Trajectory, tok: Any) -> str | None:
    parts = trajectory_parts(tr)
    if len(parts) != len(tr.segments):
        return f"the reward reads {len(parts)} parts for {len(tr.segments)} segments"
    for k, ((role, text), seg) in enumerate(zip(parts, tr.segments)):
        span = _decode(tok, tr.response_ids[seg.start:seg.end])
        mask = set(tr.response_mask[seg.start:seg.end])
        if role != seg.role or (role == "model") != (mask <= {1}):
            return f"part {k}: the reward reads it as {role} text, but its tokens are {'model' if 1 in mask else 'tool'}'s"
        if not span.startswith(text):
            return f"part {k}: the reward's text is not the text of the tokens at its position"
    return None


def _segment_actions(tr: Trajectory, fmt: Any) -> list[tuple[int, str]]:
    """(segment index, action kind) of each model segment, the last one read with the row's finish.
    A row that ended on an answer is read as every generation that can end one ends: at a stop
    string (tags: `</answer>`) or at the end of turn (hermes: the last message)."""
    out = []
    for k, seg in enumerate(tr.segments):
        if seg.role != "model":
            continue
        last = k == len(tr.segments) - 1
        if last and tr.finish_reason == "answer":
            read = [fmt.parse_action(seg.text, finish).kind for finish in ("stop", "eos")]
            kind = "answer" if "answer" in read else read[0]
        else:
            kind = fmt.parse_action(seg.text, tr.finish_reason if last and tr.finish_reason in ("eos", "length")
                                    else "stop").kind
        out.append((k, kind))
    return out


def _finish(tr: Trajectory, fmt: Any) -> str | None:
    if tr.finish_reason not in FINISH_REASONS:
        return f"finish reason {tr.finish_reason!r} is not one of {', '.join(FINISH_REASONS)}"
    actions = _segment_actions(tr, fmt)
    if not actions:
        return None if tr.finish_reason == "length" else "no model segment"
    k, kind = actions[-1]
    last_is_model = k == len(tr.segments) - 1
    if tr.finish_reason == "answer" and (not last_is_model or kind != "answer"):
        return "finish reason 'answer' but the last segment is not an answer"
    if last_is_model and kind == "none" and tr.finish_reason not in ("eos", "length"):
        return f"the last turn stopped without a call or an answer, but the finish reason is {tr.finish_reason!r}"
    if last_is_model and kind in ("tool", "malformed") and tr.finish_reason not in ("max_tool_calls", "length"):
        return f"the last turn is a tool call without a result, but the finish reason is {tr.finish_reason!r}"
    return None


def _tool_results(tr: Trajectory, fmt: Any) -> str | None:
    n_tool = sum(1 for s in tr.segments if s.role == "tool")
    if n_tool != len(tr.tool_calls):
        return f"{len(tr.tool_calls)} tool calls recorded but {n_tool} tool segments"
    for k, kind in _segment_actions(tr, fmt):
        if kind not in ("tool", "malformed"):
            continue
        nxt = tr.segments[k + 1] if k + 1 < len(tr.segments) else None
        if nxt is None:
            if tr.finish_reason not in ("max_tool_calls", "length"):
                return f"the call in segment {k} got no result"
        elif nxt.role != "tool":
            return f"the call in segment {k} is followed by model text, not a result"
    return None


def audit_row(tr: Trajectory, tokenizer: Any, tool_format: str) -> dict[str, str | None]:
    """{check: the row's first problem, or None} for every check of AUDIT_CHECKS."""
    fmt = get_format(tool_format)
    out: dict[str, str | None] = {"ids_text": None, "loss_mask": _loss_mask(tr)}
    if out["loss_mask"] is None:  # spans are sound: the rest can index by them
        out["ids_text"] = _ids_text(tr, tokenizer, fmt)
        out["reward_input"] = _reward_input(tr, tokenizer)
    else:
        out["ids_text"] = out["reward_input"] = "segments do not tile the response (see loss_mask)"
    out["finish"] = _finish(tr, fmt)
    out["tool_results"] = _tool_results(tr, fmt)
    return out


def audit_rows(rows: Iterable[Trajectory], tokenizer: Any, tool_format: str) -> dict[str, list[str]]:
    """{check: ["prompt_id/row_id: problem", ...]} over `rows` (empty lists when all pass)."""
    found: dict[str, list[str]] = {c: [] for c in AUDIT_CHECKS}
    for tr in rows:
        for check, problem in audit_row(tr, tokenizer, tool_format).items():
            if problem:
                found[check].append(f"{tr.prompt_id}/{tr.row_id}: {problem}")
    return found


def audit_counts(rows: Sequence[Trajectory], tokenizer: Any, tool_format: str) -> dict[str, float]:
    """The trainer's `audit/<check>` metrics: rows that violate each check."""
    return {f"audit/{c}": float(len(v)) for c, v in audit_rows(rows, tokenizer, tool_format).items()}
