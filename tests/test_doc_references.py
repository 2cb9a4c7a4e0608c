"""What the documentation names exists: repository paths and ``innerloop.`` names in code spans.

A README that points at a test file, a module or a function that was renamed or never written sends a
reader nowhere; these checks read every Markdown page of the repository (README, CONTRIBUTING, docs/,
the kernel READMEs, benchmarks/ and examples/) and resolve what its code spans name. Fast: no code
block is run (tests/test_docs.py does that).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    {
        *REPO.glob("*.md"),
        *REPO.glob("docs/*.md"),
        *REPO.glob("innerloop/**/*.md"),
        *REPO.glob("benchmarks/*.md"),
        *REPO.glob("examples/**/*.md"),
        *REPO.glob("tests/**/README.md"),
    }
)

CODE_SPAN = re.compile(r"`([^`\n]+)`")
# A repository path: folders and a file name with one of the repository's extensions, e.g.
# tests/kernels/test_triton_kernels.py or innerloop/kernels/cpu/README.md.
REPO_PATH = re.compile(r"(?<![\w./<-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|cpp|h|yaml|toml|cfg|txt|json))\b")
# ``innerloop.models.MIXER_TABLE``; not a file name (``.innerloop.lock``) nor a pattern (``register_<kind>``).
DOTTED_NAME = re.compile(r"(?<![\w./])innerloop(?:\.[A-Za-z_]\w*)+(?![\w<])")
# Paths that name something outside the repository or made by a run, not a file of the checkout.
NOT_IN_REPOSITORY = ("../", "runs/", "my_package/", "site-packages/")


def _spans(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in CODE_SPAN.finditer(text)]


def _exists(page: Path, path: str) -> bool:
    """A path is relative to the repository, to the page's folder, or (in kernel READMEs) to innerloop/."""
    return any((base / path).exists() for base in (REPO, page.parent, REPO / "innerloop"))


def _resolves(name: str) -> bool:
    """``innerloop.a.b.c``: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_pages_are_found():
    names = {page.relative_to(REPO).as_posix() for page in PAGES}
    assert {"README.md", "CONTRIBUTING.md", "docs/architecture.md", "innerloop/kernels/README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_repository_path_a_page_names_exists(page: Path):
    missing = [
        f"line {line}: {path}"
        for line, span in _spans(page)
        for path in REPO_PATH.findall(span)
        if not path.startswith(NOT_IN_REPOSITORY)
        and not any(c in path for c in "*<>{}")
        and not _exists(page, path)
    ]
    assert not missing, f"{page.relative_to(REPO)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_innerloop_name_a_page_names_resolves(page: Path):
    unresolved = [
        f"line {line}: {name}"
        for line, span in _spans(page)
        for name in DOTTED_NAME.findall(span)
        if not _resolves(name)
    ]
    assert not unresolved, f"{page.relative_to(REPO)} names what innerloop does not have: {unresolved}"


def test_the_checks_catch_a_missing_file_and_a_missing_name(tmp_path):
    """The patterns find what the pages' mistakes looked like (the test itself can fail)."""
    page = tmp_path / "README.md"
    page.write_text(
        "`tests/kernels/test_triton_ttt_linear.py` and `innerloop.models.no_such_thing`, "
        "not `<out_dir>/.innerloop.lock` nor `innerloop.register_<kind>`\n"
    )
    paths = [p for _, span in _spans(page) for p in REPO_PATH.findall(span)]
    names = [n for _, span in _spans(page) for n in DOTTED_NAME.findall(span)]
    assert paths == ["tests/kernels/test_triton_ttt_linear.py"] and not _exists(page, paths[0])
    assert names == ["innerloop.models.no_such_thing"] and not _resolves(names[0])
    assert _resolves("innerloop.models.MIXER_TABLE") and _exists(page, "tests/kernels/test_triton_kernels.py")
