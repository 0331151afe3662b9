"""What every `aepo` command shares: one way to fail, warn and check a number."""
from __future__ import annotations

import typer

from aepo.console import printable

BAD_INPUT = (ValueError, FileNotFoundError)
"""What the library raises for bad input: ConfigError, ModelDirError, OutputPathError,
RunDirError and StaleOutputError are ValueErrors; a missing input file is a
FileNotFoundError. At the command line each becomes one `error: ...` line and exit status 2,
never a traceback."""


def fail(message: str) -> None:
    """One line on stderr, `error: <what is wrong>; <what to do>`, and exit status 2."""
    typer.secho(printable(f"error: {message}"), fg="red", err=True)
    raise typer.Exit(2)


def warn(message: str) -> None:
    typer.secho(printable(f"warning: {message}"), fg="yellow", err=True)


def check_min(option: str, value: float | None, low: float, what: str, hint: str = "") -> None:
    """ValueError when an option is below its minimum, naming the option, the value and the range."""
    if value is not None and value < low:
        raise ValueError(f"{option} must be >= {low:g} ({what}), got {value:g}"
                         f"; {hint or f'pass {option} {low:g} or more'}")
