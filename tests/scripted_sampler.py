"""A deterministic fake policy for rollout tests: a character tokenizer and a scripted Sampler.

`ScriptedSampler(tokenizer, script)` answers each row from `script(context, draw)`, where
`context` is the decoded text of the row (prompt + response so far) and `draw` counts how many
times that exact context was sampled before (so a fork that resamples the same context gets a
different, still deterministic reply). The reply's tokens are emitted until a stop string,
the end of the reply (then EOS) or the token budget. Every call is recorded in `log`.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aepo.rollout.sampler.streams import stream_state
from aepo.types import Generation, SegmentRecord, ToolCall, Trajectory

SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<search>", "</search>", "<python>", "</python>", "<calc>", "</calc>",
    "<answer>", "</answer>", "<result>", "</result>",
]
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


class CharTokenizer:
    """Protocol tags are single tokens; every other ASCII character is one token (lossless)."""

    eos_token = "<eos>"
    eos_token_id = 1

    def __init__(self) -> None:
        self.offset = len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.offset + 128

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            ids.extend(self._chars(text[pos:m.start()]))
            ids.append(SPECIAL_TOKENS.index(m.group()))
            pos = m.end()
        ids.extend(self._chars(text[pos:]))
        return ids

    def _chars(self, text: str) -> list[int]:
        return [self.offset + (ord(c) if ord(c) < 128 else ord("?")) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            if i < self.offset:
                if not skip_special_tokens:
                    out.append(SPECIAL_TOKENS[i])
            else:
                out.append(chr(i - self.offset))
        return "".join(out)


def nats(fraction: float, tokenizer: CharTokenizer) -> float:
    """A per-token entropy whose normalised value (divided by log|V|) is `fraction`."""
    return fraction * math.log(len(tokenizer))


@dataclass
class Reply:
    """One scripted segment: its text and the per-token entropy (nats; a float or a list)."""

    text: str
    entropy: float | Sequence[float] = 0.0


Script = Callable[[str, int], "Reply | str"]


class ScriptedSampler:
    """Implements `aepo.types.Sampler` from a script (see module docstring)."""

    def __init__(self, tokenizer: CharTokenizer, script: Script) -> None:
        self.tok = tokenizer
        self.script = script
        self.rows: dict[int, list[int]] = {}
        self.released: set[int] = set()
        self.log: list[tuple] = []
        self.generate_calls: list[list[tuple[int, int]]] = []  # [(row, max_new_tokens), ...] per call
        self.draws: Counter[str] = Counter()
        self._next = 0

    # ------------------------------------------------------------------ row handling

    def _get(self, row: int) -> list[int]:
        if row in self.released:
            raise KeyError(f"row {row} was released")
        if row not in self.rows:
            raise KeyError(f"unknown row {row}")
        return self.rows[row]

    def new_row(self, prompt_ids: Sequence[int]) -> int:
        row = self._next
        self._next += 1
        self.rows[row] = list(prompt_ids)
        self.log.append(("new_row", row, len(prompt_ids)))
        return row

    def append(self, row: int, token_ids: Sequence[int]) -> None:
        self._get(row).extend(token_ids)
        self.log.append(("append", row, list(token_ids)))

    def fork(self, row: int, position: int | None = None) -> int:
        tokens = self._get(row)
        if position is not None and not 0 <= position <= len(tokens):
            raise ValueError(f"fork position {position} outside row {row} of length {len(tokens)}")
        new = self._next
        self._next += 1
        self.rows[new] = list(tokens if position is None else tokens[:position])
        self.log.append(("fork", row, position, new))
        return new

    def release(self, row: int) -> None:
        self._get(row)
        self.released.add(row)
        self.log.append(("release", row))

    def tokens(self, row: int) -> list[int]:
        return list(self._get(row))

    @property
    def live_rows(self) -> set[int]:
        return set(self.rows) - self.released

    # ------------------------------------------------------------------ generation

    def generate(
        self, rows: Sequence[int], max_new_tokens: int | Sequence[int], stop: Sequence[str] = ()
    ) -> list[Generation]:
        budgets = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        assert len(budgets) == len(rows)
        self.generate_calls.append(list(zip(rows, budgets)))
        self.log.append(("generate", list(rows), list(budgets), tuple(stop)))
        return [self._generate_one(r, b, stop) for r, b in zip(rows, budgets)]

    def _generate_one(self, row: int, budget: int, stop: Sequence[str]) -> Generation:
        return self._reply(row, budget, stop)

    def _reply(self, row: int, budget: int, stop: Sequence[str], draw: int | None = None) -> Generation:
        """The row's next segment from the script, appended to the row; `draw` defaults to
        the number of earlier samples of the same context."""
        tokens = self._get(row)
        context = self.tok.decode(tokens)
        if draw is None:
            draw = self.draws[context]
            self.draws[context] += 1
        reply = self.script(context, draw)
        if isinstance(reply, str):
            reply = Reply(reply)
        ids = self.tok.encode(reply.text) + [self.tok.eos_token_id]
        ent = reply.entropy
        ents = [float(ent)] * len(ids) if isinstance(ent, (int, float)) else list(ent)
        ents += [ents[-1] if ents else 0.0] * (len(ids) - len(ents))
        out: list[int] = []
        finish, matched = "length", None
        for i, tid in enumerate(ids):
            if len(out) >= budget:
                break
            out.append(tid)
            if tid == self.tok.eos_token_id:
                finish = "eos"
                break
            text = self.tok.decode(out)
            hit = next((s for s in stop if text.endswith(s)), None)
            if hit is not None:
                finish, matched = "stop", hit
                break
        n = len(out)
        tokens.extend(out)
        return Generation(
            token_ids=out,
            logprobs=[-0.5 - 0.01 * i for i in range(n)],
            entropies=ents[:n],
            finish=finish,  # type: ignore[arg-type]
            stop=matched,
        )


class FakeTools:
    """A tool_fn that answers `name(arg)` with `result_fn(name, arg)` and records every batch."""

    def __init__(self, result_fn: Callable[[str, str], str] | None = None) -> None:
        self.result_fn = result_fn or (lambda name, arg: f"found {arg}")
        self.batches: list[list[tuple[str, str]]] = []

    def __call__(self, calls: list[tuple[str, str]]) -> list[ToolCall]:
        self.batches.append(list(calls))
        return [ToolCall(name=n, argument=a, result=self.result_fn(n, a)) for n, a in calls]


class PausingSampler(ScriptedSampler):
    """A ScriptedSampler that can pause (`can_pause`): called with `pause` > 0, it returns at
    most `every` tokens of a row's reply per call, with finish "paused" until the reply ends;
    the next call continues the same reply. Tokens, log-probs and entropies are those of the
    reply in one piece, so a rollout must come out as with `ScriptedSampler`."""

    can_pause = True

    def __init__(self, tokenizer: CharTokenizer, script: Script, every: int = 2) -> None:
        super().__init__(tokenizer, script)
        self.every = every
        self.open: dict[int, Generation] = {}  # row -> the rest of a paused reply
        self.pauses = 0

    def generate(
        self, rows: Sequence[int], max_new_tokens: int | Sequence[int], stop: Sequence[str] = (),
        pause: float = 0.0,
    ) -> list[Generation]:
        if not pause:
            assert not any(r in self.open for r in rows), "a paused row continued without pause"
            return super().generate(rows, max_new_tokens, stop)
        budgets = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self.generate_calls.append(list(zip(rows, budgets)))
        self.log.append(("generate", list(rows), list(budgets), tuple(stop)))
        outs = []
        for row, budget in zip(rows, budgets):
            full = self.open.pop(row, None)
            if full is None:
                full = self._generate_one(row, budget, stop)
                del self._get(row)[len(self._get(row)) - len(full.token_ids):]  # emitted below
            k = self.every
            self._get(row).extend(full.token_ids[:k])
            if len(full.token_ids) > k:
                self.open[row] = Generation(full.token_ids[k:], full.logprobs[k:], full.entropies[k:],
                                            full.finish, full.stop)
                outs.append(Generation(full.token_ids[:k], full.logprobs[:k], full.entropies[:k], "paused"))
                self.pauses += 1
            else:
                outs.append(full)
        return outs

    def release(self, row: int) -> None:
        assert row not in self.open, "a paused row was released"
        super().release(row)


def hand_trajectory(*parts: tuple[str, str], finish: str = "answer") -> Trajectory:
    """A trajectory whose segments are `parts` (CharTokenizer ids), as the agent records them."""
    t = Trajectory(prompt_id="p", row_id=0, prompt_ids=[], finish_reason=finish)
    for role, text in parts:
        ids = CharTokenizer().encode(text)
        start = len(t.response_ids)
        t.response_ids += ids
        t.response_mask += [int(role == "model")] * len(ids)
        t.segments.append(SegmentRecord(role, start, start + len(ids), None, text))  # type: ignore[arg-type]
    t.text = CharTokenizer().decode(t.response_ids)
    return t


class ScriptedStepSampler(ScriptedSampler):
    """A ScriptedSampler with a running batch (`open_batch`, as `TorchSampler`'s `SlotBatch`):
    each running row emits one token of its reply per `step`. The reply to a row's context is
    `script(context, draw)` with draw = the row's key (row_id + 100 * kind), not a call count,
    so what a row samples does not depend on the order rows ran in. `stats` records the most
    rows that ran in one step."""

    can_step = True

    def __init__(self, tokenizer: CharTokenizer, script: Script) -> None:
        super().__init__(tokenizer, script)
        self.batch: _ScriptedBatch | None = None

    def open_batch(self, stop: Sequence[str] = (), max_rows: int = 256) -> _ScriptedBatch:
        assert self.batch is None, "a running batch is open"
        self.batch = self.last_batch = _ScriptedBatch(self, tuple(stop), max_rows)
        return self.batch

    def release(self, row: int) -> None:
        if self.batch is not None:
            self.batch.rows.pop(row, None)
        super().release(row)

    def close_batch(self) -> None:
        assert self.batch is not None and not self.batch.active
        self.batch = None


class _ScriptedBatch:
    def __init__(self, sampler: ScriptedStepSampler, stop: tuple[str, ...], max_rows: int) -> None:
        self.s, self.stop, self.max_rows = sampler, stop, max_rows
        self.rows: dict[int, tuple[Generation, list[int]]] = {}  # row -> (whole reply, emitted)
        self.steps = self.row_steps = self.widest = 0

    @property
    def active(self) -> int:
        return len(self.rows)

    def stats(self) -> dict:
        return {}

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    def generated(self, row: int) -> int:
        return len(self.rows[row][1])

    def entropies(self, row: int) -> list[float]:
        full, emitted = self.rows[row]
        return full.entropies[:len(emitted)]

    def start(self, row: int, budget: int, key: Sequence[int]) -> None:
        assert row not in self.rows and len(self.rows) < self.max_rows and budget >= 1
        if len(key) == 3:  # (kind, prompt, row_id): a group row, a probe, a root sample
            kind, _, row_id = key
            draw = row_id + 100 * kind
        else:  # a branch: its parent's key, then (tool call, 4 + z)
            draw = 400 + stream_state(0, key) % 1024
        tokens = self.s._get(row)
        n = len(tokens)
        full = self.s._reply(row, budget, self.stop, draw=draw)
        del tokens[n:]  # emitted one per step below
        self.rows[row] = (full, [])

    def step(self) -> list[tuple[int, Generation]]:
        self.steps += 1
        self.row_steps += len(self.rows)
        self.widest = max(self.widest, len(self.rows))
        ended = []
        for row in list(self.rows):
            full, emitted = self.rows[row]
            token = full.token_ids[len(emitted)]
            emitted.append(token)
            self.s._get(row).append(token)
            if len(emitted) == len(full.token_ids):
                del self.rows[row]
                ended.append((row, full))
        return ended
