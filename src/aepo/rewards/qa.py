"""QA answer matching: SQuAD/HotpotQA normalisation, token F1 and exact match.

`normalize_answer` is the SQuAD/HotpotQA one (lower-case, drop punctuation and the articles
a/an/the, collapse whitespace) with three additions that only ever make two spellings of the
same answer agree: accents are stripped (NFKD), unicode punctuation and quotes count as
punctuation, and a decimal point between two digits is kept ("1.5" is not "15"). Exact match
also accepts two spellings of the same calendar date.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["em", "f1", "normalize_answer"]


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_YES_NO = ("yes", "no", "noanswer")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in ("P", "S")


def normalize_answer(text: Any) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse whitespace (SQuAD style)."""
    s = unicodedata.normalize("NFKD", str(text))
    s = "".join(ch for ch in s if not unicodedata.combining(ch)).lower()
    out = []
    for i, ch in enumerate(s):
        if _is_punct(ch):
            between_digits = 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit()
            if ch == "." and between_digits:
                out.append(ch)  # keep decimal points: "1.5" is not "15"
            continue
        out.append(ch)
    s = _ARTICLES_RE.sub(" ", "".join(out))
    return " ".join(s.split())


def _as_gold_list(golds: Any) -> list[str]:
    if golds is None:
        return []
    if isinstance(golds, (str, int, float)):
        return [str(golds)]
    return [str(g) for g in golds if g is not None]


def _token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in _YES_NO or g in _YES_NO) and p != g:
        return 0.0  # HotpotQA rule: a yes/no answer is all or nothing
    p_toks, g_toks = p.split(), g.split()
    if not p_toks or not g_toks:
        return float(p_toks == g_toks)
    same = sum((Counter(p_toks) & Counter(g_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_toks), same / len(g_toks)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str | None, golds: str | Sequence[str]) -> float:
    """Token-level F1 of the normalised prediction, maximised over the gold answers."""
    if pred is None:
        return 0.0
    return max((_token_f1(pred, g) for g in _as_gold_list(golds)), default=0.0)


_MONTHS = {
    name: i + 1
    for i, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ]
    )
    for name in names
}
_DMY_RE = re.compile(r"(\d{1,2}) (?:of )?([a-z]+) (\d{1,4})")
_MDY_RE = re.compile(r"([a-z]+) (\d{1,2}) (\d{1,4})")
_ISO_RE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")


def _parse_date(text: str) -> tuple[int, int, int] | None:
    """(year, month, day) for '20 June 1837', 'June 20, 1837', '20th of June 1837', '1837-06-20'."""
    s = unicodedata.normalize("NFKD", text).lower().strip().rstrip(".")
    m = _ISO_RE.fullmatch(s)
    if m:
        y, mo, d = (int(x) for x in m.groups())
    else:
        s = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", s)
        s = " ".join(re.sub(r"[,.]", " ", s).split())
        if m := _DMY_RE.fullmatch(s):
            d, mo, y = int(m.group(1)), _MONTHS.get(m.group(2), 0), int(m.group(3))
        elif m := _MDY_RE.fullmatch(s):
            mo, d, y = _MONTHS.get(m.group(1), 0), int(m.group(2)), int(m.group(3))
        else:
            return None
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return None
    return y, mo, d


def _exact(pred: str, gold: str) -> bool:
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    date = _parse_date(pred)
    return date is not None and date == _parse_date(gold)


def em(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer (or the same date)."""
    if pred is None:
        return 0.0
    return float(any(_exact(pred, g) for g in _as_gold_list(golds)))
