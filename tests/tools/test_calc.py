"""Calculator: exact values, formatting, refusals and limits; `aepo tools calc`."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from aepo.cli import app
from aepo.tools.calc import CalcError, Calculator, format_number

calc = Calculator()


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("6 / 3", "2"),  # exact division stays an integer
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("2 ** 10", "1024"),
        ("2 ** -2", "0.25"),
        ("-3 ** 2", "-9"),  # Python precedence: -(3**2)
        ("--3", "3"),
        ("+4", "4"),
        ("0.1 + 0.2", "0.3"),
        ("1 / 3", "0.333333333333"),
        ("12.0", "12"),
        ("1e20", "1e+20"),
        ("(10**20 + 1) / 1", "100000000000000000001"),  # beyond float precision, still exact
        ("10**30 // 7", str(10**30 // 7)),
        ("sqrt(16)", "4"),
        ("sqrt(2)", "1.41421356237"),
        ("abs(-5)", "5"),
        ("round(2.567, 2)", "2.57"),
        ("round(2.5)", "2"),
        ("min(3, 1, 2)", "1"),
        ("max(3, 1.5)", "3"),
        ("floor(-2.5)", "-3"),
        ("ceil(2.1)", "3"),
        ("log(100, 10)", "2"),
        ("log(e)", "1"),
        ("exp(0)", "1"),
        ("2 * pi", "6.28318530718"),
        ("  3 +   4  ", "7"),
    ],
)
def test_values(expression, expected):
    assert calc(expression) == expected


def test_evaluate_returns_numbers_of_the_right_type():
    assert calc.evaluate("6/3") == 2 and isinstance(calc.evaluate("6/3"), int)
    assert calc.evaluate("7/2") == 3.5
    assert calc.evaluate("sqrt(2)") == pytest.approx(math.sqrt(2))
    assert isinstance(calc.evaluate("floor(2.7)"), int)
    assert calc.name == "calc"


@pytest.mark.parametrize(
    "expression, message",
    [
        ("1 / 0", "division by zero"),
        ("5 // 0", "division by zero"),
        ("5 % 0", "modulo by zero"),
        ("0 ** -1", "division by zero"),
        ("2 ** 1001", "exponent 1001 is too large"),
        ("9 ** 1000 * 9 ** 1000", "more than 1000 digits"),
        ("10 ** 1000", "more than 1000 digits"),
        ("1e308 * 10", "not a finite number"),
        ("exp(1000)", "exp overflow"),
        ("sqrt(-1)", "sqrt of a negative number"),
        ("log(0)", "positive argument"),
        ("(-8) ** 0.5", "complex"),
        ("2 ^ 3", "use '**'"),
        ("x + 1", "unknown name 'x'"),
        ("__import__('os')", "unknown function '__import__'"),
        ("().__class__", "unsupported syntax: Attribute"),
        ("'a' * 3", "unsupported literal"),
        ("True + 1", "unsupported literal True"),
        ("1 < 2", "unsupported syntax: Compare"),
        ("[1, 2]", "unsupported syntax: List"),
        ("lambda: 1", "unsupported syntax: Lambda"),
        ("1 +", "invalid expression"),
        ("", "empty expression"),
        ("max()", "max() takes 1 or more argument(s), got 0"),
        ("round(1, 2, 3)", "round() takes 1 to 2 argument(s), got 3"),
        ("abs(x=1)", "no keyword arguments"),
        ("round(5, -5000)", "within"),
        ("1" * 5000, "longer than"),
        ("(" * 300 + "1" + ")" * 300, "nested"),
    ],
)
def test_errors_are_result_text(expression, message):
    text = calc(expression)
    assert text.startswith("Error: ")
    assert message in text
    with pytest.raises(CalcError):
        calc.evaluate(expression)


def test_non_string_input_is_refused():
    with pytest.raises(CalcError, match="must be a string"):
        calc.evaluate(3)  # type: ignore[arg-type]


def test_format_number():
    assert format_number(5) == "5"
    assert format_number(-2.0) == "-2"
    assert format_number(2.5) == "2.5"
    assert format_number(1e16) == "1e+16"
    assert format_number(1 / 7) == "0.142857142857"
    with pytest.raises(CalcError):
        format_number(True)


def test_cli_calc():
    runner = CliRunner()
    done = runner.invoke(app, ["tools", "calc", "2**10/4"])
    assert done.exit_code == 0 and done.output.strip() == "256"
    failed = runner.invoke(app, ["tools", "calc", "1/0"])
    assert failed.exit_code == 1 and "division by zero" in failed.output
    helped = runner.invoke(app, ["tools", "calc", "--help"])
    assert helped.exit_code == 0 and "arithmetic" in helped.output.lower()


def test_concurrent_calls_never_parse_at_the_same_time(monkeypatch):
    """The tool runner calls calc from several threads; CPython 3.11's ast.parse is not safe to
    run in two threads at once (a valid call got "SystemError: AST constructor recursion depth
    mismatch" on the demo), so calc serialises it. A parse that lingers shows any overlap."""
    import ast
    import threading
    import time

    real_parse, inside, overlaps = ast.parse, [0], []
    lock = threading.Lock()

    def slow_parse(*args, **kwargs):
        with lock:
            inside[0] += 1
            overlaps.append(inside[0])
        time.sleep(0.002)
        try:
            return real_parse(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(ast, "parse", slow_parse)
    calc = Calculator()
    results: list = []
    threads = [threading.Thread(target=lambda k=k: results.append(calc.evaluate(f"{k} * 2 + 1")))
               for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [k * 2 + 1 for k in range(8)]
    assert max(overlaps) == 1
