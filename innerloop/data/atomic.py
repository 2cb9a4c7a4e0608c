"""Atomic file writes: write to a temporary file in the target's directory, then ``os.replace``.

A reader (or a run resumed after a crash) sees either the old file or the new one, never half of one.
And :func:`file_sha256`, the checksum the exports record of each file they write, and
:func:`file_stamp`, which tells whether a file was written again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from innerloop.core.durable import fsync_directory

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # not POSIX: a temporary file is not marked in use while it is written
    fcntl = None


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of the file ``path`` (hex), read in chunks of ``chunk_bytes`` (``hashlib.file_digest``
    would do it from Python 3.11 on; innerloop supports 3.10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class FolderInTheWayError(IsADirectoryError):
    """A folder stands where :func:`atomic_write` would put a file (nothing was written). Its message
    names the file and what to do, without the ``[Errno 21]`` prefix of an ``OSError``."""

    def __str__(self) -> str:
        return str(self.strerror)


def file_stamp(path: str | os.PathLike[str], device: bool = False) -> tuple[int, ...] | None:
    """What changes when ``path`` is written again: its inode (an atomic write makes a new one), its
    modification time, its size (a rewrite in place within the file system's time resolution) and its
    change time (a rewrite in place of the same size whose modification time was set back, as ``cp -p``
    or ``touch -r`` do: no program can set ``st_ctime``); None when there is no such file.

    ``device=True`` puts the file system's device number first (a file replaced by one on another file
    system can share the inode number): for stamps compared within one process only. A stamp kept on disk
    leaves it out: a file system's device number can change when it is mounted again (NFS, device mapper),
    which would read every kept stamp as a changed file."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size, stat.st_ctime_ns)
    return (stat.st_dev, *stamp) if device else stamp


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it onto ``path`` atomically.

    The temporary file sits in the same directory (``os.replace`` is atomic only within one file
    system) and is removed if ``write`` fails. Parent directories are created. Returns ``path``.

    A ``path`` that is a symbolic link is written through, as ``open(path, "w")`` would: the file it
    points to is replaced (beside it), and the link stays.

    While it is written, the temporary file is ``flock``-ed (released by the operating system when the
    process ends, even when it is killed): :func:`stale_temporaries` leaves alone a temporary file whose
    writer is alive, and finds those of a killed writer, which nothing else removes.
    """
    if not os.fspath(path).strip():  # Path('') is the current folder: "it is a folder", a path never given
        raise FileNotFoundError(
            errno.ENOENT, f"cannot write {os.fspath(path)!r}: the path is empty; give a file name"
        )
    given = path = Path(path)
    if path.is_symlink():  # replace what it points to, not the link (os.replace would put a file there)
        path = Path(os.path.realpath(path))
    make_parent_folder(path)
    if path.is_dir():  # os.replace would fail after the write, naming the temporary file
        raise FolderInTheWayError(
            errno.EISDIR,
            f"cannot write {str(path)!r}: it is a folder, not a file; move it, or write elsewhere",
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    mode = permissions_to_give(path)
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks: the file is not marked in use
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        write(tmp)
        # mkstemp (and some writers, e.g. safetensors) create 0600 files: give the file's permissions
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes the file visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)  # the rename itself on disk: a power cut after it keeps the new file
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        wrapped = os_errno(err)
        if wrapped is not None and str(path) not in str(err):
            # the same errno (and OSError subclass), with the file that was being written named, and the
            # file the error was about where that was another one (a source the writer read)
            other = err.filename if isinstance(err, OSError) and err.filename not in (None, tmp) else None
            raise OSError(wrapped, f"writing {str(path)!r} failed: {_strerror(err)}", other) from err
        raise
    finally:
        os.close(fd)  # releases the lock
    return given


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)\s*$")
"""How a library written in Rust (safetensors, tokenizers) ends the text of an operating system's error:
safetensors raises a ``SafetensorError``, not an ``OSError``, for a full disk while it writes."""


def os_errno(err: BaseException) -> int | None:
    """The operating system's errno behind ``err``: an ``OSError``'s, or one a library's error carries in its text
    (:data:`_RUST_OS_ERROR`); None for any other error."""
    if isinstance(err, OSError):
        return err.errno
    found = _RUST_OS_ERROR.search(str(err)) if isinstance(err, Exception) else None
    return int(found.group(1)) if found else None


def _strerror(err: BaseException) -> str:
    return str((err.strerror if isinstance(err, OSError) else None) or err)


def permissions_to_give(path: str | os.PathLike[str]) -> int:
    """The mode a rewrite of ``path`` gets: the file's own where it exists (a ``config.yaml`` made
    private with ``chmod 600`` stays private, a read-only one read-only), else the usual new file's
    (``0o666`` less the umask)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def flush_files_in(folder: str | os.PathLike[str], mode: int | None = None) -> list[Path]:
    """Flush every plain file of ``folder`` to disk (``os.fsync``), first giving it ``mode`` where one is
    given: for a writer that fills a staging folder (a library's ``save_pretrained``) and then renames it,
    or its files, into place: a rename that reaches the disk before the bytes it names leaves, after a
    power cut, a file of zero bytes in place of the one it replaced. Returns the files flushed."""
    flushed = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.is_symlink():
            if mode is not None:
                os.chmod(path, mode)
            with open(path, "rb") as file:  # read-only: a mode (or umask) without the owner's write bit
                os.fsync(file.fileno())
            flushed.append(path)
    return flushed


def make_parent_folder(path: Path) -> None:
    """Create ``path``'s folder and those above it; a file standing where one of them goes is a
    :class:`NotADirectoryError` naming the file to be written and that file (mkdir's own error named
    a folder that does not exist, or only the file, as 'File exists')."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"cannot write {str(path)!r}: {str(blocker)!r} is a file, not a folder; move it, or write elsewhere",
        ) from err


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
    match exactly, and not one a live writer holds (its ``flock``); on a file system without locks
    that cannot be told, and the caller must know no writer is still running there."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = _temporary_name_pattern(names)
    return sorted(
        p
        for p in directory.iterdir()
        if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink() and not _being_written(p)
    )


def _being_written(path: Path) -> bool:
    """Whether a live :func:`atomic_write` holds the lock on the temporary file ``path``."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # gone meanwhile, or unreadable: not a file this process can judge or remove
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # a file system without locks
    finally:
        os.close(fd)
    return False


def remove_stale_temporaries_of(targets: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Remove the :func:`stale_temporaries` of each file in ``targets`` (beside it, named after it): what
    a killed earlier write of the same file left. A command calls it before it writes ``targets``;
    says in one line what it removed, and returns their paths."""
    removed = []
    for target in map(Path, targets):
        for path in stale_temporaries(target.parent, [target.name]):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    if removed:
        log.warning(
            "removed %d temporary file(s) an interrupted earlier write left: %s",
            len(removed),
            ", ".join(map(str, removed)),
        )
    return removed
