"""Python source parsed once per test process: the layering and function-length tests each read
every module of the package (about 0.7 s of parsing), so they share the trees."""

from __future__ import annotations

import ast
import functools
from pathlib import Path


def parse_file(path: Path) -> ast.Module:
    """``path``'s syntax tree, parsed once for each distinct text (a rewritten file is parsed again)."""
    return _parse(path.read_text(encoding="utf-8"), str(path))


@functools.cache
def _parse(text: str, filename: str) -> ast.Module:
    return ast.parse(text, filename=filename)
