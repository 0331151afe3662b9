"""Math answer equivalence (`math_equal`).

Uses the `math-verify` package when it is installed and the built-in checker below cannot read
the pair (sets, matrices, ...); where the built-in checker reads both sides, its verdict is
final, so math-verify's tolerance or unit handling cannot accept a look-alike. It covers:
  * wrappers: `$...$`, `\\(...\\)`, `\\boxed{}`, `\\text{}`/`\\mathrm{}`/`\\mbox{}`,
    `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, LaTeX spacing, `\\displaystyle`, a trailing period;
  * currency signs ($, \\$, EUR/GBP/YEN signs), degree marks (`^\\circ`), a leading `x =`;
  * numbers: thousands separators ("1,000", "1 000"), leading zeros ("025"), decimals,
    fractions (`\\frac{1}{2}`, `\\frac12`, `1/2`), mixed numbers (`1\\frac{4}{5}`), percentages
    ("50%" and "50 percent" equal 0.5; they equal 50 only when the gold is "50%");
  * unit words after a number ("1.95 m", "5 cm^2", "3 square feet"), dropped only when the
    other side has the same unit ("5 km" vs "5 kilometers") or none ("5 km" vs "5"): "3 days"
    is not "3 hours";
  * count nouns after a number when the gold answer is a bare number ("18 eggs" vs "18"): one
    or two lower-case words, never one that changes or hedges the number (magnitudes "5
    million", "3 dozen"; operators "5 squared"; eras "1990 BC"; "1837 or later", "5 is not");
  * expressions (`aepo.rewards.expression`): numbers and rational expressions exactly, others
    numerically, with single-letter variables compared at fixed random points (so "p - q"
    equals "-q + p"); two bare numbers are not a product ("1 5" is not 5);
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
from aepo.rewards.expression import expressions_equal, is_expression

__all__ = ["PURE_NUMBER_RE", "math_equal"]


_TEXT_CMDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "operatorname")
# unit words and their canonical name: "5 km" equals "5 kilometers", not "5 cm"
_UNIT_GROUPS = (
    "m meter meters metre metres", "cm centimeter centimeters centimetre centimetres",
    "mm millimeter millimeters millimetre millimetres", "km kilometer kilometers kilometre kilometres",
    "nm nanometer nanometers", "in inch inches", "ft foot feet", "yd yard yards", "mi mile miles",
    "g gram grams", "kg kilogram kilograms", "mg milligram milligrams", "lb lbs pound pounds",
    "oz ounce ounces", "ton tons tonne tonnes", "l liter liters litre litres",
    "ml milliliter milliliters millilitre millilitres", "gallon gallons", "quart quarts", "pint pints",
    "cup cups", "s sec secs second seconds", "min mins minute minutes", "h hr hrs hour hours",
    "day days", "week weeks", "month months", "year years", "mph", "kph kmh km/h", "m/s",
    "dollar dollars usd", "cent cents", "eur euro euros", "sterling", "deg degree degrees",
    "unit units",
)
_UNITS = {w: g.split()[0] for g in _UNIT_GROUPS for w in g.split()}
_ONE_LETTER_UNITS = frozenset("mglLsh")  # as written: "5 M" is not 5 meters
_UNIT_MODIFIERS = frozenset({"sq", "square", "cubic", "per"})  # only before a unit: "square feet"
# words that change or hedge the number before them: never dropped as units or count nouns
_NOT_NOUNS = frozenset(
    """million millions billion billions trillion trillions thousand thousands hundred hundreds
    dozen dozens score scores gross lakh lakhs crore crores myriad myriads k mn bn mio mln bil
    grand pair pairs couple couples half halves third thirds quarter quarters fifth tenth tenths
    percent pct squared cubed square cube cubes factorial plus minus times over divided root
    roots power powers inverse reciprocal negative positive exponent
    bc ad bce ce bp ybp
    or and nor not no is are was were isnt arent wasnt be but than then to till until through
    thru less more fewer extra least most maybe perhaps possibly probably likely approximately
    approx about around roughly nearly almost circa ish some several few many later earlier
    before after since ago above below under from of in on at by the an a
    zero one two three four five six seven eight nine ten eleven twelve twenty thirty forty
    fifty sixty seventy eighty ninety""".split()
)
PURE_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_NUMBER_THEN_WORD_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)\s*[A-Za-z]{2,}")
_TWO_NUMBERS_RE = re.compile(r"\d\s+[-+]?\.?\d")
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
    s = re.sub(r"(?<=\d) (?=\d{3}(?!\d))", "", s)  # "1 000 000": a space as thousands separator
    return re.sub(r"(\d)\s*(?:percent|per cent|pct)\b", r"\1%", s, flags=re.IGNORECASE)


def _split_unit(s: str) -> tuple[str, str | None]:
    """(number, canonical unit) when `s` is a number followed by unit words ("1.95 m",
    "5 cm^2", "12km", "3 square feet"), else (s, None). A single letter glued to the number
    ("2m") may be a variable and is kept."""
    m = re.fullmatch(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?%?)\s*([A-Za-z][A-Za-z/ ^\d.]*)", s)
    if not m:
        return s, None
    glued = s[len(m.group(1))] != " "
    if glued and len(m.group(2)) < 2:
        return s, None
    unit = _unit_name(m.group(2))
    return (m.group(1), unit) if unit is not None else (s, None)


def _unit_name(text: str) -> str | None:
    """The canonical name of a unit phrase ("km^2" -> "km^2", "square feet" -> "square ft"),
    None when a word is not a unit or a modifier is not followed by one."""
    raw = re.sub(r"\^\s*(\d)", r" ^\1", text.replace(".", " ")).split()
    if any(len(w) == 1 and w not in _ONE_LETTER_UNITS for w in raw):
        return None  # "5 M", "5 K", "5 B": magnitudes or variables, not units
    words = [w.lower() for w in raw]
    out: list[str] = []
    for i, w in enumerate(words):
        if w.startswith("^") and out and out[-1] not in _UNIT_MODIFIERS:
            out[-1] += w  # "cm^2": a power belongs to its unit
        elif w in _UNIT_MODIFIERS and i + 1 < len(words) and words[i + 1] in _UNITS:
            out.append(w.replace("sq", "square") if w == "sq" else w)
        elif w in _UNITS:
            out.append(_UNITS[w])
        else:
            return None
    return " ".join(out) if out else None


def _count_noun(s: str) -> str | None:
    """The number of "18 eggs" / "3 red apples": a number followed by one or two plain words
    (three or more letters, lower-case) none of which changes or hedges it (`_NOT_NOUNS`:
    "5 million", "5 squared", "1990 BC", "1837 or later", "5 is not ..."); else None."""
    m = re.fullmatch(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s+([a-z]{3,}(?: [a-z]{3,})?)", s)
    if not m or any(w in _NOT_NOUNS for w in m.group(2).split()):
        return None
    return m.group(1)


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
    verdict = _builtin_verdict(str(pred), str(gold))
    if verdict is not None:
        return verdict
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
    return bool(_builtin_verdict(pred, gold))


def _builtin_verdict(pred: str, gold: str) -> bool | None:
    """True / False when the built-in checker decides the pair, None when it cannot read one
    side (sets, matrices, ...: math-verify's turn). A "no" on numbers, units, percentages or
    words is final, so math-verify's own tolerance and unit or percent handling cannot turn a
    look-alike ("3 days" for "3 hours", "0.3333333" for 1/3) into a match."""
    a, b = _canon_math(pred), _canon_math(gold)
    if not a or not b:
        return False
    (a, unit_a), (b, unit_b) = _split_unit(a), _split_unit(b)
    if unit_a is not None and unit_b is not None and unit_a != unit_b:
        return False  # "3 days" is not "3 hours", "5 km" not "5 cm"
    if unit_a is None and PURE_NUMBER_RE.fullmatch(_squash(b)):  # bare-number gold: "18 eggs"
        a = _count_noun(a) or a
    if _structured_equal(a, b):
        return True
    decided = (unit_a or unit_b or "%" in a + b or _NUMBER_THEN_WORD_RE.match(a) or _NUMBER_THEN_WORD_RE.match(b)
               or _has_word(a) or _has_word(b)  # math-verify reads "Evlyne" as E*v*l*y*n*e = "Evelyn"
               or _TWO_NUMBERS_RE.search(a) or _TWO_NUMBERS_RE.search(b))  # ... and "1 5" as 1*5
    if _squash(a).lower() == _squash(b).lower():
        return None  # "\\text{(c)}" for "(C)", "3r^2" for "3R^2": math-verify's call, as before
    return False if decided or (_readable(a) and _readable(b)) else None


def _has_word(s: str) -> bool:
    """Whether `s` has a run of 3+ letters outside LaTeX commands and function names."""
    return bool(re.search(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+|sqrt|sin|cos|tan|cot|sec|csc|log|exp", " ", s)))


def _readable(s: str) -> bool:
    """Whether the built-in checker reads every element of `s` as an expression."""
    outer = _outer_brackets(s)
    return all(is_expression(e) for e in _split_top_level(outer[2] if outer else s))


def _squash(s: str) -> str:
    """`s` without spaces, except one between two digits ("1 5" is not "15")."""
    return re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", s)


def _structured_equal(a: str, b: str) -> bool:
    """`a` (the prediction) equals `b` (the gold) as a tuple, interval, list or scalar."""
    if _squash(a) == _squash(b):
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
    """`a` (the prediction) equals the scalar `b` (the gold). A percentage is its value over 100
    ("50%" equals 0.5, not 50); a number equals a percentage gold with the same number ("50"
    equals "50%"), since the % is then the question's unit."""
    if _squash(a) == _squash(b):
        return True
    va, vb = _percent_core(a), _percent_core(b)
    if va is not None and vb is not None:
        return expressions_equal(va, vb)
    if va is not None:
        return expressions_equal(f"({va})/100", b)
    if vb is not None:
        return expressions_equal(a, vb) or expressions_equal(a, f"({vb})/100")
    return expressions_equal(a, b)


def _percent_core(s: str) -> str | None:
    s = s.strip()
    return s[:-1].strip() if s.endswith("%") else None
