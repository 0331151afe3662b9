"""Math answer equivalence (`math_equal`).

Uses the `math-verify` package when it is installed and the built-in checker below does not
already accept the pair. The built-in checker covers:
  * wrappers: `$...$`, `\\(...\\)`, `\\boxed{}`, `\\text{}`/`\\mathrm{}`/`\\mbox{}`,
    `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, LaTeX spacing, `\\displaystyle`, a trailing period;
  * currency signs ($, \\$, EUR/GBP/YEN signs), degree marks (`^\\circ`), a leading `x =`;
  * numbers: thousands separators ("1,000"), leading zeros ("025"), decimals, fractions
    (`\\frac{1}{2}`, `\\frac12`, `1/2`), percentages ("50%" equals both 50 and 0.5);
  * unit words after a number ("1.95 m", "5 cm^2", "3 hours"), and any trailing words when
    the gold answer is a bare number ("18 eggs" vs "18");
  * expressions (`aepo.rewards.expression`): evaluated numerically, with single-letter
    variables compared at fixed random points (so "p - q" equals "-q + p");
  * tuples and intervals element by element with the same brackets; bare comma-separated
    lists ("1, -2") as unordered collections;
  * anything else (e.g. "52_8", "\\text{Evelyn}") by whitespace-free string comparison.
Not covered without math-verify: matrices, set-builder notation, inequalities, equations
with more than one `=`, symbolic equality that random points cannot see.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from aepo.protocol import balanced_brace, extract_boxed
from aepo.rewards.expression import expressions_equal

__all__ = ["PURE_NUMBER_RE", "math_equal"]


_TEXT_CMDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "operatorname")
_UNITS = frozenset(
    """m cm mm km nm meter meters metre metres kilometer kilometers centimeter centimeters
    millimeter millimeters inch inches in ft foot feet yd yard yards mi mile miles g kg mg gram
    grams kilogram kilograms lb lbs pound pounds oz ounce ounces ton tons tonne tonnes l ml
    liter liters litre litres gallon gallons quart quarts pint pints cup cups s sec secs second
    seconds min mins minute minutes h hr hrs hour hours day days week weeks month months year
    years mph kph kmh km/h m/s dollar dollars cent cents usd eur euro euros pound sterling degree
    degrees deg percent sq square cubic units unit""".split()
)
PURE_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?!\d|,\d)")


def _unwrap_commands(s: str, names: Sequence[str]) -> str:
    """Replace `\\name{content}` by `content` for each command in `names` (braces balanced)."""
    pattern = re.compile(r"\\(" + "|".join(names) + r")\s*\{")
    while (m := pattern.search(s)) is not None:
        end = balanced_brace(s, m.end() - 1)
        if end is None:
            break
        s = s[: m.start()] + s[m.end() : end] + s[end + 1 :]
    return s


def _canon_math(text: str) -> str:
    """A canonical spelling of a math answer; spaces are kept here, removed by the caller."""
    s = str(text).strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\\$", "").replace("$", "")
    for a in ("\\(", "\\)", "\\[", "\\]", "\\displaystyle", "\\left", "\\right", "\\!", "\\,", "\\;", "\\:"):
        s = s.replace(a, "")
    s = s.replace("\\qquad", " ").replace("\\quad", " ").replace("~", " ").replace("\\ ", " ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _unwrap_commands(s, _TEXT_CMDS)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°", "", s)
    s = s.replace("\\%", "%").replace("{,}", ",")
    s = re.sub(r"[€£¥]", "", s)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)
    s = re.sub(r"\^\{(\w)\}", r"^\1", s)
    s = " ".join(s.split()).strip().rstrip(".").strip()
    if s.count("=") == 1 and re.match(r"^[A-Za-z]\s*=(?!=)", s):
        s = s.split("=", 1)[1].strip()
    s = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
    return _strip_units(s)


def _strip_units(s: str) -> str:
    """Drop unit words after a number: "1.95 m" -> "1.95", "5 cm^2" -> "5", "12km" -> "12"."""
    m = re.fullmatch(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?%?)\s*([A-Za-z][A-Za-z/ ^\d.]*)", s)
    if not m:
        return s
    words = re.sub(r"\^\d|\^|\.", " ", m.group(2)).replace(" per ", " ").split()
    if not words:
        return s
    glued = s[len(m.group(1))] != " "
    if all(w.lower() in _UNITS and not w.isdigit() for w in words) and not (glued and len(m.group(2)) < 2):
        return m.group(1)
    return s


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _outer_brackets(s: str) -> tuple[str, str, str] | None:
    """(open, close, inner) when one bracket pair encloses the whole string: (..), [..], (..]."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    depth = 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                return None
    return s[0], s[-1], s[1:-1]


def math_equal(pred: Any, gold: Any) -> bool:
    """Whether `pred` and `gold` are the same mathematical answer (see the module docstring)."""
    if pred is None or gold is None:
        return False
    if _builtin_math_equal(str(pred), str(gold)):
        return True
    return _math_verify_equal(str(pred), str(gold))


def _math_verify_equal(pred: str, gold: str) -> bool:
    try:
        from math_verify import parse, verify  # type: ignore[import-not-found]
    except ImportError:
        return False
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))
    except Exception:  # math-verify raises on odd input; an unparseable answer is not equal
        return False


def _builtin_math_equal(pred: str, gold: str) -> bool:
    a, b = _canon_math(pred), _canon_math(gold)
    if not a or not b:
        return False
    if PURE_NUMBER_RE.fullmatch(b.replace(" ", "")):  # bare-number gold: drop trailing words
        m = re.fullmatch(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s+[A-Za-z][A-Za-z\s]*", a)
        if m:
            a = m.group(1)
    return _structured_equal(a, b)


def _structured_equal(a: str, b: str) -> bool:
    if a.replace(" ", "") == b.replace(" ", ""):
        return True
    oa, ob = _outer_brackets(a), _outer_brackets(b)
    if oa or ob:
        if not (oa and ob):  # "(x+1)" is a parenthesised scalar, not a 1-tuple
            wrapped = oa or ob
            if wrapped is not None and wrapped[:2] == ("(", ")") and len(_split_top_level(wrapped[2])) == 1:
                return _scalar_equal(a, b)
            return False
        if oa[:2] != ob[:2]:
            return False
        ea, eb = _split_top_level(oa[2]), _split_top_level(ob[2])
        if len(ea) == 1 and len(eb) == 1:
            return _scalar_equal(ea[0], eb[0])
        return len(ea) == len(eb) and all(_structured_equal(x, y) for x, y in zip(ea, eb))
    ea, eb = _split_top_level(a), _split_top_level(b)
    if len(ea) > 1 or len(eb) > 1:  # "1, -2": an unordered list of answers
        if len(ea) != len(eb):
            return False
        remaining = list(eb)
        for x in ea:
            hit = next((j for j, y in enumerate(remaining) if _structured_equal(x, y)), None)
            if hit is None:
                return False
            remaining.pop(hit)
        return True
    return _scalar_equal(a, b)


def _scalar_equal(a: str, b: str) -> bool:
    if a.replace(" ", "") == b.replace(" ", ""):
        return True
    va, vb = _percent_variants(a), _percent_variants(b)
    return any(expressions_equal(x, y) for x in va for y in vb)


def _percent_variants(s: str) -> list[str]:
    s = s.strip()
    if s.endswith("%"):
        core = s[:-1].strip()
        return [core, f"({core})/100"]
    return [s]
