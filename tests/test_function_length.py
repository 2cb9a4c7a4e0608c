"""No function in the package is over ``MAX_LINES`` lines unless it is listed below with the reason.

A long function is split into named helpers where that reads better; where it does not (a Triton
kernel whose body is one fused computation), the reason is written in ``ALLOWED``. An entry that is no
longer needed (the function was shortened or removed) fails too, so the list stays true.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from source_testing import collector_paused, parse_file

PACKAGE = Path(__file__).resolve().parents[1] / "innerloop"
MAX_LINES = 60

_JIT_KERNEL = (
    "a @triton.jit kernel is one fused program (the whole loop over mini-batches runs on chip); splitting "
    "it into @triton.jit helpers is possible but out of scope for now"
)

#: ``path relative to innerloop/ : qualified name`` -> why it may be longer than MAX_LINES.
ALLOWED: dict[str, str] = {
    "kernels/triton/ttt_linear/_kernels.py:linear_backward_kernel": _JIT_KERNEL,
    "kernels/triton/ttt_mlp/_kernels.py:mlp_backward_kernel": _JIT_KERNEL,
    "kernels/triton/ttt_mlp/_kernels.py:mlp_decode_kernel": _JIT_KERNEL,
    "core/ops.py:scan": (
        "the public op: its 16 keyword arguments and their reference in the docstring are 55 lines; "
        "the body is 17 lines of calls to named helpers"
    ),
}


# The nodes a ``def`` can be in or be: statements, ``except`` handlers and ``case`` blocks. The walk skips
# everything else (expressions are most of a tree's nodes: the package's walk took 1.4 s, now 0.2 s).
_HOLDS_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)


def _function_lengths(source: str | ast.Module) -> dict[str, int]:
    """``qualified name -> lines`` (``def`` line to last line) of every function in ``source`` (text,
    or its syntax tree)."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _HOLDS_STATEMENTS):
                continue  # an expression, argument list, ...: no def can be inside (a lambda is not one)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lengths[name] = (child.end_lineno or child.lineno) - child.lineno + 1
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source) if isinstance(source, str) else source, "")
    return lengths


@functools.cache  # both tests below read the same trees
def _all_lengths() -> dict[str, int]:
    lengths = {}
    with collector_paused():
        for path in sorted(PACKAGE.rglob("*.py")):
            where = path.relative_to(PACKAGE).as_posix()
            lengths.update({f"{where}:{name}": n for name, n in _function_lengths(parse_file(path)).items()})
    return lengths


def test_no_function_is_over_the_limit_without_a_reason() -> None:
    too_long = {name: n for name, n in _all_lengths().items() if n > MAX_LINES and name not in ALLOWED}
    assert not too_long, (
        f"functions over {MAX_LINES} lines: {too_long}; split them into named helpers, or add them to "
        "ALLOWED in tests/test_function_length.py with the reason"
    )


def test_every_allowed_entry_is_still_needed_and_has_a_reason() -> None:
    lengths = _all_lengths()
    stale = [name for name in ALLOWED if lengths.get(name, 0) <= MAX_LINES]
    assert not stale, f"ALLOWED lists functions that no longer exist or are now short enough: {stale}"
    assert all(reason.strip() for reason in ALLOWED.values())


def test_the_scan_sees_nested_functions_and_methods() -> None:
    source = (
        "class A:\n    def m(self):\n        def inner():\n"
        + "            x = 1\n" * 61
        + "        return inner\n"
    )
    lengths = _function_lengths(source)
    assert lengths["A.m.inner"] == 62 and lengths["A.m"] == 64


def test_the_scan_sees_functions_inside_every_kind_of_block() -> None:
    """A ``def`` under ``if``/``else``, ``try``/``except``/``finally``, ``with``, ``for``, ``while`` and
    ``match``/``case``, as the walk that skips expressions must still find."""
    blocks = {
        "if x:\n": "",
        "if x:\n    pass\nelse:\n": "",
        "try:\n    pass\nexcept E:\n": "",
        "try:\n    pass\nfinally:\n": "",
        "with x:\n": "",
        "for i in x:\n": "",
        "while x:\n": "",
        "match x:\n    case 1:\n": "    ",
    }
    for n, (block, indent) in enumerate(blocks.items()):
        source = f"{block}{indent}    def f{n}():\n{indent}        return 1\n"
        assert _function_lengths(source) == {f"f{n}": 2}, block
