"""Where a sampled segment ends: EOS, a stop string or its budget, the same for every sampler.

A stop string that is one token is matched on the token id; the others on the decoded text of
the segment's last tokens, and only after a token whose text could complete one (its piece holds
one of the strings' last characters, or is empty or a partial character), so most tokens cost a
set lookup. Token texts and stop specs are kept per tokenizer, since a trainer makes a new
sampler every step.
"""
from __future__ import annotations

import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["StopSpec", "segment_finish", "stop_spec"]

_CACHE: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


@dataclass
class StopSpec:
    token_stops: dict[int, str]  # stop strings that are one token: id -> string
    text_stops: list[str]  # the others, matched on decoded text
    candidates: list[bool] | None  # token ids whose text may complete a text stop
    window: int  # tokens decoded to look for a text stop


def _tokenizer_cache(tokenizer: Any, fallback: dict) -> dict:
    try:
        return _CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: the caller's own memo
        return fallback


def token_pieces(tokenizer: Any, vocab_size: int, fallback: dict | None = None) -> list[str]:
    """The text of every token id on its own (ids past the tokenizer's, in a padded vocabulary: "")."""
    cache = _tokenizer_cache(tokenizer, {} if fallback is None else fallback)
    pieces = cache.get(("pieces", vocab_size))
    if pieces is None:
        known = min(vocab_size, len(tokenizer))
        pieces = tokenizer.batch_decode([[i] for i in range(known)]) + [""] * (vocab_size - known)
        cache[("pieces", vocab_size)] = pieces
    return pieces


def stop_spec(tokenizer: Any, vocab_size: int, stop: Sequence[str], fallback: dict | None = None) -> StopSpec:
    """How to match `stop` under `tokenizer` (`fallback`: a memo for tokenizers that cannot be
    weakly referenced)."""
    fallback = {} if fallback is None else fallback
    cache = _tokenizer_cache(tokenizer, fallback)
    key = ("stop", vocab_size, tuple(stop))
    if key in cache:
        return cache[key]
    token_stops: dict[int, str] = {}
    text_stops: list[str] = []
    for text in stop:
        if not isinstance(text, str) or not text:
            raise ValueError(f"stop strings must be non-empty strings, got {text!r}")
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids) == text:
            token_stops.setdefault(int(ids[0]), text)
        else:
            text_stops.append(text)
    candidates = None
    window = 0
    if text_stops:
        last_chars = {s[-1] for s in text_stops}
        candidates = [any(ch in piece for ch in last_chars) or "\ufffd" in piece or not piece
                      for piece in token_pieces(tokenizer, vocab_size, fallback)]
        window = max(len(s) for s in text_stops) + 8
    spec = StopSpec(token_stops, text_stops, candidates, window)
    cache[key] = spec
    return spec


def segment_finish(tokenizer: Any, spec: StopSpec, eos_token_ids: Collection[int], generated: list[int],
                   budget: int, before: list[int] | None = None) -> tuple[str, str | None] | None:
    """How a segment whose last token was just sampled ends: ("eos" | "stop" | "length", the
    stop string matched), or None while it goes on. `before`: tokens of the same segment that
    came earlier (a paused call's), so a stop string spanning them is found."""
    token = generated[-1]
    if token in eos_token_ids:
        return ("eos", None)
    if token in spec.token_stops:
        return ("stop", spec.token_stops[token])
    if spec.candidates is not None and spec.candidates[token]:
        tail = tokenizer.decode(((before or []) + generated)[-spec.window:])
        for text in spec.text_stops:
            if text in tail:
                return ("stop", text)
    if len(generated) >= budget:
        return ("length", None)
    return None
