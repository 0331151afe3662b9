"""A small, safe expression evaluator (no `eval`): LaTeX-ish text -> a complex function.

`expressions_equal(pred, gold)` compiles both sides and compares them at fixed random points
when they have single-letter variables (rational points), once otherwise:
  * exactly (fractions) when both sides are rational: numbers, `+ - * /`, integer powers,
    roots of perfect powers. "1000001" is not "1000000", "0.3333333" is not `\\frac13`;
  * else in complex floating point within rounding noise (relative 1e-9), or within relative
    1e-6 when the gold is irrational and the prediction a rational constant: a decimal
    approximation ("1.41421356" for `\\sqrt2`) is accepted, a near miss of a rational gold is not.
Supported: `+ - * / ^`, implicit multiplication (`3x`, `2\\sqrt{2}`, but two numbers side by
side are not a product: "1 5" is not 5), mixed numbers (`1\\frac{4}{5}` is 9/5), `\\sqrt`,
`\\sqrt[n]`, `\\pi`, `i`, `\\sin`/`\\cos`/`\\tan`/`\\cot`/`\\sec`/`\\csc`/`\\log`/`\\ln`/`\\exp`. Inputs
longer than 200 characters, unknown commands and words are not expressions (not equal).
"""
from __future__ import annotations

import cmath
import math
import operator
import random
import re
from collections.abc import Callable
from fractions import Fraction

from aepo.protocol import balanced_brace

__all__ = ["expressions_equal", "is_expression"]


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


_NOISE_TOL = (1e-9, 1e-12)  # (relative, absolute): floating-point rounding only
_APPROX_TOL = (1e-6, 1e-9)  # a decimal approximation of an irrational gold
_MIXED_RE = re.compile(r"(?<![\w.}^_])(\d+)\s*\\frac\s*(?:\{(\d+)\}\s*\{(\d+)\}|(\d)(\d))")


class _ParseError(ValueError):
    pass


class _NotExact(ValueError):
    """The expression is not a rational number at rational points (pi, i, sqrt(2), ...)."""


def _latex_to_plain(s: str) -> str:
    """Rewrite the LaTeX the evaluator knows into plain infix text; unknown commands fail."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = _MIXED_RE.sub(lambda m: f"({m.group(1)}+({m.group(2) or m.group(4)})/({m.group(3) or m.group(5)}))", s)
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
        end = balanced_brace(s, j)
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
            elif tok[0] == "num":
                raise _ParseError("two numbers side by side")  # "1 5" is not 5
            elif tok[0] in ("name", "var") or tok == ("op", "("):
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
            return ("num", complex(float(text)), Fraction(text))
        if kind == "var":
            return ("const", 1j) if text == "i" else ("var", text)
        if kind == "name":
            if text in _CONSTS:
                return ("const", complex(_CONSTS[text]))
            return ("call", text, self.power())
        if text == "(":
            node = self.expr()
            if self.take() != ("op", ")"):
                raise _ParseError("missing )")
            return node
        raise _ParseError(f"unexpected {text!r}")


_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
"""The binary operators both evaluators share; "^" differs (float powers vs exact roots)."""


def _eval(node: tuple, env: dict[str, complex]) -> complex:
    op = node[0]
    if op in ("num", "const"):
        return node[1]
    if op == "var":
        return env[node[1]]
    if op == "neg":
        return -_eval(node[1], env)
    if op == "call":
        return _FUNCS[node[1]](_eval(node[2], env))
    x, y = _eval(node[1], env), _eval(node[2], env)
    if op in _ARITHMETIC:
        return _ARITHMETIC[op](x, y)
    if abs(y) > 1000 or abs(x) > 1e100:  # "^": refuse huge powers instead of hanging
        raise OverflowError("power too large")
    if y.imag == 0 and y.real == int(y.real) and x.imag == 0:
        return complex(x.real ** int(y.real))
    return x**y


def _exact(node: tuple, env: dict[str, Fraction]) -> Fraction:
    """The exact rational value of `node` at rational `env`; _NotExact when it is not one."""
    op = node[0]
    if op == "num":
        return node[2]
    if op == "var":
        return env[node[1]]
    if op == "const":
        raise _NotExact(op)
    if op == "neg":
        return -_exact(node[1], env)
    if op == "call":
        if node[1] != "sqrt":
            raise _NotExact(node[1])
        return _root(_exact(node[2], env), 2)
    x, y = _exact(node[1], env), _exact(node[2], env)
    if op in _ARITHMETIC:
        return _ARITHMETIC[op](x, y)
    if abs(y) > 1000 or abs(x) > 10**100:  # "^": refuse huge powers instead of hanging
        raise OverflowError("power too large")
    if y.denominator > 1:  # a root: "8^(1/3)"
        x, y = _root(x, y.denominator), Fraction(y.numerator)
    return x ** int(y)


def _root(x: Fraction, n: int) -> Fraction:
    """The exact n-th root of `x` when it is rational, else _NotExact."""
    if n > 12 or (x < 0 and n % 2 == 0):
        raise _NotExact("root")
    sign = -1 if x < 0 else 1
    num, den = _int_root(abs(x.numerator), n), _int_root(x.denominator, n)
    return sign * Fraction(num, den)


def _int_root(v: int, n: int) -> int:
    r = round(v ** (1 / n)) if v < 2**1000 else None
    if r is None:
        raise _NotExact("root")
    for c in (r - 1, r, r + 1):
        if c >= 0 and c**n == v:
            return c
    raise _NotExact("root")


def _try_exact(node: tuple, env: dict[str, Fraction]) -> Fraction | None:
    try:
        return _exact(node, env)
    except _NotExact:
        return None


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


def is_expression(s: str) -> bool:
    """Whether `s` is an expression this evaluator reads."""
    return _compile(s) is not None


def _close(x: complex, y: complex, tol: tuple[float, float]) -> bool:
    if not (cmath.isfinite(x) and cmath.isfinite(y)):
        return False
    rel, absolute = tol
    return abs(x - y) <= rel * max(abs(x), abs(y)) + absolute


def expressions_equal(a: str, b: str) -> bool:
    """Whether the prediction `a` and the gold `b` are the same expression (see the module
    docstring for when the comparison is exact and which tolerance applies otherwise)."""
    ta, tb = _compile(a), _compile(b)
    if ta is None or tb is None:
        return False
    names = sorted(_variables(ta) | _variables(tb))
    rng = random.Random(20251015)
    agreed = 0
    for _ in range(4 if names else 1):
        point = {n: Fraction(rng.randint(500, 2500), 1000) for n in names}
        try:
            xa, xb = _try_exact(ta, point), _try_exact(tb, point)
            if xa is not None and xb is not None:
                if xa != xb:
                    return False
                agreed += 1
                continue
            env = {n: complex(v) for n, v in point.items()}
            x, y = _eval(ta, env), _eval(tb, env)
        except (ZeroDivisionError, OverflowError, ValueError):
            continue
        approx = xb is None and xa is not None and not names
        if not _close(x, y, _APPROX_TOL if approx else _NOISE_TOL):
            return False
        agreed += 1
    return agreed > 0
