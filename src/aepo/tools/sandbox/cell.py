"""The program runner inside the sandbox: one REPL-style cell (see `aepo.tools.sandbox`).

Run as `python -I -X utf8 -c <this file's source> TAG` with the program's source on standard
input. Standard library only (aepo itself is not visible inside the sandbox). The source is
read to the end before the program starts, and standard input is then /dev/null. When the
last statement is an expression whose value is not None, its repr is printed
(`sys.displayhook`), like a notebook cell. Tracebacks show only the program's own frames.
"""

import ast
import builtins
import linecache
import os
import sys
import traceback


def read_source() -> str:
    source = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    return source


def compile_cell(source: str):
    tree = ast.parse(source, "<python>", "exec")
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        hook = ast.Attribute(ast.Name("__aepo_sys__", ast.Load()), "displayhook", ast.Load())
        tree.body[-1] = ast.copy_location(ast.Expr(ast.Call(hook, [last.value], [])), last)
        ast.fix_missing_locations(tree)
    return compile(tree, "<python>", "exec")


def main() -> None:
    source = read_source()
    sys.argv = ["<python>"]
    linecache.cache["<python>"] = (len(source), None, source.splitlines(True), "<python>")
    try:
        code = compile_cell(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        sys.exit(1)
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__aepo_sys__": sys}
    try:
        exec(code, namespace)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the program's own error, shown as its traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.stderr.flush()
        sys.exit(1)


main()
