"""``fsync_directory``: a rename made durable, for every layer that renames files into place (the atomic
writers of :mod:`innerloop.data.atomic`, the CPU kernel's build cache)."""

from __future__ import annotations

import contextlib
import os


def fsync_directory(folder: str | os.PathLike[str]) -> None:
    """Flush ``folder``'s entries to disk (a rename into it is durable only then). A file system or
    platform that cannot open or sync a directory is left as it is (the rename has happened either way)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
