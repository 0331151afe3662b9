"""QA answer matching: SQuAD/HotpotQA normalisation, token F1 and exact match.

`normalize_answer` is the SQuAD/HotpotQA one (lower-case, drop punctuation and the articles
a/an/the, collapse whitespace) with these changes: accents are stripped (NFKD), unicode
punctuation and quotes count as punctuation, a decimal point between two digits is kept ("1.5"
is not "15"), a percent sign after a number is kept ("50%" is not "50"), and the articles are
kept when removing them would leave nothing (a gold "The" is "the", not ""), and so are
symbols when nothing else is left (a flag emoji is itself). Exact match also
accepts two spellings of the same calendar date. An empty normalised string matches nothing,
so "-" or "." never equals a gold; empty gold answers are dropped (docs/algorithms.md
section 7).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["em", "f1", "normalize_answer"]


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PERCENT_RE = re.compile(r"(\d)\s*[%\uff05\ufe6a]")  # "50 %", fullwidth and small percent signs
_YES_NO = ("yes", "no", "noanswer")


def normalize_answer(text: Any) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse whitespace (SQuAD style);
    decimal points and percent signs after a number are kept, articles too when they are all
    there is, and symbols when nothing else is left (a flag emoji gold is itself, not "")."""
    s = unicodedata.normalize("NFKD", str(text))
    s = "".join(ch for ch in s if not unicodedata.combining(ch)).lower()
    s = _PERCENT_RE.sub(r"\1%", s)
    for categories in ("PS", "P"):  # symbols only when nothing else is left
        words = _ARTICLES_RE.sub(" ", _strip_punct(s, categories)).split()
        if words:
            return " ".join(words)
    return " ".join(_strip_punct(s, "PS").split())  # "The" alone: the article is the answer


def _strip_punct(s: str, categories: str) -> str:
    """`s` without the characters of these unicode categories (P: punctuation, S: symbols),
    except a decimal point between digits and a percent sign after a digit."""
    out = []
    for i, ch in enumerate(s):
        if unicodedata.category(ch)[0] in categories:
            between_digits = 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit()
            if ch == "." and between_digits:
                out.append(ch)  # keep decimal points: "1.5" is not "15"
            elif ch == "%" and i > 0 and s[i - 1].isdigit():
                out.append(ch)  # keep percent signs: "50%" is not "50"
            continue
        out.append(ch)
    return "".join(out)


def _as_gold_list(golds: Any) -> list[str]:
    """The gold answers as strings; None and empty (or all-whitespace) ones dropped."""
    if golds is None:
        return []
    if isinstance(golds, (str, int, float)):
        golds = [golds]
    return [str(g) for g in golds if g is not None and str(g).strip()]


def _token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in _YES_NO or g in _YES_NO) and p != g:
        return 0.0  # HotpotQA rule: a yes/no answer is all or nothing
    p_toks, g_toks = p.split(), g.split()
    if not p_toks or not g_toks:
        return 0.0  # nothing left to compare: "-" is not an answer to anything
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
    p = normalize_answer(pred)
    if p and p == normalize_answer(gold):
        return True
    date = _parse_date(pred)
    return date is not None and date == _parse_date(gold)


def em(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer (or the same date)."""
    if pred is None:
        return 0.0
    return float(any(_exact(pred, g) for g in _as_gold_list(golds)))
