"""Every name an innerloop package exports is named in the docs.

``tests/test_review_s41c.py`` holds ``innerloop``, ``innerloop.train``, ``innerloop.config`` and
``innerloop.models`` to their pages; innerloop.testing's ``make_problem``, ``naive_token_loop`` and
``twin_layers``, innerloop.registry's ``build_registry``, ``reset_registry`` and ``register_object``,
``innerloop.kernels.KernelUnavailableError`` and ``innerloop.core.StateSignature`` were exported and named
on no page. This test covers every package: a name in its ``__all__`` must appear in a code span or block
of README.md, CONTRIBUTING.md, docs/ or a README beside the code.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import innerloop

ROOT = Path(__file__).resolve().parents[1]


def _documented_code() -> str:
    pages = [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "innerloop").rglob("README.md")),
    ]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    return "\n".join(re.findall(r"```.*?```|`[^`\n]+`", text, re.S))  # code blocks and spans


def _packages() -> list[str]:
    """innerloop, its public module innerloop.ops and every subpackage but the built-in plugins'."""
    found = [
        info.name
        for info in pkgutil.walk_packages(innerloop.__path__, "innerloop.")
        if info.ispkg and not info.name.startswith("innerloop.plugins")  # the built-in plugins: no API
    ]
    return ["innerloop", "innerloop.ops", *sorted(found)]  # ops: the public op, a module


@pytest.mark.parametrize("package", _packages())
def test_every_exported_name_is_in_the_docs(package: str) -> None:
    names = getattr(importlib.import_module(package), "__all__", [])
    code = _documented_code()
    missing = [name for name in names if not re.search(rf"\b{re.escape(name)}\b", code)]
    if package == "innerloop":  # "one `innerloop.register_<kind>` per kind": test_review_s41c.py reads it
        missing = [name for name in missing if not name.startswith("register_")]
    assert not missing, f"exported by {package}, named in no doc: {missing}"


def test_contributing_states_make_problems_defaults() -> None:
    import inspect

    from innerloop.testing import make_problem

    page = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    sentence = re.search(r"the options and their defaults:(.*?)\.\n", page, re.S)
    assert sentence is not None
    stated = dict(re.findall(r"`(\w+)=([^`]+)`", sentence.group(1)))
    options = inspect.signature(make_problem).parameters.values()
    actual = {p.name: p.default for p in options if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(stated) == set(actual), (stated, actual)
    for name, text in stated.items():
        assert eval(text, {"torch": __import__("torch")}) == actual[name], (name, text, actual[name])  # noqa: S307
