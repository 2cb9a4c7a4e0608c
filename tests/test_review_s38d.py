"""Review s38d: hostile but realistic environments and files (the CPU kernels' build cache)."""

from __future__ import annotations

import _ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from innerloop.kernels.cpu import build

SOME_LIBRARY = Path(_ctypes.__file__)  # a shared library every Python has (ELF on Linux)
ELF = SOME_LIBRARY.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.skipif(not ELF, reason="the truncation check reads ELF headers (Linux)")
def test_a_truncated_library_is_not_intact(tmp_path: Path) -> None:
    data = SOME_LIBRARY.read_bytes()
    assert build._intact(SOME_LIBRARY)
    for size in (0, 3, 40, 1000, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{size}.so"
        cut.write_bytes(data[:size])
        assert not build._intact(cut), size


@pytest.mark.skipif(not ELF, reason="the truncation check reads ELF headers (Linux)")
def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch) -> None:
    """A cut-short library under the cache's name crashed the process in dlopen (SIGBUS, no Python
    error): _build returned it because it existed. It is now removed and built again."""
    compiles = []

    def fake_compile(compiler, flags, target):
        compiles.append(target)
        shutil.copyfile(SOME_LIBRARY, target)
        return subprocess.CompletedProcess([compiler], 0, "", "")

    monkeypatch.setenv("INNERLOOP_CACHE_DIR", str(tmp_path / "cache dir ü"))
    monkeypatch.setattr(build, "find_compiler", lambda: shutil.which("true"))
    monkeypatch.setattr(build, "_compile", fake_compile)
    target = build._build()
    assert len(compiles) == 1
    # a truncated file with the right name, as a new file: the build loaded the library at `target` as a trial,
    # and cutting that file in place made its mapped pages fault (SIGBUS) when the process ended
    cut = target.with_name("cut.so")
    cut.write_bytes(SOME_LIBRARY.read_bytes()[:1000])
    os.replace(cut, target)
    assert build._build() == target
    assert len(compiles) == 2 and target.read_bytes() == SOME_LIBRARY.read_bytes()
    assert not list(target.parent.glob(".build-*"))


def test_a_cached_library_that_is_not_innerloops_is_a_reason(tmp_path, monkeypatch) -> None:
    """A library under the cache's name that loads but lacks the kernels' symbols was a bare
    AttributeError from ctypes on the first layer call; it is the dispatch reason instead."""
    other = tmp_path / "ttt_stack-x.so"
    shutil.copyfile(SOME_LIBRARY, other)
    monkeypatch.setattr(build, "_build", lambda: other)
    with pytest.warns(RuntimeWarning, match="CPU kernels are unavailable in this process"):
        library, path, reason = build._outcome.__wrapped__()
    assert library is None and path is None
    assert str(other) in reason and "innerloop_uses_openmp" in reason and "delete it" in reason


@pytest.mark.parametrize("variable", ["INNERLOOP_CACHE_DIR", "XDG_CACHE_HOME"])
def test_a_cache_variable_of_spaces_is_unset_not_a_folder_named_spaces(
    variable, tmp_path, monkeypatch
) -> None:
    """INNERLOOP_CACHE_DIR=' ' (or XDG_CACHE_HOME=' ') put the kernels in a folder named ' ' under
    whatever the current folder was; it reads as unset, as the library's yes/no switches do."""
    monkeypatch.delenv("INNERLOOP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    default = build.cache_dir()
    assert default == tmp_path / ".cache" / "innerloop"
    monkeypatch.setenv(variable, "  ")
    assert build.cache_dir() == default
