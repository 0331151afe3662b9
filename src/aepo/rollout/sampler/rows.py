"""Row handles and their token ids, kept the same way by every sampler (`aepo.types.Sampler`)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Row", "RowTable"]


@dataclass
class Row:
    """A row's token ids (prompt, generated and appended); the torch sampler adds its KV chunks."""

    ids: list[int]
    chunks: list[Any] = field(default_factory=list)
    n_cached: int = 0
    # the last tokens of `ids` when a `generate` call paused the row mid-segment: the next call
    # matches stop strings over them too, so a stop spanning the pause is found
    open: list[int] = field(default_factory=list)


class RowTable:
    """Integer handles -> rows, with the checks every sampler makes on its inputs."""

    vocab_size: int

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self._rows: dict[int, Row] = {}
        self._handles = itertools.count()

    def _row(self, row: int) -> Row:
        try:
            return self._rows[row]
        except KeyError:
            raise ValueError(f"unknown row handle {row!r} (never created, or released)") from None

    def _check_ids(self, token_ids: Sequence[int], what: str) -> list[int]:
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _add(self, state: Row) -> int:
        handle = next(self._handles)
        self._rows[handle] = state
        return handle

    def new_row(self, prompt_ids: Sequence[int]) -> int:
        """Create a row holding `prompt_ids` (no generation yet); returns its handle."""
        ids = self._check_ids(prompt_ids, "new_row")
        if not ids:
            raise ValueError("new_row: prompt_ids is empty; a row needs at least one token")
        return self._add(Row(ids=ids))

    def append(self, row: int, token_ids: Sequence[int]) -> None:
        """Append external tokens (a tool result); they are not sampled."""
        state = self._row(row)
        state.ids.extend(self._check_ids(token_ids, "append"))
        state.open = []

    def _fork_length(self, row: int, position: int | None) -> tuple[Row, int]:
        state = self._row(row)
        n = len(state.ids) if position is None else int(position)
        if not 1 <= n <= len(state.ids):
            raise ValueError(f"fork: position {position} outside [1, {len(state.ids)}] for row {row}")
        return state, n

    def fork(self, row: int, position: int | None = None) -> int:
        """New row with the first `position` tokens of `row` (all when None)."""
        state, n = self._fork_length(row, position)
        return self._add(Row(ids=state.ids[:n]))

    def release(self, row: int) -> None:
        """Free a row's memory; the handle is invalid afterwards."""
        self._row(row)
        del self._rows[row]

    def tokens(self, row: int) -> list[int]:
        """All token ids of a row: prompt, generated and appended."""
        return list(self._row(row).ids)

    @property
    def n_rows(self) -> int:
        """Rows currently alive."""
        return len(self._rows)

    def _budgets(self, rows: Sequence[int],
                 max_new_tokens: int | Sequence[int]) -> tuple[list[int], list[int]]:
        """(handles, per-row token budgets) of a `generate` call, checked."""
        handles = [int(r) for r in rows]
        if len(set(handles)) != len(handles):
            raise ValueError(f"generate: rows must be distinct, got {handles}")
        for handle in handles:
            self._row(handle)
        if isinstance(max_new_tokens, int):
            budgets = [max_new_tokens] * len(handles)
        else:
            budgets = [int(b) for b in max_new_tokens]
            if len(budgets) != len(handles):
                raise ValueError(f"generate: {len(budgets)} max_new_tokens values for {len(handles)} rows")
        if any(b < 0 for b in budgets):
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {budgets}")
        return handles, budgets
