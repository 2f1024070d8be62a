"""The built-in `python` tool: run code in the code reward's sandbox and return what it prints.

Same isolation as the code reward (`fastdash.rewards.code.run_sandboxed`: no network, a minimal
root without the user's files, so no dataset answers; an unprivileged uid, rlimits, a wall-clock
kill). The value of a last bare expression is printed, as in a notebook cell, so `123*456` answers
`56088` without a print.
"""
from __future__ import annotations

import ast

from fastdash.rewards.code import run_sandboxed


class ToolTimeout(Exception):
    """A tool call ran past `tool_timeout_s` (counted in tools/timeouts)."""


class ToolFailed(Exception):
    """A tool call failed; its message is what the model sees (counted in tools/errors)."""


def notebook_program(code: str) -> str:
    """`code` with a last bare expression printed (a syntax error is left for the sandbox to report)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    last = tree.body[-1].value if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    printed = isinstance(last, ast.Call) and isinstance(last.func, ast.Name) and last.func.id == "print"
    if last is not None and not printed:
        tree.body[-1] = ast.Expr(ast.Call(ast.Name("print", ast.Load()), [last], []))
        return ast.unparse(ast.fix_missing_locations(tree))
    return code


def make_python_tool(timeout_s: float, max_output_chars: int):
    """The `python` tool with the run's limits bound in (its schema comes from the docstring)."""

    def python(code: str) -> str:
        """Run Python code in a sandbox and return its output (the value of a last expression is printed).

        Args:
            code: Python source to run.
        """
        res = run_sandboxed(notebook_program(code), timeout_s=timeout_s, memory_mb=256,
                            max_output_bytes=4 * max_output_chars + 64)
        if res.reason == "timeout":
            raise ToolTimeout(f"python: no result within {timeout_s:g} s")
        if res.reason not in ("ok", "output_limit"):
            raise ToolFailed(res.output.strip() or f"python: exited with status {res.returncode}")
        return res.output

    return python
