"""`aepo tools search | python | calc`: run one tool call by hand and print its result text.

A bad option or a tool that cannot be set up is a usage error (`error: ...`, exit status 2); a
call the tool ran and answered with an error (a failing program, a bad expression, a retriever
that is down) prints that answer, the text the model would see, with exit status 1."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from aepo.cli.common import fail
from aepo.console import printable

app = typer.Typer(no_args_is_help=True, add_completion=False)


def _tool_error(message: str) -> None:
    """The tool answered with an error: print it as the tool's result, exit status 1."""
    typer.echo(printable(f"Error: {message}"))
    raise typer.Exit(code=1)


@app.command("search")
def search_command(
    query: str = typer.Argument(..., help="The search query."),
    cache: Path | None = typer.Option(None, "--cache", help="JSON cache: query -> rendered results."),
    corpus: Path | None = typer.Option(
        None, "--corpus", help="JSON-lines corpus of {id,title,text} for BM25."
    ),
    url: str | None = typer.Option(
        None, "--url", help="Search-R1 retriever endpoint, e.g. http://127.0.0.1:8000/retrieve"
    ),
    topk: int = typer.Option(3, "--topk", min=1, help="Number of pages to return."),
    max_chars: int = typer.Option(600, "--max-chars", min=1, help="Length limit of the result text."),
) -> None:
    """Search (cache, then corpus, then retriever) and print "Page 1: ..." text."""
    from aepo.tools.search import SearchBackendError, build_search_tool

    if cache is None and corpus is None and url is None:
        fail("no search source: give at least one of --cache, --corpus or --url")
    try:
        tool = build_search_tool(cache=cache, corpus=corpus, url=url, topk=topk, max_chars=max_chars)
    except (ValueError, OSError) as exc:
        fail(f"{exc}; check the --cache / --corpus file")
        return
    try:
        typer.echo(printable(tool(query)))
    except SearchBackendError as exc:
        _tool_error(str(exc))


@app.command("python")
def python_command(
    code: str = typer.Argument(..., help='Python code to run, or "-" to read it from standard input.'),
    timeout: float = typer.Option(5.0, "--timeout", min=0.01, help="Wall-clock limit in seconds."),
    memory_mb: int = typer.Option(512, "--memory-mb", min=32, help="Address-space limit in MiB."),
    verbose: bool = typer.Option(False, "--verbose", help="Also print the isolation in force to stderr."),
    isolation: str = typer.Option(
        "strict", "--isolation",
        help="strict (namespaces, minimal root, system-call filter; refuses to run where the kernel "
        "cannot) or limits-only (resource limits only: the program can read host files).",
    ),
) -> None:
    """Run code in the isolated Python sandbox and print its output (exit status 1 on error)."""
    from aepo.tools.sandbox import PythonSandbox, SandboxError

    source = sys.stdin.read() if code == "-" else code
    try:
        sandbox = PythonSandbox(timeout=timeout, cpu_seconds=max(1, int(timeout + 0.999)), memory_mb=memory_mb,
                                mode=isolation)
    except ValueError as exc:
        fail(f"--isolation: {exc}")
        return
    try:
        if verbose:
            typer.echo(sandbox.isolation.describe(), err=True)
        result = sandbox.run(source)
    except SandboxError as exc:
        fail(str(exc))
        return
    typer.echo(printable(sandbox.format(result).rstrip("\n")))
    if not result.ok:
        raise typer.Exit(code=1)


@app.command("calc")
def calc_command(
    expression: str = typer.Argument(..., help='Arithmetic expression, e.g. "sqrt(2) * 3".'),
) -> None:
    """Evaluate an arithmetic expression and print the result (exit status 1 on error)."""
    from aepo.tools.calc import CalcError, Calculator, format_number

    try:
        typer.echo(printable(format_number(Calculator().evaluate(expression))))
    except CalcError as exc:
        _tool_error(str(exc))
