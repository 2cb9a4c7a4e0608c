"""Atomic file writes: write to a temporary file in the target's directory, then ``os.replace``.

A reader (or a run resumed after a crash) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it onto ``path`` atomically.

    The temporary file sits in the same directory (``os.replace`` is atomic only within one file
    system) and is removed if ``write`` fails. Parent directories are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp (and some writers, e.g. safetensors) create 0600 files: give the usual permissions
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes the file visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def _temporary_name_pattern(names: Iterable[str]) -> re.Pattern[str]:
    """Names :func:`atomic_write` gives its temporary files for targets called ``names``:
    ``.<name>.<8 characters of mkstemp>.tmp``."""
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"\.(?:{alternatives})\.[a-z0-9_]{{8}}\.tmp")


def stale_temporaries(directory: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """The temporary files :func:`atomic_write` left in ``directory`` for targets called ``names``
    (a writer killed between creating and renaming them leaves one). Only plain files whose names
    match exactly; the caller must know no writer is still running there."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = _temporary_name_pattern(names)
    return sorted(
        p for p in directory.iterdir() if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink()
    )
