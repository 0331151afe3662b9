"""A safe arithmetic calculator tool ("calc") that walks a Python expression's AST; no `eval`.

Allowed: int and float literals, `+ - * / // % **`, unary `+ -`, parentheses, the constants
`pi` and `e`, and the functions sqrt, abs, round, min, max, floor, ceil, log, exp. Anything else
(names, attributes, comparisons, strings, ...) is refused. Size limits stop expressions that
would take unbounded time or memory: an exponent above `MAX_EXPONENT` in absolute value, or an
integer result longer than `MAX_DIGITS` digits.

Results print the way a person writes them: exact integers without ".0" (`6/3` -> `2`, and
integer division that is exact stays exact for big numbers), other floats with 12 significant
digits (`0.1+0.2` -> `0.3`).
"""

from __future__ import annotations

import ast
import math
import operator
import threading
from collections.abc import Callable
from typing import Union

from aepo.tools.registry import ToolSpec, register_tool

Number = Union[int, float]  # noqa: UP007 - a runtime alias, kept valid on Python 3.10

MAX_EXPONENT = 1000
MAX_DIGITS = 1000
MAX_EXPRESSION_CHARS = 2000
_INT_LIMIT = 10**MAX_DIGITS


class CalcError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message says why."""


def _check_size(value: Number) -> Number:
    if isinstance(value, complex):
        raise CalcError("the result is a complex number")
    if isinstance(value, int) and abs(value) >= _INT_LIMIT:
        raise CalcError(f"the result has more than {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("the result is not a finite number")
    return value


def _true_divide(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalcError("division by zero")
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b  # exact: keep it an integer, even beyond float precision
    return a / b


def _floor_divide(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalcError("division by zero")
    return a // b


def _modulo(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalcError("modulo by zero")
    return a % b


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent {exponent} is too large (limit {MAX_EXPONENT})")
    exact = isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
    if exact and exponent * math.log10(abs(base)) > MAX_DIGITS + 1:
        raise CalcError(f"the result has more than {MAX_DIGITS} digits")
    if base == 0 and exponent < 0:
        raise CalcError("division by zero (zero to a negative power)")
    try:
        return base**exponent
    except OverflowError:
        raise CalcError("the result is too large") from None


_BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: _true_divide,
    ast.FloorDiv: _floor_divide,
    ast.Mod: _modulo,
    ast.Pow: _power,
}
_OPERATOR_HINTS = {ast.BitXor: "'^' is not a power here; use '**'"}


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise CalcError("sqrt of a negative number")
    if isinstance(x, int):
        root = math.isqrt(x)
        if root * root == x:
            return root
    return math.sqrt(x)


def _log(x: Number, base: Number | None = None) -> float:
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise CalcError("log needs a positive argument and a positive base other than 1")
    return math.log(x) if base is None else math.log(x, base)


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise CalcError("round's second argument must be an integer")
    if abs(ndigits) > MAX_DIGITS:
        raise CalcError(f"round's second argument must be within +-{MAX_DIGITS}")
    return round(x, ndigits)


def _exp(x: Number) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        raise CalcError("exp overflow") from None


# name -> (function, minimum args, maximum args or None for any number)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int | None]] = {
    "sqrt": (_sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (min, 1, None),
    "max": (max, 1, None),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "log": (_log, 1, 2),
    "exp": (_exp, 1, 1),
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}


def format_number(value: Number) -> str:
    """Render a result: integers as integers, integral floats without ".0", others compactly."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalcError(f"not a number: {value!r}")
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g")


# CPython 3.11 keeps the AST converter's recursion depth in per-interpreter state: two threads
# in ast.parse at once can fail with "SystemError: AST constructor recursion depth mismatch"
# (seen on the demo: a valid calc call of a concurrent tool batch got that error as its result).
# The tool runner runs calls in threads, so the parse is serialised; it takes microseconds.
_PARSE_LOCK = threading.Lock()


class Calculator:
    """The "calc" tool: evaluate an arithmetic expression and return the result as text."""

    name = "calc"

    def evaluate(self, expression: str) -> Number:
        """Evaluate `expression`; raise `CalcError` saying what is wrong when it cannot."""
        if not isinstance(expression, str):
            raise CalcError(f"expression must be a string, got {type(expression).__name__}")
        text = expression.strip()
        if not text:
            raise CalcError("empty expression")
        if len(text) > MAX_EXPRESSION_CHARS:
            raise CalcError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        try:
            with _PARSE_LOCK:
                tree = ast.parse(text, mode="eval")
        except (SyntaxError, ValueError) as exc:  # ValueError: integer literal too long
            raise CalcError(f"invalid expression: {getattr(exc, 'msg', exc)}") from None
        except (RecursionError, MemoryError):
            raise CalcError("expression nested too deeply") from None
        try:
            return self._eval(tree.body)
        except RecursionError:
            raise CalcError("expression nested too deeply") from None

    def _eval(self, node: ast.AST) -> Number:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise CalcError(f"unsupported literal {node.value!r}")
            return _check_size(node.value)
        if isinstance(node, ast.BinOp):
            function = _BINARY.get(type(node.op))
            if function is None:
                hint = _OPERATOR_HINTS.get(type(node.op), "allowed: + - * / // % **")
                raise CalcError(f"unsupported operator {type(node.op).__name__} ({hint})")
            left, right = self._eval(node.left), self._eval(node.right)
            try:
                return _check_size(function(left, right))
            except OverflowError:
                raise CalcError("the result is too large") from None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self._eval(node.operand)
            return operand if isinstance(node.op, ast.UAdd) else -operand
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise CalcError(f"unknown name {node.id!r}")
        if isinstance(node, ast.Call):
            return self._call(node)
        raise CalcError(f"unsupported syntax: {type(node).__name__}")

    def _call(self, node: ast.Call) -> Number:
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            valid = ", ".join(sorted(_FUNCTIONS))
            shown = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
            raise CalcError(f"unknown function {shown!r}; allowed: {valid}")
        if node.keywords:
            raise CalcError(f"{node.func.id}() takes no keyword arguments")
        function, lowest, highest = _FUNCTIONS[node.func.id]
        n_args = len(node.args)
        if n_args < lowest or (highest is not None and n_args > highest):
            wanted = (
                f"{lowest}"
                if lowest == highest
                else f"{lowest} or more"
                if highest is None
                else (f"{lowest} to {highest}")
            )
            raise CalcError(f"{node.func.id}() takes {wanted} argument(s), got {n_args}")
        args = [self._eval(arg) for arg in node.args]
        try:
            return _check_size(function(*args))
        except (OverflowError, ValueError) as exc:
            if isinstance(exc, CalcError):
                raise
            raise CalcError(f"{node.func.id}(): {exc}") from None

    def __call__(self, expression: str) -> str:
        """Tool entry point: the result as text, or "Error: <why>" for a bad expression."""
        try:
            return format_number(self.evaluate(expression))
        except CalcError as exc:
            return f"Error: {exc}"


register_tool(ToolSpec("calc", usage="to compute write <calc> expression </calc>", argument="expression",
                       description="Evaluate an arithmetic expression exactly, e.g. (17 + 5) * 3 / 2.",
                       build=lambda cfg, **_: Calculator()))
