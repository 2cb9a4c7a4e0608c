"""Text corpora: which files, how they split into training and validation, and whether each side
holds a window of ``seq_len + 1`` bytes (from the files' sizes, before anything is read); the files as
bytes, or as the token ids of a tokenizer (:func:`read_tokens`).

Used by the run config's checks (:mod:`innerloop.config`) and by the text DataModule
(:mod:`innerloop.train.data`).
"""

from __future__ import annotations

import copy
import errno
import fnmatch
import glob
import hashlib
import heapq
import logging
import os
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from innerloop.core.callers import warning_stacklevel
from innerloop.core.layer import machine_memory_bytes, memory_size
from innerloop.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, utf8_file_text

log = logging.getLogger(__name__)

# Parts of the standard library's tree that are not the standard library's own source: installed
# packages (which differ between machines) and the test suites (large and repetitive).
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def byte_order_mark(data: bytes) -> str | None:
    """The encoding whose byte-order mark ``data`` starts with, ``"UTF-16"`` or ``"UTF-32"``; else None."""
    return next((name for mark, name in _BOMS if data.startswith(mark)), None)


DOCUMENT_SEPARATOR = 0
"""Byte placed between files (text never contains a NUL byte)."""


class DataError(ValueError):
    """Data that cannot be used as configured (no such file, too little text for ``seq_len``, nothing
    held out for validation); the message names the setting and what to change."""

    def with_message(self, message: str) -> DataError:
        """This error as another ``message`` says it (a caller naming a setting its own way), of the same
        type and with the same attributes (:class:`TextTooShortError`'s lengths)."""
        reworded = copy.copy(self)
        reworded.args = (message,)
        return reworded


class TextTooShortError(DataError):
    """A text that holds no window: ``length`` tokens (``unit``: ``"bytes"`` or ``"tokens"``, end-of-text
    separators included) where a window needs ``needed`` (``seq_len + 1``). It was read: a caller that
    words a failed read ("cannot be read") words this one otherwise (the lengths, and what to change)."""

    def __init__(self, message: str, length: int = 0, needed: int = 0, unit: str = "bytes") -> None:
        super().__init__(message)
        self.length, self.needed, self.unit = length, needed, unit


def stdlib_files() -> list[Path]:
    """The ``.py`` files of this Python's standard library, sorted (the default text corpus)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):  # symlinked folders are not followed, as rglob
        subfolders[:] = [name for name in subfolders if name not in _STDLIB_SKIP]  # never entered: fast
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(files)


#: How the errors and warnings of finding an entry's files name the entry and the entries (``%s`` below):
#: ``data.paths``' by default; :func:`resolve_files`'s ``option`` names others (the CLI's PATH arguments).
_ENTRY_NAMES: ContextVar[tuple[str, str]] = ContextVar(
    "innerloop_data_entry_names", default=("data.paths entry", "data.paths")
)


@contextmanager
def _entries_named(option: str) -> Iterator[None]:
    """Within it, an entry's errors and warnings name it as one of ``option`` (``data.paths``: "data.paths
    entry 'x'"; another, as the CLI's ``PATH``: "PATH 'x'")."""
    names = ("data.paths entry", "data.paths") if option == "data.paths" else (option, f"{option} arguments")
    token = _ENTRY_NAMES.set(names)
    try:
        yield
    finally:
        _ENTRY_NAMES.reset(token)


def expanded_entry(pattern: str) -> str:
    """The ``data.paths`` entry ``pattern`` with a leading ``~`` read as the home folder (as
    :func:`~innerloop.core.functional.user_path` reads it), the home folder's path escaped
    (:func:`glob.escape`) where the rest is a glob: below a home folder ``/home/a[1]``, ``~/data/*.txt`` is
    that folder's files, never those of ``/home/a1`` that ``[1]`` matches. A path that exists is as named."""
    expanded = os.path.expanduser(pattern)
    if expanded == pattern or not glob.has_magic(pattern) or os.path.lexists(expanded):
        return expanded
    home, separator, rest = pattern.partition(os.sep)
    return glob.escape(os.path.expanduser(home)) + separator + rest


def _entry_path(pattern: str) -> Path:
    """:func:`expanded_entry` as a path."""
    return Path(expanded_entry(pattern))


def resolve_files(patterns: Sequence[str], option: str = "data.paths") -> list[Path]:
    """Expand files, directories (all files below) and globs (``**`` allowed) into a sorted file list.

    Below a directory, hidden files and folders (``.git/``, ``.venv/``: a name starting with ``.``) and
    ``__pycache__`` are skipped, as a glob skips hidden names, and links to folders are followed, as a
    glob's ``**`` follows them; a file named directly is always read.
    An entry that matches no file raises :class:`DataError` naming it; its errors and its warnings
    (folders that cannot be read, broken links) name it as one of ``option`` (``innerloop tokenizer
    train``: ``PATH``, its argument).
    """
    with _entries_named(option):
        return sorted(split_keys(patterns))


def _found_files(pattern: str) -> list[tuple[Path, str]]:
    """The files the ``data.paths`` entry ``pattern`` names, as found (links not resolved) and resolved
    (the walk knows each folder's resolved path: one ``realpath`` a file took most of the time), in the order
    of the links each path goes through (fewest first: :class:`_Walk`), then sorted, so that of two paths
    of one file the first is its own (:func:`split_keys` keys the file by it). A FIFO, socket or device
    named as the entry, a link to nothing, and a glob :func:`_entry_walk` cannot answer, raise
    :class:`DataError`."""
    path = _entry_path(pattern)
    if path.is_file():
        return _refuse_checkpoints(pattern, path, [(path, os.path.realpath(path))])
    if path.is_symlink() and not path.exists():
        if _is_link_loop(path):
            raise DataError(
                f"{_ENTRY_NAMES.get()[0]} {pattern!r} is a link to {_link_target(path)} in a loop of links (each "
                "leads to the next, never to a file); give the file itself"
            )
        raise DataError(
            f"{_ENTRY_NAMES.get()[0]} {pattern!r} is a link to {_link_target(path)}, which does not exist (moved or "
            "deleted, or on a disk not mounted); restore its target, or give the file itself"
        )
    if path.exists() and not path.is_dir():
        raise DataError(
            f"{_ENTRY_NAMES.get()[0]} {pattern!r} is not a regular file (a FIFO, socket or device: reading it would "
            "wait for a writer or never end); give a file of text, a folder or a glob"
        )
    _refuse_unanswered_glob(pattern)
    walk = _entry_walk(pattern)
    matched = [(found, real) for _, found, real in sorted(walk.files)] if walk is not None else []
    if walk is not None:
        _warn_unreadable(walk, pattern)
    if not matched:
        raise DataError(
            f"{_ENTRY_NAMES.get()[0]} {pattern!r} matches no file (give files, directories or globs)"
            + (_only_skipped_files(path) if path.is_dir() else bracket_hint(pattern))
        )
    return _refuse_checkpoints(pattern, path, matched)


CHECKPOINT_FILE = "last.safetensors"
"""The checkpoint a training run keeps in its out_dir (``innerloop.train.run_dir`` re-exports it)."""
PENDING_CHECKPOINT = f".{CHECKPOINT_FILE}.pending"
"""The one definition of the name of a checkpoint a run wrote but has not confirmed yet (it replaces
:data:`CHECKPOINT_FILE` once the next step's loss on its weights is finite; a killed run can leave one:
``innerloop.train.run_dir.settle_pending_checkpoint``)."""

_CHECKPOINT_NAMES = (".safetensors", ".safetensors.pending")
"""How a file of weights ends (a run's ``last.safetensors``, its pending ``.last.safetensors.pending``, an
HF folder's ``model.safetensors``): never text."""


def _refuse_checkpoints(pattern: str, path: Path, matched: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """``matched`` (the files the entry ``pattern`` found), or a :class:`DataError` when the entry reads a
    checkpoint (a file of weights) or is a run folder (its pending checkpoint, hidden, would be skipped and
    its config.yaml read): the weights would be trained on or scored as text (``data.paths=[runs/a]``, or
    ``compare A --data code.py B`` with B meant as a model)."""
    pending = path / PENDING_CHECKPOINT
    weights = [found for found, _ in matched if found.name.endswith(_CHECKPOINT_NAMES)]
    if not weights and not (path.is_dir() and pending.is_file()):
        return matched
    what = (
        f"reads the checkpoint {str(weights[0])!r}"
        if weights
        else f"is a run folder (it holds the pending checkpoint {str(pending)!r})"
    )
    raise DataError(
        f"{_ENTRY_NAMES.get()[0]} {pattern!r} {what}: a model's weights would be read as text; give text "
        "files, folders of text or globs that match text only (e.g. 'corpus/*.txt'); a model is not data"
    )


def entry_finds_files(pattern: str) -> bool:
    """Whether the ``data.paths`` entry ``pattern`` finds a file now, by the walk that reads the data
    (:func:`_found_files`): a folder holding no file (or only hidden ones), a glob matching only folders,
    and an entry refused, find none (``glob.glob`` finds the folders themselves)."""
    try:
        return bool(_found_files(pattern))
    except DataError:
        return False


def _refuse_unanswered_glob(pattern: str) -> None:
    """:class:`DataError` naming the ``data.paths`` glob ``pattern`` when the walk's matcher cannot answer
    it (:func:`_entry_walk` gives None): one ending in '/' (``glob.glob`` matches folders only there, so
    it never found a file) or with a '..' after a wildcard."""
    path = _entry_path(pattern)
    _, rest = _glob_rest(path)
    if path.is_dir() or not rest:
        return
    if pattern.rstrip().endswith(("/", os.sep)):
        why = "ends in '/', which makes a glob match folders only, never a file"
        fix = (
            f"drop the '/' ({pattern.rstrip().rstrip('/' + os.sep)!r}), or add '/**' for the files below them"
        )
        raise DataError(f"{_ENTRY_NAMES.get()[0]} {pattern!r} {why}; {fix}")
    if ".." in rest:
        why = "has a '..' after a wildcard, which these globs do not follow"
        fix = "write the folder the '..' leads to before the first wildcard"
        raise DataError(f"{_ENTRY_NAMES.get()[0]} {pattern!r} {why}; {fix}")


def _glob_rest(path: Path) -> tuple[Path, tuple[str, ...]]:
    """The folder before the first wildcard of the glob ``path`` and the glob's segments from there (none
    for a path without a wildcard)."""
    parts = path.parts
    magic = next((i for i, part in enumerate(parts) if _GLOB_MAGIC & set(part)), len(parts))
    return (Path(*parts[:magic]) if magic else Path()), parts[magic:]


_SHARED_WALKS: ContextVar[dict[tuple[str, str], _Walk | None] | None] = ContextVar(
    "_SHARED_WALKS", default=None
)


@contextmanager
def one_walk_per_entry() -> Iterator[None]:
    """Within it, each ``data.paths`` entry's folder is walked once (:func:`_entry_walk`), however many
    checks ask for it: a config's check that out_dir is not reached through a link in the data
    (:func:`link_reaching`) and its check of the files (:func:`split_keys`) walked 75,000 files twice
    (about 4 s). Outside it, every call walks anew (files change between a check and a later read)."""
    token = _SHARED_WALKS.set({})
    try:
        yield
    finally:
        _SHARED_WALKS.reset(token)


def _entry_walk(pattern: str) -> _Walk | None:
    """The walk (:class:`_Walk`, done) that finds the files of the ``data.paths`` entry ``pattern``, a
    folder or a glob: a glob's ``**`` follows links to folders as ``glob.glob`` does, but enters each
    folder once for each place of the glob (a folder holding ``x -> .`` and ``y -> .`` took glob minutes,
    following every route). None for a glob with a ``..`` after a wildcard or ending in ``/`` (refused:
    :func:`_refuse_unanswered_glob`) and for a file."""
    shared = _SHARED_WALKS.get()
    key = (pattern, os.getcwd())
    if shared is not None and key in shared:
        return shared[key]
    walk = _walk_entry(pattern)
    if shared is not None:
        shared[key] = walk
    return walk


def _walk_entry(pattern: str) -> _Walk | None:
    """:func:`_entry_walk`, walked now."""
    path = _entry_path(pattern)
    if path.is_dir():
        return _Walk(None).walk(path)
    root, rest = _glob_rest(path)
    if not rest or ".." in rest or pattern.rstrip().endswith(("/", os.sep)):
        return None
    walk = _Walk(rest)
    return walk.walk(root) if root.is_dir() else walk


def link_reaching(entry: str, folder: Path, names: Sequence[str]) -> Path | None:
    """The link to a folder below the ``data.paths`` entry ``entry`` (a folder or a glob, as read:
    :func:`_entry_walk`) through which the entry reads a file of the folder ``folder`` (links resolved)
    named as one of ``names`` (paths relative to it, e.g. the files a run writes into its out_dir), or
    None: the link leads to ``folder``, to a folder above it, or to one inside it."""
    walk = None if _entry_path(entry).is_file() else _entry_walk(entry)  # the walk split_keys reads
    for link, real, places in walk.links if walk is not None else ():
        for name in names:
            below = _path_from(Path(real), folder, Path(name).parts)
            if below and walk.accepts(places, below):
                return link
    return None


def _path_from(target: Path, folder: Path, parts: Sequence[str]) -> tuple[str, ...] | None:
    """The path below the folder ``target`` of the file at ``parts`` below ``folder`` (both resolved), or
    None where it is not below ``target``."""
    if target == folder or target in folder.parents:
        return (*folder.relative_to(target).parts, *parts)
    inside = target.relative_to(folder).parts if folder in target.parents else None
    if inside is None or tuple(parts[: len(inside)]) != inside:
        return None
    return tuple(parts[len(inside) :])


def _warn_unreadable(walk: _Walk, pattern: str) -> None:
    """One warning for the folders below the ``data.paths`` entry ``pattern`` that could not be listed
    (permission denied): their files are not read (``glob`` and ``rglob`` left them out without a word);
    one for the links to files that are gone (:attr:`_Walk.broken`), not read either; each names the entry
    as :func:`resolve_files`'s ``option`` does."""
    entry, entries = _ENTRY_NAMES.get()
    if walk.unreadable:
        folder, err = walk.unreadable[0]
        others = _and_more(len(walk.unreadable) - 1)
        log.warning(
            "%s %r: the folder %r%s cannot be read (%s), so its files are left out of the data; "
            "check its permissions, or give %s that leave it out",
            entry, pattern, str(folder), others, err.strerror or err, entries,
        )  # fmt: skip
    if walk.broken:  # glob.glob listed them (their read then failed); the walk alone would say nothing
        others = _and_more(len(walk.broken) - 1)
        why = (
            "it is in a loop of links"
            if _is_link_loop(walk.broken[0])
            else "its target was moved or deleted, or is on a disk not mounted"
        )
        log.warning(
            "%s %r: the link %r%s leads to no file or folder (%s), so it is left out of the "
            "data; restore its target, or remove the link",
            entry, pattern, str(walk.broken[0]), others, why,
        )  # fmt: skip


def _kind(entry: os.DirEntry[str]) -> tuple[bool, bool]:
    """Whether ``entry`` is a folder, and whether a file (links followed); neither for a link in a loop of
    links, on which ``is_dir`` raises (ELOOP) where it gives False for a link to nothing."""
    try:
        return entry.is_dir(), entry.is_file()
    except OSError:
        return False, False


def _link_target(link: Path) -> str:
    """The target of ``link`` as written in it, quoted, and where it leads when that is relative (from
    the link's folder, not the current one): ``'../mnt/a.txt' ('/data/mnt/a.txt')``."""
    target = os.readlink(link)
    if os.path.isabs(target):
        return repr(target)
    leads = os.path.normpath(os.path.join(os.path.realpath(os.path.dirname(link) or "."), target))
    return f"{target!r} ({leads!r})"


def _is_link_loop(path: Path) -> bool:
    """Whether resolving the link ``path`` goes round a loop of links (``a -> b -> a``)."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


class _Walk:
    """The walk below a data folder, or below a glob's folder matching the rest of the glob: each folder
    listed in sorted order, the folders reached without a link first, then those reached through links to
    folders, fewest links first (:func:`_links_resolved`: a link to a link counts both), then in sorted
    order. A folder is entered once for each place of the glob it can be at (once for a data folder), so
    a link back up is no endless loop, and a file reached by several paths is found by the one through
    the fewest links (a tie: the first in sorted order), its split key: a file keeps the path it has below
    the folder itself, and a link to a path the data already reaches (``a -> b`` beside ``b -> /ext``)
    renames no file, whichever sorts first. ``pattern``: the glob's segments after its folder, matched as
    ``glob.glob(..., recursive=True)`` matches them (``**`` spans any folders but hidden ones, no wildcard
    matches a name starting with a dot, a ``**`` that ends the glob matches a file only below a folder);
    None: every file, hidden entries and ``__pycache__`` skipped (:func:`_skipped_below`)."""

    def __init__(self, pattern: Sequence[str] | None) -> None:
        self.pattern = tuple(pattern) if pattern is not None else None
        self.files: list[tuple[int, Path, str]] = []  # (links on the way, the path as found, resolved)
        self.links: list[tuple[Path, str, frozenset[int]]] = []  # (link, its folder resolved, place)
        self.unreadable: list[tuple[Path, OSError]] = []
        self.broken: list[Path] = []  # links the walk would take as files, whose target is gone
        self._closures: dict[frozenset[int], frozenset[int]] = {}  # each set of places, closed once

    def start(self) -> frozenset[int]:
        """The place at the walk's folder: the glob's segments still to match (their first indices)."""
        return self._closure({0}) if self.pattern is not None else frozenset()

    def _closure(self, places: Iterable[int]) -> frozenset[int]:
        """``places`` and, after each ``**``, the segment after it (``**`` matches no folder too)."""
        assert self.pattern is not None
        found = set(places)
        todo = list(found)
        while todo:
            i = todo.pop()
            if i < len(self.pattern) and self.pattern[i] == "**" and i + 1 not in found:
                found.add(i + 1)
                todo.append(i + 1)
        return frozenset(found)

    def step(self, places: frozenset[int], name: str) -> frozenset[int] | None:
        """The place after the entry ``name`` at ``places``; None where nothing below it can match."""
        if self.pattern is None:
            return None if _skipped_name(name) else places
        after = set()
        for i in places:
            segment = self.pattern[i] if i < len(self.pattern) else None
            if segment == "**":
                if not name.startswith("."):
                    after.add(i)
            elif segment is not None and (segment.startswith(".") or not name.startswith(".")):
                if fnmatch.fnmatchcase(name, segment):
                    after.add(i + 1)
        if not after:
            return None
        closed = self._closures.get(frozenset(after))
        if closed is None:
            closed = self._closures[frozenset(after)] = self._closure(after)
        return closed

    def takes_file(self, places: frozenset[int], name: str) -> bool:
        """Whether the file ``name`` in a folder at ``places`` is one the walk gives: a segment matching it
        ends the glob, or a ``**`` matching it is followed by nothing but ``**`` (as ``glob.glob`` gives
        ``a/**``'s files; a ``**`` that matches no segment matches a folder, so ``*/**`` takes no file of
        the top folder)."""
        if self.pattern is None:
            return not _skipped_name(name)
        end = len(self.pattern)
        for i in places:
            segment = self.pattern[i] if i < end else None
            if segment == "**":
                if not name.startswith(".") and all(s == "**" for s in self.pattern[i + 1 :]):
                    return True
            elif i + 1 == end and (segment.startswith(".") or not name.startswith(".")):  # type: ignore[union-attr]
                if fnmatch.fnmatchcase(name, segment):  # type: ignore[arg-type]
                    return True
        return False

    def _could_read_through(self, places: frozenset[int], after: frozenset[int], name: str) -> bool:
        """Whether an entry ``name`` in a folder at ``places`` (``after``: the place below it) that leads
        nowhere (a link whose target is gone) is where the walk would read files: as a file it takes, or
        as a folder whose files the glob goes on to match (a link to a shard folder on a disk not mounted,
        read by ``data/**/*.txt``)."""
        return self.takes_file(places, name) or self.pattern is None or bool(after - {len(self.pattern)})

    def accepts(self, places: frozenset[int] | None, parts: Sequence[str]) -> bool:
        """Whether a file at ``parts`` below a folder at ``places`` is one the walk gives."""
        for name in parts[:-1]:
            if places is None:
                return False
            places = self.step(places, name)
        return places is not None and bool(parts) and self.takes_file(places, parts[-1])

    def walk(self, root: Path) -> _Walk:
        """Walk below ``root``: :attr:`files`, :attr:`links` (the links to folders entered) and
        :attr:`unreadable` (the folders that could not be listed) filled in; returns itself. The links
        to folders wait in a heap, fewest links on the way first, then in sorted order (a folder's paths
        below a link sort after the link and before the next one, as the walk below it enters them)."""
        entered: set[tuple[str, frozenset[int]]] = set()
        starts: list[tuple[int, tuple[str, ...], Path, frozenset[int]]] = [(0, (), root, self.start())]
        while starts:
            hops, _, start, places = heapq.heappop(starts)
            stack = [(start, places)]
            while stack:
                folder, places = stack.pop()
                real = os.path.realpath(folder)
                if (real, places) in entered:
                    continue
                entered.add((real, places))
                if folder is start and hops:
                    self.links.append((folder, real, places))
                below = self._list(folder, real, places, hops)
                for path, after, links in below:
                    if links:
                        heapq.heappush(starts, (hops + links, path.parts, path, after))
                stack += reversed([(path, after) for path, after, links in below if not links])
        return self

    def _list(
        self, folder: Path, real: str, places: frozenset[int], hops: int
    ) -> list[tuple[Path, frozenset[int], int]]:
        """The files of ``folder`` (resolved: ``real``; at ``places``; reached through ``hops`` links) into
        :attr:`files`; its subfolders to enter, each as ``(path, place, links resolved to reach it from
        ``folder``)``."""
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            self.unreadable.append((folder, err))
            return []
        subfolders = []
        for entry in entries:
            after = self.step(places, entry.name)
            if after is None:
                continue
            links = _links_resolved(os.path.join(real, entry.name)) if entry.is_symlink() else 0
            is_dir, is_file = _kind(entry)
            if is_dir:
                if self.pattern is None or after - {len(self.pattern)}:
                    subfolders.append((Path(folder, entry.name), after, links))
            elif is_file and self.takes_file(places, entry.name):
                found = Path(folder, entry.name)
                resolved = os.path.realpath(found) if links else os.path.join(real, entry.name)
                self.files.append((hops + links, found, resolved))
            elif (
                links
                and not os.path.exists(entry.path)
                and self._could_read_through(places, after, entry.name)
            ):
                self.broken.append(Path(folder, entry.name))
        return subfolders


def _links_resolved(path: str) -> int:
    """How many symbolic links resolving ``path`` (absolute) goes through: a link to a link counts both,
    a link whose target's folders hold links counts those too (at most 40 before a loop is given up)."""
    todo = list(reversed(Path(path).parts[1:]))
    resolved, count = Path(path).parts[0], 0
    while todo and count <= 40:
        name = todo.pop()
        candidate = os.path.join(resolved, name)
        if name == "..":
            resolved = os.path.dirname(resolved)
        elif name != "." and os.path.islink(candidate):
            count += 1
            target = os.readlink(candidate)
            resolved = resolved if not os.path.isabs(target) else os.sep
            todo.extend(reversed(Path(target).parts[1 if os.path.isabs(target) else 0 :]))
        elif name != ".":
            resolved = candidate
    return count


def glob_matches(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether the path segments ``parts`` match the glob segments ``pattern`` as ``glob.glob(...,
    recursive=True)`` matches them, and as a data entry's walk (:class:`_Walk`) reads them: ``**`` spans
    any number of segments but hidden ones, and no wildcard matches a name that starts with a dot."""
    walk = _Walk(pattern)
    return walk.accepts(walk.start(), parts)


def _only_skipped_files(folder: Path) -> str:
    """Where the data folder ``folder`` holds files, all skipped (:func:`_skipped_below`): how many, that
    they are skipped and how to name one, the end of the "matches no file" message; else ``""``."""
    skipped = sorted(p for p in folder.rglob("*") if p.is_file())
    if not skipped:
        return ""
    shown = str(skipped[0].relative_to(folder))
    return (
        f": it holds {len(skipped)} file{'s' if len(skipped) != 1 else ''}, all hidden (a name starting with "
        f"'.') or in __pycache__, which are skipped below a folder; name them as files or globs (e.g. "
        f"{shown!r} below it), or rename them"
    )


def bracket_hint(pattern: str) -> str:
    """What to add to "``pattern`` matches no file" where ``pattern`` holds a ``[``: a glob reads
    ``[...]`` as one character of a set, so ``texts [v2]/*.txt`` never reaches the folder ``texts [v2]``.
    Names the existing folder or file with a bracket that the pattern starts with and the pattern that
    matches below it (its brackets escaped, :func:`glob.escape`); ``""`` for a pattern without one."""
    if "[" not in pattern:
        return ""
    parts = _entry_path(pattern).parts
    for end in range(len(parts), 0, -1):
        prefix = str(Path(*parts[:end]))
        if "[" in prefix and os.path.exists(prefix):
            escaped = str(Path(glob.escape(prefix), *parts[end:]))
            walk = _entry_walk(escaped)  # the walk a data.paths entry of it is read with
            found = len(walk.files) if walk is not None else 0
            if found:
                return (
                    f"; {prefix!r} exists, but a glob reads '[...]' as one character of a set: write '[[]' "
                    f"for a literal '[' ({escaped!r} matches {found} file{'s' if found != 1 else ''})"
                )
            break
    return "; a glob reads '[...]' as one character of a set: write '[[]' for a literal '[' (glob.escape)"


def _skipped_below(relative: Path) -> bool:
    """Whether a file found below a data directory is skipped: in or named as a hidden entry (``.git``),
    or compiled Python (``__pycache__``)."""
    return any(_skipped_name(part) for part in relative.parts)


def _skipped_name(name: str) -> bool:
    """Whether an entry of a data folder is skipped with what is below it (:func:`_skipped_below`)."""
    return name.startswith(".") or name == "__pycache__"


_GLOB_MAGIC = frozenset("*?[")


def _entry_folder(pattern: str) -> Path:
    """The folder a ``data.paths`` entry names files below: a folder itself, a file's parent, or a
    glob's folder before its first wildcard."""
    path = _entry_path(pattern)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    literal = []
    for part in path.parts:
        if _GLOB_MAGIC & set(part):
            break
        literal.append(part)
    return Path(*literal) if literal else Path()


def path_entries(paths: Any, name: str = "data.paths") -> list[str]:
    """``paths`` as a list of strings, in its order: one path (a str or ``os.PathLike``) is a list of one,
    not its letters (``'/'`` among them would name the whole file system); a list, tuple, 1-D numpy
    array, generator or other ordered collection, its entries. :class:`DataError` naming ``name`` for
    anything else (a set or a mapping has no order, and the order of the entries decides which of two
    entries finding one file gives its split key), an entry that is not a path, or an empty one: ``''``
    would name the current directory and read every file below it."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    ordered = isinstance(paths, Iterable) and not isinstance(paths, (bytes, Set, Mapping))
    given = list(paths) if ordered and getattr(paths, "ndim", 1) == 1 else None  # not a 0-d or 2-d array
    if given is None or not all(isinstance(p, (str, os.PathLike)) for p in given):
        raise DataError(
            f"{name}={paths!r} must be a path or a list of paths (files, directories or globs): a list, "
            "tuple, 1-D array or other ordered collection of str or os.PathLike"
        )
    entries = [str(os.fspath(p)) for p in given]  # numpy's str_ as a plain str
    empty = next((entry for entry in entries if not entry.strip()), None)
    if empty is not None:
        raise DataError(
            f"{name} entry {empty!r} is empty (it would read the whole current directory); give files, "
            "directories or globs"
        )
    return entries


def split_keys(patterns: Sequence[str]) -> dict[Path, str]:
    """What :func:`split_by_file` hashes for each file of the ``data.paths`` entries ``patterns`` (keyed
    by its resolved path: the keys are :func:`resolve_files`'s files): the path as found, links not resolved,
    relative to the entries' common folder. A file's key depends on nothing but its own place below the
    entries, so a file added anywhere (a link to elsewhere too) moves no other file between training and
    validation, and the data folder may move. A file named by two entries keeps the first one's key.
    One path given alone (a string) is one entry, not a list of its letters (:func:`path_entries`)."""
    patterns = path_entries(patterns)
    if not patterns:
        raise DataError("data.paths is empty: give files, directories or globs")
    root = os.path.commonpath([os.path.abspath(_entry_folder(p)) for p in patterns])
    keys: dict[Path, str] = {}
    below_root = root.rstrip(os.sep) + os.sep
    for pattern in patterns:
        for found, resolved in _found_files(pattern):
            absolute = os.path.abspath(found)  # normalised: below the root, the rest of it is relpath's
            key = (
                absolute[len(below_root) :]
                if absolute.startswith(below_root)
                else os.path.relpath(absolute, root)
            )
            keys.setdefault(Path(resolved), key.replace(os.sep, "/"))
    return keys


def split_by_file(
    files: Sequence[Path], val_fraction: float, keys: Mapping[Path, str] | None = None
) -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split: a file is in validation if a hash of its key falls below
    ``val_fraction``. The same files always split the same way, and a file's side does not depend on
    the other files. ``keys``: :func:`split_keys` of the entries the files came from; without them, a
    file's key is its path relative to the files' common folder.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    places = _hash_places(files, keys)
    train, val = [], []
    for p in files:
        (val if places[p] < val_fraction else train).append(p)
    return train, val


def _hash_places(files: Sequence[Path], keys: Mapping[Path, str] | None) -> dict[Path, float]:
    """Each file's place in [0, 1): the first 8 bytes of the SHA-256 of its key (:func:`split_by_file`),
    as the bytes of the name (UTF-8; a name that is not UTF-8, which Python holds with surrogate escapes,
    as the bytes it has on disk)."""
    keys = keys if keys is not None else _relative_keys(files)
    places = {}
    for p in files:
        digest = hashlib.sha256(keys[p].encode("utf-8", "surrogateescape")).digest()
        places[p] = int.from_bytes(digest[:8], "big") / 2**64
    return places


def _relative_keys(files: Sequence[Path]) -> dict[Path, str]:
    """Each file's path relative to the files' common folder (the split key of files given without keys)."""
    root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path()
    return {p: p.relative_to(root).as_posix() for p in files}


def split_test_files(
    files: Sequence[Path], val_fraction: float, test_fraction: float, keys: Mapping[Path, str] | None = None
) -> tuple[list[Path], list[Path], dict[Path, str] | Mapping[Path, str] | None]:
    """The test files of ``files`` and the others, as ``(others, test, keys)``: a file is a test file when
    the place of its key (:func:`split_by_file`'s hash) is in ``[val_fraction, val_fraction +
    test_fraction)``, a band disjoint from validation's ``[0, val_fraction)``, so a file's side never
    depends on the other files. ``keys``: the keys to split ``others`` on (the files' keys relative to
    all of ``files`` where none were given: dropping the test files must not move the common folder).
    At ``test_fraction`` 0 there is no test file and ``others``, ``keys`` are ``files``, ``keys``."""
    if test_fraction == 0:
        return list(files), [], keys
    keys = keys if keys is not None else _relative_keys(files)
    places = _hash_places(files, keys)
    test = [p for p in files if val_fraction <= places[p] < val_fraction + test_fraction]
    chosen = set(test)
    return [p for p in files if p not in chosen], test, keys


def copied_files(held_out: Sequence[Path], train: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Each file of ``held_out`` whose bytes are those of a file of ``train``, with that training file,
    in ``held_out``'s order: a held-out copy of training text measures memorisation, not prediction. Only
    files whose size a file on the other side has are read (and compared by SHA-256); empty files are
    never copies. A file that cannot be read raises :class:`DataError` as :func:`read_bytes` does."""
    held_sizes = {p: _file_size(p, "data.paths") for p in held_out}
    train_sizes = {p: _file_size(p, "data.paths") for p in train}
    shared = set(held_sizes.values()) & set(train_sizes.values()) - {0}
    # then their first MiB: a file is read whole only where a file of its size on the other side begins
    # as it does (a corpus of equal-sized shards, as `split -b` makes, is not read a second time)
    held_heads = {p: (size, _file_digest(p, 1)) for p, size in held_sizes.items() if size in shared}
    heads, matched = set(held_heads.values()), set()
    training_digests: dict[bytes, Path] = {}
    for path, size in train_sizes.items():
        head = (size, _file_digest(path, 1)) if size in shared else None
        if head in heads:
            matched.add(head)
            training_digests.setdefault(_whole_digest(path, *head), path)
    copies = []
    for path, head in held_heads.items():
        twin = training_digests.get(_whole_digest(path, *head)) if head in matched else None
        if twin is not None:
            copies.append((path, twin))
    return copies


def _whole_digest(path: Path, size: int, head: bytes) -> bytes:
    """:func:`_file_digest` of ``path``, which is ``head`` (the digest of its first MiB) for a file of
    ``size`` bytes that fits in it."""
    return head if size <= 2**20 else _file_digest(path)


def _file_digest(path: Path, blocks: int | None = None) -> bytes:
    """SHA-256 of ``path``'s bytes (of its first ``blocks`` MiB; None: all), read a MiB at a time (a large
    file is never held whole)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for i, block in enumerate(iter(lambda: handle.read(2**20), b"")):
                if blocks is not None and i >= blocks:
                    break
                digest.update(block)
    except OSError as err:
        raise _unreadable(path, "data.paths", err) from None
    return digest.digest()


def warn_copied_files(copies: Sequence[tuple[Path, Path]], held_out_bytes: int, share: float = 0.01) -> None:
    """Log one warning when the held-out files that copy training files (:func:`copied_files`) hold at
    least ``share`` of the ``held_out_bytes`` (a few stray duplicates, as in the default corpus, do not
    matter): their loss measures memorisation, so the run's validation numbers flatter it."""
    copied = sum(_file_size(path, "data.paths") for path, _ in copies)
    if not copies or copied < share * max(held_out_bytes, 1):
        return
    held, twin = copies[0]
    log.warning(
        "%d held-out file(s), %d of the %d held-out bytes (%.0f%%), are exact copies of training files (e.g. "
        "%r = %r): their loss measures memorisation; remove the copies from data.paths for a fair validation",
        len(copies), copied, held_out_bytes, 100 * copied / max(held_out_bytes, 1), str(held), str(twin),
    )  # fmt: skip


COMPRESSIONS: tuple[str, ...] = (".gz", ".bz2", ".xz", ".zst")
"""Compression suffixes after a json, text or csv suffix (``train.jsonl.gz``, ``train.jsonl.zst`` as The
Pile and SlimPajama ship): ``datasets`` decompresses such files as it reads them, streaming or not (as
most released corpora ship; ``.zst`` through the ``zstandard`` package), and so does innerloop where it
reads a CSV header itself (``data.name='hf'``); a text run reads files as they are, and refuses them
(:func:`refuse_compressed`)."""

COMPRESSION_MAGIC: dict[str, re.Pattern[bytes]] = {
    ".gz": re.compile(rb"\x1f\x8b\x08[\x00-\x1f]"),  # deflate (the one method), no reserved flag bit
    ".bz2": re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"),  # a block, or the end of an empty stream
    ".xz": re.compile(rb"\xfd7zXZ\x00"),
    ".zst": re.compile(rb"\x28\xb5\x2f\xfd"),
    ".lz4": re.compile(rb"\x04\x22\x4d\x18"),
    ".zip": re.compile(rb"PK(\x03\x04|\x05\x06)"),  # a member, or an empty archive
    ".7z": re.compile(rb"7z\xbc\xaf\x27\x1c"),
}
"""How a file of each compressed or archive format begins. A file that begins so is packed whatever its
name (a ``.txt`` saved gzipped by a server, a ``.zip`` of text files), and one named so that does not is
text under an odd name (``notes.gz`` written by hand), read as any other."""

DATASET_MAGIC: dict[str, re.Pattern[bytes]] = {
    "Parquet": re.compile(rb"PAR1"),
    "Arrow": re.compile(rb"ARROW1\x00\x00|\xff\xff\xff\xff"),  # the file format (Feather), the stream format
}
"""How the binary files of records that ``data.name='hf'`` reads begin: a Parquet file, an Arrow file
(Feather), and an Arrow stream (what ``datasets``' ``save_to_disk`` writes: four ``0xff`` bytes, never
the start of UTF-8 text). Read as text, their columns' bytes would be the text."""

DATASET_END: dict[str, tuple[bytes, ...]] = {
    "Parquet": (b"PAR1",),
    "Arrow": (b"ARROW1", b"\xff\xff\xff\xff\x00\x00\x00\x00"),  # the file's end, the stream's end marker
}
"""How those files end, as every file ``pyarrow`` and ``datasets`` write does: a text file that happens to
begin as one (a heading ``PAR1``, latin-1 text beginning ``ÿÿÿÿ``) does not end so too, and is text."""

_MAGIC_BYTES = 10  # the longest beginning above
_END_BYTES = 8  # the longest end
_SHORTEST_DATASET_FILE = 16  # a Parquet file's or Arrow stream's beginning, end and least metadata


def file_end(data: bytes | bytearray, start: int = 0, end: int | None = None) -> bytes:
    """The last bytes of the file whose bytes are ``data[start:end]``, those :func:`dataset_file_of`
    reads; none for a file too short to be a dataset file (its beginning and end would overlap)."""
    end = len(data) if end is None else end
    return bytes(data[end - _END_BYTES : end]) if end - start >= _SHORTEST_DATASET_FILE else b""


def compression_of(head: bytes) -> str | None:
    """The :data:`COMPRESSION_MAGIC` format (``'.gz'``, ..., ``'.zip'``) whose beginning the bytes
    ``head`` start with, or None."""
    return next((name for name, magic in COMPRESSION_MAGIC.items() if magic.match(head)), None)


def _head_and_end(path: Path) -> tuple[bytes, bytes]:
    """``path``'s first bytes and its last (:func:`file_end`); none for a file that cannot be read (its
    read names it)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_MAGIC_BYTES)
            size = handle.seek(0, os.SEEK_END)
            if size < _SHORTEST_DATASET_FILE:
                return head, b""
            handle.seek(size - _END_BYTES)
            return head, handle.read(_END_BYTES)
    except OSError:
        return b"", b""


def refuse_compressed(files: Sequence[Path], option: str = "data.paths") -> None:
    """:class:`DataError` naming ``option`` and the first of ``files`` that begins as a compressed file or
    an archive does (:data:`COMPRESSION_MAGIC`), or begins and ends as a Parquet or Arrow file of records
    does (:data:`DATASET_MAGIC`, :data:`DATASET_END`), whatever its name: text files are read as they are, so its compressed bytes
    or binary columns would be the text (a byte-level model trained on them without a word; another
    tokenizer said only "not UTF-8")."""
    for path in files:
        _refuse_packed(path, *_head_and_end(path), option)


def dataset_file_of(head: bytes, end: bytes) -> str | None:
    """The :data:`DATASET_MAGIC` format (``'Parquet'``, ``'Arrow'``) whose beginning the bytes ``head``
    start with and whose end (:data:`DATASET_END`) the file's last bytes ``end`` (:func:`file_end`) end
    with, or None."""
    return next(
        (
            name
            for name, magic in DATASET_MAGIC.items()
            if magic.match(head) and end.endswith(DATASET_END[name])
        ),
        None,
    )


def dataset_file_advice(
    kind: str,
    read: str = "text files",
    fix: str = "read it with data.name=hf (each record's data.text_field; a folder save_to_disk wrote is given whole)",
) -> str:
    """The rest of the message for a ``kind`` file of records (a :data:`DATASET_MAGIC` key) that is to be
    read as text (by ``read``): what it is, and what reads it (``fix``)."""
    article = "an" if kind[0] in "AEIOU" else "a"
    return (
        f"is {article} {kind} file (a dataset's records, in binary columns), and {read} are read as they "
        f"are: its bytes would be the text; {fix}"
    )


def _refuse_packed(path: Path, head: bytes, end: bytes, option: str) -> None:
    """:func:`refuse_compressed` for the file ``path`` that begins with the bytes ``head`` and ends with
    ``end`` (:func:`file_end`)."""
    kind = dataset_file_of(head, end)
    if kind is not None:
        raise DataError(
            f"{option} file {str(path)!r} {dataset_file_advice(kind)}; or leave it out of {option}"
        )
    packed = compression_of(head)
    if packed is not None:
        raise DataError(  # a folder's .jar or .docx is a zip too: not text to extract, but to leave out
            f"{option} file {str(path)!r} {compressed_file_advice(packed)}; or leave it out of {option} "
            "(a glob that does not match it)"
        )


def compressed_file_advice(packed: str, read: str = "text files", hf: bool = True) -> str:
    """The rest of the message for a file compressed as ``packed`` (a :data:`COMPRESSION_MAGIC` key) that
    is to be read as text (by ``read``): what it is, and what to do (``hf``: also that ``data.name=hf``
    decompresses it, where it does)."""
    by_hf = ", or read it with data.name=hf, which decompresses json, text and csv files"
    return (
        f"is compressed ({packed}), and {read} are read as they are: its compressed bytes would be the "
        f"text; {'decompress' if packed in COMPRESSIONS else 'extract'} it{by_hf if hf and packed in COMPRESSIONS else ''}"
    )


def read_bytes(files: Sequence[Path], option: str = "data.paths") -> torch.Tensor:
    """The files' bytes, each file followed by :data:`DOCUMENT_SEPARATOR`, as ``uint8 [N]``; a file that
    cannot be read raises :class:`DataError` naming it and ``option`` (where it was given).

    The bytes are read into one buffer sized from the files' sizes, which the tensor shares: the corpus
    is held in memory once (a file that changed size since is read as it is now)."""
    sizes = [_file_size(p, option) for p in files]
    buffer = bytearray(sum(sizes) + len(files))
    at, wide, nul = 0, [], []
    for p, size in zip(files, sizes, strict=True):
        got, rest = _read_into(p, buffer, at, size, option)
        if got < size or rest:  # the file shrank or grew since its size was taken: its bytes now
            buffer[at + got : at + size] = rest
        read = got + len(rest)
        _refuse_packed(
            p, bytes(buffer[at : at + min(read, _MAGIC_BYTES)]), file_end(buffer, at, at + read), option
        )
        bom = _wide_text_mark(buffer, at, got + len(rest))
        if bom is not None:
            wide.append((p, bom))
        elif buffer.find(DOCUMENT_SEPARATOR, at, at + got + len(rest)) >= 0:  # memchr: text has none
            nul.append((p, buffer.count(DOCUMENT_SEPARATOR, at, at + got + len(rest))))
        at += got + len(rest)
        buffer[at] = DOCUMENT_SEPARATOR
        at += 1
    if wide:
        _warn_wide_text(wide, option)
    if nul:
        _warn_nul_bytes(nul, option)
    return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)


def _wide_text_mark(buffer: bytearray, at: int, size: int) -> str | None:
    """The byte-order mark ``"UTF-16"`` / ``"UTF-32"`` of the file of ``size`` bytes at ``buffer[at:]``
    when its text carries NUL bytes (what :func:`_warn_wide_text` warns of): a UTF-32 mark holds two, a
    UTF-16 one counts where one of the next 64 bytes is 0 (a binary file begins with ``ff fe`` once in
    65,536; text of ASCII characters in UTF-16 has a NUL in every other byte)."""
    head = bytes(buffer[at : at + min(size, 66)])
    bom = byte_order_mark(head)
    if bom == "UTF-16" and 0 not in head[2:]:
        return None
    return bom


def _and_more(others: int, what: str = "") -> str:
    """The tail of a warning that names one of several things: ``" (and 2 more)"`` (``what``, e.g. ``"
    file(s) of data.paths hold some too"``, after "more"); ``""`` for no others."""
    return f" (and {others} more{what})" if others > 0 else ""


def _warn_wide_text(wide: Sequence[tuple[Path, str]], option: str) -> None:
    """One warning for the files read as bytes that start with a UTF-16 or UTF-32 byte-order mark: their
    text is full of NUL bytes, the byte a byte-level model reads as the end of a document
    (:data:`DOCUMENT_SEPARATOR`, where ``innerloop generate`` stops)."""
    path, bom = wide[0]
    others = _and_more(len(wide) - 1)
    log.warning(
        "%s file %r%s is %s text (it starts with a %s byte-order mark), read as its bytes: the NUL byte of "
        "each ASCII character in it is the end-of-document byte 0 of a byte-level model (where innerloop "
        "generate stops); convert it to UTF-8 (e.g. iconv -f %s -t utf-8)",
        option, str(path), others, bom, bom, bom,
    )  # fmt: skip


def _warn_nul_bytes(files: Sequence[tuple[Path, int]], option: str) -> None:
    """One warning for the files read as bytes that hold NUL bytes (``(file, how many)``), which text
    does not: each is the end-of-document byte of a byte-level model (:data:`DOCUMENT_SEPARATOR`, where
    ``innerloop generate`` stops), so such a file is likely binary (an image, a ``.pyc``, a database)."""
    path, count = files[0]
    others = _and_more(len(files) - 1, f" file(s) of {option} hold some too")
    log.warning(
        "%s file %r holds %d NUL bytes%s, which text does not: each is read as the end-of-document byte 0 "
        "of a byte-level model (where innerloop generate stops); is it a binary file? leave it out of %s "
        "(a glob that does not match it)",
        option, str(path), count, others, option,
    )  # fmt: skip


def _read_into(path: Path, buffer: bytearray, at: int, size: int, option: str) -> tuple[int, bytes]:
    """Read ``path`` into ``buffer[at : at + size]``: the bytes read there, and those past ``size``."""
    try:
        with path.open("rb") as handle, memoryview(buffer) as view:
            got = handle.readinto(view[at : at + size]) if size else 0
            return got or 0, handle.read()
    except OSError as err:
        raise _unreadable(path, option, err) from None


def _file_size(path: Path, option: str) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise _unreadable(path, option, err) from None


def _unreadable(path: Path, option: str, err: OSError) -> DataError:
    return DataError(
        f"{option} file {str(path)!r} cannot be read: {err.strerror or err}; check its permissions, or "
        f"remove it from {option}"
    )


def _file_bytes(path: Path, option: str) -> bytes:
    """``path``'s bytes, or :class:`DataError` naming it when the system cannot read it."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise _unreadable(path, option, err) from None


ENCODE_GROUP_BYTES = 2 * 2**20
"""Text given to the tokenizer in one call (whole files, one at least): the tokenizers library holds
about :data:`TOKENIZE_BYTES_PER_BYTE` bytes per byte of each call's text, so a corpus of many files
is encoded a group at a time, each group's ids kept as an int64 tensor (8 bytes a token)."""

TOKENIZE_BYTES_PER_BYTE = 150
"""The memory the tokenizers library typically takes to encode one text, per byte of it (measured at
8-10 MB: about 100 to 195 bytes for BPE, WordPiece, WordLevel and Unigram models on prose and Python source;
1.6 GB for 10 MB of Python source with a 1,024-token BPE). A file expected to need more than this
machine's memory is warned about (:class:`TokenizerMemoryWarning`): it may be killed by the system."""

TOKENIZE_BYTES_PER_BYTE_AT_LEAST = 16
"""What the tokenizers library takes per byte of a text whatever its model: the offsets it keeps for
every byte of the normalized text (two 8-byte integers). A file that needs more than this machine's
memory even so is refused (:func:`read_tokens`); one between this and the typical need is not, since
it may fit."""


class TokenizerMemoryWarning(UserWarning):
    """A text file is expected to need more memory to encode than this machine has."""


def read_tokens(
    files: Sequence[Path], tokenizer: Tokenizer | None = None, option: str = "data.paths"
) -> torch.Tensor:
    """The files' token ids, each file followed by the tokenizer's end-of-text id (when it has one).

    With the byte tokenizer (or None) this is :func:`read_bytes`, ``uint8 [N]``; otherwise ``int64 [N]``,
    each file decoded as UTF-8 (a file that is not raises :class:`DataError` naming it) and encoded whole,
    :data:`ENCODE_GROUP_BYTES` of files at a time. A file whose encoding by the tokenizers library
    cannot fit this machine's memory (:data:`TOKENIZE_BYTES_PER_BYTE_AT_LEAST`) raises :class:`DataError`
    naming it, before any file is read; one expected not to (:data:`TOKENIZE_BYTES_PER_BYTE`) warns. A
    file that begins as a compressed one does raises :class:`DataError` naming it (:func:`refuse_compressed`,
    checked on the bytes read)."""
    if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
        return read_bytes(files, option)
    sizes = [_file_size(p, option) for p in files]
    _refuse_files_too_large_to_tokenize(files, sizes, tokenizer, option)
    encode_many = getattr(tokenizer, "encode_many", None)
    separator = torch.tensor([] if tokenizer.eos_id is None else [tokenizer.eos_id], dtype=torch.int64)
    parts: list[torch.Tensor] = []
    for group in _groups(files, sizes, ENCODE_GROUP_BYTES):
        texts = [_file_text(p, tokenizer, option) for p in group]
        encoded = encode_many(texts) if encode_many is not None else [tokenizer.encode(t) for t in texts]
        del texts
        for ids in encoded:
            parts += [torch.tensor(ids, dtype=torch.int64), separator]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def _groups(files: Sequence[Path], sizes: Sequence[int], most: int) -> list[list[Path]]:
    """``files`` in order, in consecutive groups of at most ``most`` bytes (a larger file alone)."""
    groups: list[list[Path]] = []
    total = 0
    for p, size in zip(files, sizes, strict=True):
        if not groups or total + size > most:
            groups.append([])
            total = 0
        groups[-1].append(p)
        total += size
    return groups


def _refuse_files_too_large_to_tokenize(
    files: Sequence[Path], sizes: Sequence[int], tokenizer: Tokenizer, option: str
) -> None:
    """:class:`DataError` naming the largest of ``files`` when the tokenizers library (an
    :class:`HFTokenizer`) cannot encode it in this machine's memory even at its least need per byte,
    :class:`TokenizerMemoryWarning` when it is expected to need more: such a process was killed by the
    system, after minutes, without a word. Other tokenizers' needs are theirs, not checked."""
    memory = machine_memory_bytes()
    if not files or memory is None or not isinstance(tokenizer, HFTokenizer):
        return
    size, path = max(zip(sizes, files, strict=True))
    if size * TOKENIZE_BYTES_PER_BYTE <= memory:
        return
    what = (
        f"{option} file {str(path)!r} ({memory_size(size)}) is one document, encoded whole by the tokenizer "
        f"({tokenizer.describe()}), which needs at least {TOKENIZE_BYTES_PER_BYTE_AT_LEAST} bytes of memory "
        f"per byte of text and typically about {TOKENIZE_BYTES_PER_BYTE}"
    )
    fix = "split it into smaller files (e.g. split -C 10M), or use data.tokenizer=bytes"
    if size * TOKENIZE_BYTES_PER_BYTE_AT_LEAST > memory:
        least = memory_size(size * TOKENIZE_BYTES_PER_BYTE_AT_LEAST)
        raise DataError(f"{what}: at least {least}, more than the {memory_size(memory)} here; {fix}")
    typical = memory_size(size * TOKENIZE_BYTES_PER_BYTE)
    warnings.warn(
        f"{what}: about {typical}, more than the {memory_size(memory)} here, so the system may stop the "
        f"process while it encodes; {fix}",
        TokenizerMemoryWarning,
        stacklevel=warning_stacklevel(),
    )


def _file_text(path: Path, tokenizer: Tokenizer, option: str) -> str:
    """``path``'s text (:func:`~innerloop.data.tokenizer.utf8_file_text`: a byte-order mark at its start is
    not text), or :class:`DataError` naming it when it is not UTF-8."""
    data = _file_bytes(path, option)
    _refuse_packed(path, data[:_MAGIC_BYTES], file_end(data), option)
    try:
        return utf8_file_text(data)
    except UnicodeDecodeError as err:
        bom = byte_order_mark(err.object)  # the bytes it decoded
        what = f"{bom} text (it starts with a {bom} byte-order mark)" if bom else "not UTF-8 text"
        fix = "data.tokenizer=bytes" if option == "data.paths" else "a model trained on bytes"
        raise DataError(
            f"{option} file {str(path)!r} is {what} ({err.reason} at byte {err.start}), but the tokenizer "
            f"({tokenizer.describe()}) reads UTF-8 only; convert it to UTF-8 (e.g. iconv -t utf-8), "
            f"remove it from {option}, or use {fix}"
        ) from None


def split_text_files(
    files: Sequence[Path], val_fraction: float, keys: Mapping[Path, str] | None = None
) -> tuple[list[Path], list[Path]]:
    """The training and validation files of two or more files: :func:`split_by_file` (on ``keys``), or,
    when that leaves either side empty (too few files for the fraction), the last file held out."""
    train, val = split_by_file(files, val_fraction, keys)
    if not val or not train:
        train, val = list(files[:-1]), list(files[-1:])
    return train, val


def fallback_held_out(
    files: Sequence[Path], val_fraction: float, keys: Mapping[Path, str] | None = None
) -> Path | None:
    """The file :func:`split_text_files` holds out because the split by file hash put every one of
    ``files`` on one side (the last file in sorted order), or None when the hash split holds out some
    and not all (or there is a single file, which is split by bytes instead)."""
    if len(files) < 2:
        return None
    train, val = split_by_file(files, val_fraction, keys)
    return files[-1] if not val or not train else None


def _single_file_cut(length: int, val_fraction: float) -> int:
    """Where a single file's bytes are split: its last ``val_fraction`` is held out."""
    return int(length * (1 - val_fraction))


def single_file_test_cut(length: int, val_fraction: float, test_fraction: float) -> int:
    """Where a single file's test text starts: its band of ``test_fraction`` just before the last
    ``val_fraction`` (validation's, :func:`_single_file_cut`), which it ends at; the training text is the
    bytes before it. At ``test_fraction`` 0, the validation cut (no test text)."""
    if test_fraction == 0:
        return _single_file_cut(length, val_fraction)
    return min(int(length * (1 - val_fraction - test_fraction)), _single_file_cut(length, val_fraction))


def held_out_share(val_fraction: float, test_fraction: float = 0.0) -> float:
    """The share of a single file held out (its validation tail, and its test band at ``test_fraction``
    > 0), as 1 minus where its training text ends (:func:`single_file_test_cut`'s factor of the length):
    shares compare as the cuts do, where ``val_fraction + test_fraction`` may not (0.1 + 0.2 is above
    0.3, though both runs cut the file at ``int(length * 0.7)``)."""
    return 1 - (1 - val_fraction - test_fraction)  # the factor, in the cut's order of operations


def text_split_lengths(
    files: Sequence[Path],
    val_fraction: float,
    keys: Mapping[Path, str] | None = None,
    test_fraction: float = 0.0,
) -> tuple[int, int]:
    """Bytes of the training and validation text :class:`TextDataModule` makes of ``files`` (split on
    ``keys``; the test text, at ``test_fraction`` > 0, is in neither: :func:`test_split_length`), from the
    files' sizes (nothing is read), separators included."""
    if len(files) == 1:
        length = _file_size(files[0], "data.paths") + 1
        cut = _single_file_cut(length, val_fraction)
        return single_file_test_cut(length, val_fraction, test_fraction), length - cut
    others, _, keys = split_test_files(files, val_fraction, test_fraction, keys)
    train, val = split_text_files(others, val_fraction, keys)
    return sum(_file_size(p, "data.paths") + 1 for p in train), sum(
        _file_size(p, "data.paths") + 1 for p in val
    )


def test_split_length(
    files: Sequence[Path], val_fraction: float, test_fraction: float, keys: Mapping[Path, str] | None = None
) -> int:
    """Bytes of the test text of ``files`` (:func:`split_test_files`; one file: its band before the
    validation tail, :func:`single_file_test_cut`), from their sizes, separators included."""
    if len(files) == 1:
        length = _file_size(files[0], "data.paths") + 1
        cut = _single_file_cut(length, val_fraction)
        return cut - single_file_test_cut(length, val_fraction, test_fraction)
    _, test, _ = split_test_files(files, val_fraction, test_fraction, keys)
    return sum(_file_size(p, "data.paths") + 1 for p in test)


def check_text_split(
    files: Sequence[Path],
    val_fraction: float,
    seq_len: int,
    keys: Mapping[Path, str] | None = None,
    test_fraction: float = 0.0,
) -> None:
    """:func:`check_text_lengths` of the byte-level split of ``files`` (sorted; split on ``keys``), from
    the files' sizes (nothing is read): the check a run config makes before any text is read; at
    ``test_fraction`` > 0, :func:`check_test_length` of its test text too."""
    others, test, split_on = split_test_files(files, val_fraction, test_fraction, keys)
    check_files_left(len(files), len(test), test_fraction)
    train_len, val_len = text_split_lengths(files, val_fraction, keys, test_fraction)
    fallback = fallback_held_out(others, val_fraction, split_on) if len(files) > 1 else None
    check_text_lengths(
        train_len, val_len, len(files), seq_len, val_fraction, fallback_file=fallback, announce=False
    )
    if test_fraction > 0:
        test_len = test_split_length(files, val_fraction, test_fraction, keys)
        check_test_length(test_len, len(files), seq_len, test_fraction)


def check_files_left(num_files: int, num_test: int, test_fraction: float) -> None:
    """Raise :class:`DataError` when the ``num_test`` test files of ``num_files`` (several) leave fewer than
    two for training and validation, which need a file each (one would be held out for validation)."""
    left = num_files - num_test
    if num_files > 1 and num_test and left < 2:
        raise DataError(
            f"data.test_fraction={test_fraction} holds out {num_test} of the {num_files} files for test, "
            f"leaving {left} for training and validation, which need a file each (a file is a test file when "
            "the hash of its path falls in [data.val_fraction, data.val_fraction + data.test_fraction)); give "
            "more files in data.paths or a smaller data.test_fraction"
        )


def check_test_length(
    test_len: int, num_files: int, seq_len: int, test_fraction: float, unit: str = "bytes"
) -> None:
    """Raise :class:`DataError` unless the test text (``data.test_fraction`` > 0) holds a window of
    ``seq_len + 1`` tokens; the message says which setting to change."""
    need = seq_len + 1
    if test_len >= need:
        return
    if num_files > 1 and test_len == 0:
        raise DataError(
            f"data.test_fraction={test_fraction} holds out no test file: a file is a test file when the hash "
            f"of its path falls in [data.val_fraction, data.val_fraction + data.test_fraction), and none of "
            f"the {num_files} files' does; give more files in data.paths or a larger data.test_fraction"
        )
    held_out = (
        "the held-out test files"
        if num_files > 1
        else f"{test_fraction} of the file before its validation tail"
    )
    raise TextTooShortError(
        f"the test text ({held_out}) has {test_len} {unit}, fewer than data.seq_len + 1 = {need}; give more "
        "text, a larger data.test_fraction or a shorter data.seq_len",
        test_len, need, unit,
    )  # fmt: skip


def check_text_lengths(
    train_len: int | None,
    val_len: int,
    num_files: int,
    seq_len: int,
    val_fraction: float,
    unit: str = "bytes",
    fallback_file: Path | None = None,
    announce: bool = True,
) -> None:
    """Raise :class:`DataError` unless both the training and the validation text hold a window of
    ``seq_len + 1`` tokens (``unit``: what the lengths count), and, for a single file, ``val_fraction`` > 0;
    the message says which setting to change. (Several files at ``val_fraction`` 0 hold out the last
    one, as runs made so did; a new run refuses 0 itself: :func:`innerloop.train.run.train`.) ``fallback_file``: the file held out because the split by
    file hash put every file on one side (:func:`fallback_held_out`): the message then names it and why
    it was held out, and advises more files or a larger one sorted last rather than a larger
    data.val_fraction (which chose nothing); when the split is usable, ``announce`` logs one warning
    naming it (the data module's setup does; the config check before it does not, so it is said once).
    ``train_len`` None: the training text was not read (an evaluation reads the held-out text only)."""
    need = seq_len + 1
    if val_fraction == 0 and num_files == 1:
        raise DataError(
            "data.val_fraction=0 holds out no validation text: with a single file its last val_fraction "
            f"of {unit} is held out; set data.val_fraction > 0 (e.g. 0.1)"
        )
    if train_len is not None and train_len < need:
        raise TextTooShortError(
            f"the training text has {train_len} {unit}, fewer than data.seq_len + 1 = {need}; give more "
            "text (data.paths) or a shorter data.seq_len",
            train_len, need, unit,
        )  # fmt: skip
    if val_len >= need:
        if fallback_file is not None and announce:
            log.warning(
                "validation text: the split by file hash at data.val_fraction=%s put all %d files on one "
                "side, so the last file in sorted order, %r, is held out instead",
                val_fraction, num_files, str(fallback_file),
            )  # fmt: skip
        return
    if fallback_file is not None:
        raise DataError(
            f"the validation text has {val_len} {unit}, fewer than data.seq_len + 1 = {need}: the split by "
            f"file hash at data.val_fraction={val_fraction} put all {num_files} files on one side, so the "
            f"last file in sorted order, {str(fallback_file)!r}, is held out instead; give more files in "
            "data.paths (so that the hash split holds out some), a larger file that sorts last, or a "
            "shorter data.seq_len"
        )
    held_out = f"the last {val_fraction} of the file" if num_files == 1 else "the held-out files"
    raise TextTooShortError(
        f"the validation text ({held_out}) has {val_len} {unit}, fewer than data.seq_len + 1 = {need}; "
        "give more text, a larger data.val_fraction or a shorter data.seq_len",
        val_len, need, unit,
    )  # fmt: skip
