"""Rewards for tool-using rollouts (ALGORITHMS.md section 7): format gate, answer extraction,
QA token F1 / exact match, math equivalence, and a registry of scorers chosen by data source.

    score("<think>..</think><answer>Paris</answer>", ["Paris"], "hotpotqa")
    -> {"reward": 1.0, "f1": 1.0, "em": 1.0, "acc": 1.0, "format_ok": True, "answer": "Paris", ...}

Rewards read only what the model wrote. A response is a list of parts, ("model", text) written
by the policy and ("tool", text) inserted by the environment; `score_trajectory` takes the parts
from a rollout's segments (by token position), `score` cuts a joined text at its `<result>`
blocks (`split_response`). Both go through `score_parts`: each tool part is one opaque result
block, a result tag inside model text is a format failure (the model forging environment
output), and the answer and the tool calls come from model text only, so a tool that prints
`<answer>...</answer>` answers nothing.

`score_trajectory` is the function the trainer and the evaluation use; the pieces are public
so logging and tests can use them on their own.

QA normalisation (`normalize_answer`) is the SQuAD/HotpotQA one (lower-case, drop punctuation
and the articles a/an/the, collapse whitespace) with three additions that only ever make two
spellings of the same answer agree: accents are stripped (NFKD), unicode punctuation and
quotes count as punctuation, and a decimal point between two digits is kept ("1.5" is not
"15"). Exact match also accepts two spellings of the same calendar date.

Math equivalence (`math_equal`) uses the `math-verify` package when it is installed and the
built-in checker below does not already accept the pair. The built-in checker covers:
  * wrappers: `$...$`, `\\(...\\)`, `\\boxed{}`, `\\text{}`/`\\mathrm{}`/`\\mbox{}`,
    `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, LaTeX spacing, `\\displaystyle`, a trailing period;
  * currency signs ($, \\$, EUR/GBP/YEN signs), degree marks (`^\\circ`), a leading `x =`;
  * numbers: thousands separators ("1,000"), leading zeros ("025"), decimals, fractions
    (`\\frac{1}{2}`, `\\frac12`, `1/2`), percentages ("50%" equals both 50 and 0.5);
  * unit words after a number ("1.95 m", "5 cm^2", "3 hours"), and any trailing words when
    the gold answer is a bare number ("18 eggs" vs "18");
  * expressions with `+ - * / ^`, implicit multiplication, `\\sqrt`, `\\sqrt[n]`, `\\pi`, `i`,
    `\\sin`/`\\cos`/`\\tan`/`\\cot`/`\\sec`/`\\csc`/`\\log`/`\\ln`/`\\exp`: evaluated numerically
    (complex arithmetic, relative tolerance 1e-6); expressions with single-letter variables are
    compared at fixed random points (so "p - q" equals "-q + p");
  * tuples and intervals element by element with the same brackets; bare comma-separated
    lists ("1, -2") as unordered collections;
  * anything else (e.g. "52_8", "\\text{Evelyn}") by whitespace-free string comparison.
Not covered without math-verify: matrices, set-builder notation, inequalities, equations
with more than one `=`, symbolic equality that random points cannot see.
"""

from __future__ import annotations

import cmath
import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from aepo.rollout.protocol import ANSWER_TAG, PROTOCOL_TAGS, RESULT_TAG, THINK_TAG, TOOL_TAGS

if TYPE_CHECKING:
    from aepo.rollout.types import Trajectory

__all__ = [
    "DEFAULT_EOS_TOKENS",
    "TAGS",
    "TOOL_TAGS",
    "AnswerScore",
    "Part",
    "Scorer",
    "available_scorers",
    "check_format",
    "check_format_parts",
    "em",
    "extract_answer",
    "extract_boxed",
    "f1",
    "get_scorer",
    "math_equal",
    "math_scorer",
    "model_text",
    "normalize_answer",
    "parse_tool_calls",
    "qa_scorer",
    "register_scorer",
    "score",
    "score_parts",
    "score_trajectory",
    "scorer_name_for",
    "split_response",
    "trajectory_parts",
]

TAGS: tuple[str, ...] = PROTOCOL_TAGS
Part = tuple[Literal["model", "tool"], str]  # who wrote a piece of a response, and its text
DEFAULT_EOS_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)

_TAG_RE = re.compile(r"<(/?)(" + "|".join(map(re.escape, TAGS)) + r")>")
_ANSWER_RE = re.compile(rf"<{ANSWER_TAG}>(.*?)</{ANSWER_TAG}>", re.DOTALL)
_RESULT_OPEN, _RESULT_CLOSE = f"<{RESULT_TAG}>", f"</{RESULT_TAG}>"

# ============================================================================ QA matching

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


# ============================================================================ extraction


def _balanced_brace(text: str, open_pos: int) -> int | None:
    """Index of the `}` matching the `{` at `open_pos`, or None when unbalanced."""
    depth = 0
    for i in range(open_pos, len(text)):
        ch = text[i]
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`), braces balanced."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    for m in reversed(starts):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _balanced_brace(text, i)
            if end is not None:
                return text[i + 1 : end].strip()
        elif i > m.end():  # "\boxed 5": the next token
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0)
    return None


def split_response(text: str) -> list[Part]:
    """A joined response cut into parts: each `<result>` block up to the first `</result>`
    after it (to the end when unclosed) is a "tool" part, the text between is "model" text.

    Exact only when tool output cannot contain `</result>`, which `format_result` ensures by
    escaping it; rollouts have exact parts in their segments (`trajectory_parts`).
    """
    parts: list[Part] = []
    i = 0
    while (start := text.find(_RESULT_OPEN, i)) >= 0:
        end = text.find(_RESULT_CLOSE, start + len(_RESULT_OPEN))
        stop = len(text) if end < 0 else end + len(_RESULT_CLOSE)
        if start > i:
            parts.append(("model", text[i:start]))
        parts.append(("tool", text[start:stop]))
        i = stop
    if i < len(text):
        parts.append(("model", text[i:]))
    return parts


def trajectory_parts(traj: Trajectory) -> list[Part]:
    """The parts of a rollout, by position: one per segment (`Trajectory.segments`), so tool
    output is known by where the environment inserted it, never by the tags it contains.

    A trailing end-of-sequence string that `traj.text` dropped is dropped here too. A
    trajectory without segments falls back to `split_response(traj.text)`.
    """
    segments = getattr(traj, "segments", None) or []
    if not segments:
        return split_response(str(getattr(traj, "text", "")))
    parts: list[Part] = [(_checked_role(seg.role), str(seg.text)) for seg in segments]
    return _drop_final_eos(parts, str(getattr(traj, "text", "")), getattr(traj, "finish_reason", ""))


def _checked_role(role: Any) -> Literal["model", "tool"]:
    if role not in ("model", "tool"):
        raise ValueError(f"a response part's role must be 'model' or 'tool', got {role!r}")
    return role


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


def model_text(parts: Sequence[Part]) -> str:
    """The text the model wrote: its parts joined, tool parts left out."""
    return "".join(text for role, text in parts if _checked_role(role) == "model")


def extract_answer(text: str) -> str | None:
    """The final answer: content of the last <answer>...</answer>, unwrapped from `\\boxed{}`.

    Without a complete answer block, the last `\\boxed{}` anywhere in the text (plain
    chain-of-thought output); None when there is neither. Tool results (`<result>` blocks, see
    `split_response`) are skipped: only the model's own text can hold its answer.
    """
    return _answer_in(model_text(split_response(text)))


def _answer_in(own_text: str) -> str | None:
    blocks = _ANSWER_RE.findall(own_text)
    if blocks:
        content = blocks[-1].strip()
        boxed = extract_boxed(content)
        return boxed if boxed is not None else content
    return extract_boxed(own_text)


def parse_tool_calls(text: str) -> list[tuple[str, str]]:
    """(tool name, stripped argument) of each tool call in a response, in order.

    Tool results are opaque: tags inside <result>...</result> are not calls.
    """
    return _calls_in(model_text(split_response(text)))


def _calls_in(own_text: str) -> list[tuple[str, str]]:
    return [(name, content.strip()) for name, content in _blocks(own_text) if name in TOOL_TAGS]


def _blocks(text: str) -> Iterator[tuple[str, str]]:
    """(tag name, content) of each innermost <tag>content</tag> block of model text."""
    open_name, open_end = None, 0
    for m in _TAG_RE.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if not closing:
            open_name, open_end = name, m.end()
        elif name == open_name:
            yield name, text[open_end : m.start()]
            open_name = None


# ============================================================================ format gate


def _strip_eos(text: str, eos_tokens: Sequence[str]) -> str:
    s = text.rstrip()
    changed = True
    while changed:
        changed = False
        for tok in eos_tokens:
            if tok and s.endswith(tok):
                s = s[: -len(tok)].rstrip()
                changed = True
    return s


def check_format(text: str, *, eos_tokens: Sequence[str] = DEFAULT_EOS_TOKENS) -> tuple[bool, str]:
    """`check_format_parts` of a joined response cut by `split_response`."""
    return check_format_parts(split_response(text), eos_tokens=eos_tokens)


def check_format_parts(
    parts: Sequence[Part], *, eos_tokens: Sequence[str] = DEFAULT_EOS_TOKENS
) -> tuple[bool, str]:
    """Whether a response follows the tag protocol; (False, reason) names the first problem.

    Rules: in model text, tags among think/search/python/calc/answer open and close in order;
    tool calls may sit inside <think> but nothing else nests; a result tag in model text is a
    failure (only the environment writes results). Every tool call is followed by a tool part,
    one opaque result block that must end with </result>. There is a non-empty <answer>; after
    </answer> only whitespace and end-of-sequence tokens.
    """
    stack: list[str] = []
    awaiting_result: str | None = None
    answer: tuple[int, int, int] | None = None  # (part index, content start, content end)
    for k, (role, text) in enumerate(parts):
        if _checked_role(role) == "tool":
            if answer is not None:
                return False, f"text after </{ANSWER_TAG}> ({_RESULT_OPEN})"
            if awaiting_result is None:
                return False, f"{_RESULT_OPEN} not preceded by a tool call"
            if not text.rstrip().endswith(_RESULT_CLOSE):
                return False, f"unclosed {_RESULT_OPEN}"
            awaiting_result = None
            continue
        for m in _TAG_RE.finditer(text):
            closing, name, tag = m.group(1) == "/", m.group(2), m.group(0)
            if answer is not None:
                return False, f"text after </{ANSWER_TAG}> ({tag})"
            if name == RESULT_TAG:
                return False, f"{tag} written by the model"
            if awaiting_result is not None:
                return False, f"<{awaiting_result}> call without a following {_RESULT_OPEN}"
            if not closing:
                if stack and not (stack[-1] == THINK_TAG and name in TOOL_TAGS):
                    return False, f"<{name}> inside <{stack[-1]}>"
                stack.append(name)
                continue
            if not stack:
                return False, f"</{name}> without <{name}>"
            if stack[-1] != name:
                return False, f"</{name}> closes <{stack[-1]}>"
            stack.pop()
            if name in TOOL_TAGS:
                awaiting_result = name
            elif name == ANSWER_TAG:
                answer = (k, _last_open(text, ANSWER_TAG, m.start()), m.start())
    if stack:
        return False, f"unclosed <{stack[-1]}>"
    if awaiting_result is not None:
        return False, f"<{awaiting_result}> call without a following {_RESULT_OPEN}"
    if answer is None:
        return False, f"no <{ANSWER_TAG}>"
    k, start, end = answer
    if not parts[k][1][start:end].strip():
        return False, f"empty <{ANSWER_TAG}>"
    tail = parts[k][1][end + len(f"</{ANSWER_TAG}>") :] + "".join(t for _, t in parts[k + 1 :])
    if _strip_eos(tail, eos_tokens):
        return False, f"text after </{ANSWER_TAG}>"
    return True, "ok"


def _last_open(text: str, name: str, before: int) -> int:
    return text.rfind(f"<{name}>", 0, before) + len(name) + 2


# ============================================================================ math equivalence

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
_PURE_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?!\d|,\d)")


def _unwrap_commands(s: str, names: Sequence[str]) -> str:
    """Replace `\\name{content}` by `content` for each command in `names` (braces balanced)."""
    pattern = re.compile(r"\\(" + "|".join(names) + r")\s*\{")
    while (m := pattern.search(s)) is not None:
        end = _balanced_brace(s, m.end() - 1)
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
    if _PURE_NUMBER_RE.fullmatch(b.replace(" ", "")):  # bare-number gold: drop trailing words
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
    return any(_expressions_equal(x, y) for x in va for y in vb)


def _percent_variants(s: str) -> list[str]:
    s = s.strip()
    if s.endswith("%"):
        core = s[:-1].strip()
        return [core, f"({core})/100"]
    return [s]


# ---- a small, safe expression evaluator (no eval): LaTeX-ish text -> complex function

_FUNCS: dict[str, Callable[[complex], complex]] = {
    "sqrt": cmath.sqrt,
    "sin": cmath.sin,
    "cos": cmath.cos,
    "tan": cmath.tan,
    "cot": lambda x: 1 / cmath.tan(x),
    "sec": lambda x: 1 / cmath.cos(x),
    "csc": lambda x: 1 / cmath.sin(x),
    "log": cmath.log,
    "ln": cmath.log,
    "exp": cmath.exp,
}
_CONSTS = {"pi": math.pi, "i": 1j}
_TOKEN_RE = re.compile(
    r"\s*(?:(\d+\.?\d*|\.\d+)|(sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|pi)|([A-Za-z])|([-+*/^()]))"
)
_MAX_LEN = 200
_KNOWN_NAMES_RE = re.compile(r"sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|pi")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")


class _ParseError(ValueError):
    pass


def _latex_to_plain(s: str) -> str:
    """Rewrite the LaTeX the evaluator knows into plain infix text; unknown commands fail."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    for _ in range(50):
        m = re.search(r"\\frac\s*", s)
        if not m:
            break
        num, rest = _latex_arg(s, m.end())
        den, rest2 = _latex_arg(s, rest)
        s = s[: m.start()] + f"(({num})/({den}))" + s[rest2:]
    for _ in range(50):
        m = re.search(r"\\sqrt\s*", s)
        if not m:
            break
        j = m.end()
        if j < len(s) and s[j] == "[":
            close = s.find("]", j)
            if close < 0:
                raise _ParseError("unclosed [")
            index, j = s[j + 1 : close], close + 1
            arg, end = _latex_arg(s, j)
            s = s[: m.start()] + f"(({arg})^(1/({index})))" + s[end:]
        else:
            arg, end = _latex_arg(s, j)
            s = s[: m.start()] + f"sqrt({arg})" + s[end:]
    s = re.sub(r"\\(sin|cos|tan|cot|sec|csc|log|ln|exp|pi)\b", r" \1 ", s)
    if "\\" in s:
        raise _ParseError("unknown command")
    return s.replace("{", "(").replace("}", ")")


def _latex_arg(s: str, j: int) -> tuple[str, int]:
    """One argument of a LaTeX command at `j`: a braced group or a single character."""
    while j < len(s) and s[j] == " ":
        j += 1
    if j >= len(s):
        raise _ParseError("missing argument")
    if s[j] == "{":
        end = _balanced_brace(s, j)
        if end is None:
            raise _ParseError("unbalanced braces")
        return s[j + 1 : end], end + 1
    return s[j], j + 1


def _tokenize(s: str) -> list[tuple[str, str]]:
    tokens, i = [], 0
    s = s.rstrip()
    while i < len(s):
        m = _TOKEN_RE.match(s, i)
        if not m or m.end() == i:
            raise _ParseError(f"unexpected {s[i : i + 5]!r}")
        kind = ("num", "name", "var", "op")[[g is not None for g in m.groups()].index(True)]
        tokens.append((kind, m.group(m.lastindex or 0)))
        i = m.end()
    return tokens


class _Parser:
    """Recursive descent: expr := term (+|- term)*; term := unary ((*|/)? unary)*;
    unary := (+|-) unary | power; power := atom (^ unary)?; atom := num | var | const |
    func power | ( expr ). Produces nested tuples evaluated by `_eval`."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.toks, self.pos = tokens, 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise _ParseError("unexpected end")
        self.pos += 1
        return tok

    def parse(self) -> tuple:
        node = self.expr()
        if self.peek() is not None:
            raise _ParseError(f"trailing {self.peek()}")
        return node

    def expr(self) -> tuple:
        node = self.term()
        while (tok := self.peek()) is not None and tok in (("op", "+"), ("op", "-")):
            self.take()
            node = (tok[1], node, self.term())
        return node

    def term(self) -> tuple:
        node = self.unary()
        while (tok := self.peek()) is not None:
            if tok in (("op", "*"), ("op", "/")):
                self.take()
                node = (tok[1], node, self.unary())
            elif tok[0] in ("num", "name", "var") or tok == ("op", "("):
                node = ("*", node, self.power())  # implicit multiplication: 3x, 2\sqrt{2}
            else:
                break
        return node

    def unary(self) -> tuple:
        tok = self.peek()
        if tok in (("op", "-"), ("op", "+")):
            self.take()
            inner = self.unary()
            return ("neg", inner) if tok[1] == "-" else inner
        return self.power()

    def power(self) -> tuple:
        node = self.atom()
        if self.peek() == ("op", "^"):
            self.take()
            node = ("^", node, self.unary())
        return node

    def atom(self) -> tuple:
        kind, text = self.take()
        if kind == "num":
            return ("num", complex(float(text)))
        if kind == "var":
            return ("num", 1j) if text == "i" else ("var", text)
        if kind == "name":
            if text in _CONSTS:
                return ("num", complex(_CONSTS[text]))
            return ("call", text, self.power())
        if text == "(":
            node = self.expr()
            if self.take() != ("op", ")"):
                raise _ParseError("missing )")
            return node
        raise _ParseError(f"unexpected {text!r}")


def _eval(node: tuple, env: dict[str, complex]) -> complex:
    op = node[0]
    if op == "num":
        return node[1]
    if op == "var":
        return env[node[1]]
    if op == "neg":
        return -_eval(node[1], env)
    if op == "call":
        return _FUNCS[node[1]](_eval(node[2], env))
    x, y = _eval(node[1], env), _eval(node[2], env)
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    if op == "/":
        return x / y
    if abs(y) > 1000 or abs(x) > 1e100:  # "^": refuse huge powers instead of hanging
        raise OverflowError("power too large")
    if y.imag == 0 and y.real == int(y.real) and x.imag == 0:
        return complex(x.real ** int(y.real))
    return x**y


def _variables(node: tuple) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    return set().union(*(_variables(c) for c in node[1:] if isinstance(c, tuple)))


def _compile(s: str) -> tuple | None:
    if len(s) > _MAX_LEN:
        return None
    try:
        plain = _latex_to_plain(s)
        if _WORD_RE.search(_KNOWN_NAMES_RE.sub(" ", plain)):
            return None  # a word is text, not a product of single-letter variables
        return _Parser(_tokenize(plain)).parse()
    except (_ParseError, ValueError, IndexError, RecursionError):
        return None


def _close(x: complex, y: complex) -> bool:
    if not (cmath.isfinite(x) and cmath.isfinite(y)):
        return False
    return abs(x - y) <= 1e-6 * max(abs(x), abs(y)) + 1e-9


def _expressions_equal(a: str, b: str) -> bool:
    ta, tb = _compile(a), _compile(b)
    if ta is None or tb is None:
        return False
    names = sorted(_variables(ta) | _variables(tb))
    rng = random.Random(20251015)
    agreed = 0
    for _ in range(4 if names else 1):
        env = {n: complex(rng.uniform(0.5, 2.5)) for n in names}
        try:
            x, y = _eval(ta, env), _eval(tb, env)
        except (ZeroDivisionError, OverflowError, ValueError):
            continue
        if not _close(x, y):
            return False
        agreed += 1
    return agreed > 0


# ============================================================================ scorers


class AnswerScore(TypedDict):
    """What a scorer returns for one extracted answer; `reward` is before the format gate."""

    reward: float
    f1: float
    em: float
    acc: float


Scorer = Callable[[str, list[str]], AnswerScore]
_SCORERS: dict[str, Scorer] = {}
_MATH_SOURCES = ("math", "gsm8k", "math500", "aime24", "aime25", "aime", "amc", "amc23")
_QA_SOURCES = (
    "qa",
    "2wiki",
    "2wikimultihopqa",
    "hotpotqa",
    "musique",
    "bamboogle",
    "nq",
    "triviaqa",
    "popqa",
    "gaia",
    "hle",
    "webwalker",
    "webwalkerqa",
    "frames",
    "xbench",
    "demo",
)


def register_scorer(name: str, *aliases: str) -> Callable[[Scorer], Scorer]:
    """Decorator: make `fn(answer, golds) -> AnswerScore` the scorer for these data sources."""
    names = (name, *aliases)
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"scorer name must be a non-empty string, got {n!r}")

    def deco(fn: Scorer) -> Scorer:
        for n in names:
            _SCORERS[n.strip().lower()] = fn
        return fn

    return deco


def available_scorers() -> list[str]:
    """Every registered data-source name."""
    return sorted(_SCORERS)


def _looks_math(golds: Sequence[str]) -> bool:
    return bool(golds) and all(
        "\\" in g or "$" in g or _PURE_NUMBER_RE.fullmatch(g.replace(",", "").strip()) for g in golds
    )


def scorer_name_for(data_source: str | None, golds: Sequence[str] = ()) -> str:
    """The registry key used for `data_source`.

    Tried in order: the name itself (lower-cased); its last path part ("openai/gsm8k" ->
    "gsm8k"); the longest registered name it starts with ("aime24_test" -> "aime24");
    otherwise "math" when every gold answer is a number or contains LaTeX, else "qa".
    """
    if data_source:
        key = data_source.strip().lower()
        for cand in (key, key.rsplit("/", 1)[-1]):
            if cand in _SCORERS:
                return cand
        tail = key.rsplit("/", 1)[-1]
        prefixes = [n for n in _SCORERS if tail.startswith(n)]
        if prefixes:
            return max(prefixes, key=len)
    return "math" if _looks_math(list(golds)) else "qa"


def get_scorer(data_source: str | None, golds: Sequence[str] = ()) -> Scorer:
    """The scorer function for `data_source` (see `scorer_name_for`)."""
    return _SCORERS[scorer_name_for(data_source, golds)]


@register_scorer(*_QA_SOURCES)
def qa_scorer(answer: str, golds: list[str]) -> AnswerScore:
    """Token F1 as reward; accuracy is exact match, or numeric equality for numeric golds
    ("1.95" vs "1.95 m"), in which case F1 is 1 too."""
    f1_val, em_val = f1(answer, golds), em(answer, golds)
    numeric = any(math_equal(answer, g) for g in golds if any(c.isdigit() for c in g))
    acc = float(em_val > 0 or numeric)
    if acc:
        f1_val = 1.0
    return AnswerScore(reward=f1_val, f1=f1_val, em=em_val, acc=acc)


@register_scorer(*_MATH_SOURCES)
def math_scorer(answer: str, golds: list[str]) -> AnswerScore:
    """1/0 math equivalence as reward, F1 and accuracy; EM is the normalised string match."""
    acc = float(any(math_equal(answer, g) for g in golds))
    return AnswerScore(reward=acc, f1=acc, em=em(answer, golds), acc=acc)


def score(
    response_text: str,
    golds: str | float | Sequence[Any],
    data_source: str | None = None,
    *,
    multi_tool_bonus: float = 0.0,
    format_penalty: float = -1.0,
) -> dict[str, Any]:
    """`score_parts` of a joined response text, cut at its result blocks (`split_response`).

    For text-only callers (SFT data, external reward hooks); rollouts use `score_trajectory`.
    """
    if not isinstance(response_text, str):
        raise ValueError(f"response_text must be a str, got {type(response_text).__name__}")
    return score_parts(split_response(response_text), golds, data_source,
                       multi_tool_bonus=multi_tool_bonus, format_penalty=format_penalty)


def score_trajectory(
    traj: Trajectory,
    golds: str | float | Sequence[Any],
    data_source: str | None = None,
    *,
    multi_tool_bonus: float = 0.0,
    format_penalty: float = -1.0,
) -> dict[str, Any]:
    """`score_parts` of a rollout, its tool output known by position (`trajectory_parts`)."""
    return score_parts(trajectory_parts(traj), golds, data_source,
                       multi_tool_bonus=multi_tool_bonus, format_penalty=format_penalty)


def score_parts(
    parts: Sequence[Part],
    golds: str | float | Sequence[Any],
    data_source: str | None = None,
    *,
    multi_tool_bonus: float = 0.0,
    format_penalty: float = -1.0,
) -> dict[str, Any]:
    """Format-gated reward of one response given as ("model" | "tool", text) parts.

    Invalid format (`check_format_parts`): reward = `format_penalty`. Otherwise the scorer's
    reward (QA: F1, math: 1/0 equivalence) plus `multi_tool_bonus` when the model called more
    than one kind of tool and F1 > 0. The answer and the tool calls are read from model parts
    only. f1/em/acc are computed from the extracted answer whatever the format, so evaluation
    accuracy does not depend on the gate. Keys: reward, f1, em, acc, format_ok, format_reason,
    answer, scorer.
    """
    parts = list(parts)
    gold_list = _as_gold_list(golds)
    if not gold_list:
        raise ValueError("golds must hold at least one gold answer")
    ok, reason = check_format_parts(parts)
    own = model_text(parts)
    answer = _answer_in(own)
    name = scorer_name_for(data_source, gold_list)
    got = _SCORERS[name](answer, gold_list) if answer else AnswerScore(reward=0.0, f1=0.0, em=0.0, acc=0.0)
    if not ok:
        reward = float(format_penalty)
    else:
        reward = float(got["reward"])
        kinds = {n for n, _ in _calls_in(own)}
        if multi_tool_bonus and len(kinds) > 1 and got["f1"] > 0:
            reward += multi_tool_bonus
    return {
        "reward": reward,
        "f1": float(got["f1"]),
        "em": float(got["em"]),
        "acc": float(got["acc"]),
        "format_ok": ok,
        "format_reason": reason,
        "answer": answer,
        "scorer": name,
    }
