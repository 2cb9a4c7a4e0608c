"""Review s52c: the text data pipeline's leftovers: split keys of files reached through chains of links,
one walk of the data per config check, one glob matcher (patterns it cannot answer refused), hostile
inputs (names that are not UTF-8, FIFOs, files that vanish)."""

from __future__ import annotations

import glob
import os
import random
from pathlib import Path

import pytest

from innerloop.data.text import DataError, read_bytes, resolve_files, split_keys, text_split_lengths
from innerloop.train.data import validation_file_keys


def _files(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name * 3)


_SHARDS = [f"B/s{i:02d}.txt" for i in range(24)] + [f"B/sub/t{i:02d}.txt" for i in range(8)]

# (the links there before, the link added): each added link reaches files the data already reached
_LINK_CHAINS = {
    "a link to a link to a folder": ({"b": "{ext}/B"}, {"a": "b"}),
    "a link into a linked folder": ({"b": "{ext}/B"}, {"a": "b/sub"}),
    "a link to a linked file": ({"b.txt": "{ext}/f.txt"}, {"a.txt": "b.txt"}),
    "a link to a link in a subfolder": ({"z/b": "{ext}/B"}, {"a": "z/b"}),
}


@pytest.mark.parametrize("case", list(_LINK_CHAINS))
@pytest.mark.parametrize("glob_entry", [False, True])
def test_a_link_to_a_link_that_sorts_first_renames_no_file(tmp_path, case, glob_entry) -> None:
    """Of two paths of one file, both through links, the first in sorted order gave the split key: adding
    ``a -> b`` beside ``b -> /elsewhere/B`` renamed every file of B from b/... to a/..., moving files
    between training and validation without a word (two runs on "the same" data validated on other
    files; a resume was refused as renamed). A file's key is now its path through the fewest links (a
    link to a link counts both), so a link to a path the data already reaches renames nothing."""
    ext, data = tmp_path / "ext", tmp_path / "data"
    _files(ext, [*_SHARDS, "f.txt"])
    _files(data, ["own.txt"])
    before_links, added = _LINK_CHAINS[case]
    entry = [str(data / "**" / "*.txt")] if glob_entry else [str(data)]
    for links in (before_links, added):
        for name, target in links.items():
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target.format(ext=ext), data / name)
        if links is before_links:
            keys = split_keys(entry)
            held_out = validation_file_keys(entry, 0.3)
    assert split_keys(entry) == keys
    assert validation_file_keys(entry, 0.3) == held_out
    assert held_out and len(held_out) < len(keys)  # a split that holds out some files, not all


def test_two_links_straight_to_one_folder_key_it_by_the_first_in_sorted_order(tmp_path) -> None:
    """Documented rule for a tie (two links, each straight to one folder outside the data): the path that
    sorts first names its files, whichever link was made first."""
    _files(tmp_path / "ext", ["B/x.txt"])
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "ext" / "B", tmp_path / "data" / "b")
    os.symlink(tmp_path / "ext" / "B", tmp_path / "data" / "a")
    assert list(split_keys([str(tmp_path / "data")]).values()) == ["a/x.txt"]


def test_a_name_that_is_not_utf8_is_split_by_its_bytes(tmp_path) -> None:
    """A file whose name is not UTF-8 (Latin-1 ``café.txt`` from an old archive) crashed the split with
    UnicodeEncodeError ('surrogates not allowed'): its key is hashed as the name's bytes now, and a UTF-8
    name hashes as before."""
    latin = os.fsdecode(b"caf\xe9.txt")
    for name in (latin, "ok.txt", "new\nline.txt"):
        (tmp_path / name).write_text("x" * 40)
    keys = split_keys([str(tmp_path)])
    assert sorted(keys.values()) == sorted([latin, "ok.txt", "new\nline.txt"])
    assert sum(text_split_lengths(sorted(keys), 0.5, keys)) == 3 * 41
    assert validation_file_keys([str(tmp_path)], 0.5) is not None


@pytest.mark.parametrize("make", [os.mkfifo, lambda p: p.symlink_to("/dev/null")])
def test_a_fifo_or_device_named_as_data_is_said_to_be_no_regular_file(tmp_path, make) -> None:
    """A FIFO (or a device) named in data.paths "matched no file", as if it did not exist; reading it
    would block or never end. The message now says what it is."""
    make(tmp_path / "feed.txt")
    with pytest.raises(DataError, match=r"feed.txt.* is not a regular file"):
        split_keys([str(tmp_path / "feed.txt")])


def test_a_file_that_vanishes_after_the_walk_is_named(tmp_path) -> None:
    """A file removed between finding the files and taking their sizes: DataError naming it, from the
    size check as from the read (not a bare FileNotFoundError)."""
    _files(tmp_path, ["a.txt", "b.txt", "c.txt"])
    keys = split_keys([str(tmp_path)])
    (tmp_path / "b.txt").unlink()
    with pytest.raises(DataError, match=r"b.txt.* cannot be read"):
        read_bytes(sorted(keys))
    with pytest.raises(DataError, match=r"b.txt.* cannot be read"):
        text_split_lengths(sorted(keys), 0.5, keys)


@pytest.mark.parametrize("pattern", ["*/", "**/", "a/*/", "*/../*.txt", "**/../a/*.txt"])
def test_a_glob_the_walk_cannot_answer_is_refused_naming_it(tmp_path, pattern) -> None:
    """A glob ending in '/' (glob.glob matches folders only: it always "matched no file") or with a '..'
    after a wildcard was left to glob.glob, a second matcher beside the walk's (which the out_dir overlap
    check could not follow). Such a pattern is refused, saying why and what to write."""
    _files(tmp_path, ["a/b/x.txt", "a/y.txt"])
    with pytest.raises(DataError, match=r"data.paths entry .* (ends in '/'|'\.\.' after a wildcard)"):
        split_keys([f"{tmp_path}/{pattern}"])


@pytest.mark.slow  # ~0.5 s: 200 globs, each walked and globbed
def test_random_globs_find_the_files_glob_finds(tmp_path) -> None:
    """200 random globs (hidden names, brackets, ``?``, ``**`` anywhere) on a tree without links: the
    walk finds glob.glob's files (or both none). (A pattern naming a folder is a folder entry: its files.)"""
    _files(
        tmp_path,
        "a/x.txt a/b/y.txt a/b/c/z.md b/x.txt .h/x.txt a/.h/w.txt a/.e.txt s[1]/x.txt top.txt".split(),
    )
    pieces = ["*", "**", "?", "a", "b", ".h", ".*", "*.txt", "[ab]", "[!a]", "x.txt", "s[[]1]", "c"]
    rng = random.Random(52)
    for _ in range(200):
        pattern = "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
        given = str(tmp_path / pattern)
        if os.path.isdir(given):  # a folder entry reads the files below it, as glob.glob does not
            continue
        expected = sorted({Path(p).resolve() for p in glob.glob(given, recursive=True) if os.path.isfile(p)})
        try:
            found = resolve_files([given])
        except DataError:
            found = []
        assert found == expected, pattern


@pytest.mark.slow  # a first load_config in a process takes seconds; the check itself milliseconds
def test_a_config_check_walks_the_data_once(tmp_path, monkeypatch) -> None:
    """The out_dir check (is out_dir reached through a link in the data?) walked the data folder, then
    the check of the files walked it again: about 4 s more at 75,000 files. Once now."""
    from innerloop.config.load import load_config
    from innerloop.data import text

    _files(tmp_path / "data", [f"d{i}/f{j}.txt" for i in range(3) for j in range(30)])
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "z_link")
    (tmp_path / "elsewhere").mkdir()
    walked = []
    real_walk = text._Walk.walk

    def counting_walk(self, root):
        walked.append(root)
        return real_walk(self, root)

    monkeypatch.setattr(text._Walk, "walk", counting_walk)
    load_config(
        "tiny", [f"data.paths=[{tmp_path / 'data'}]", f"out_dir={tmp_path / 'run'}", "data.seq_len=16"]
    )
    assert len(walked) == 1
    walked.clear()
    split_keys([str(tmp_path / "data")])
    split_keys([str(tmp_path / "data")])
    assert len(walked) == 2  # outside a config check, each call walks the files as they are now


def test_a_glob_ending_in_two_stars_reads_no_file_of_the_folder_before_them(tmp_path) -> None:
    """``data/*/**`` read data's own files too (the ``**`` matching nothing after ``*`` matched a file),
    which glob.glob (and innerloop before s51i) does not: the files below data's folders only."""
    _files(tmp_path, ["top.txt", "a/x.txt", "a/b/y.txt"])
    found = resolve_files([str(tmp_path / "*" / "**")])
    assert found == [(tmp_path / "a" / "b" / "y.txt").resolve(), (tmp_path / "a" / "x.txt").resolve()]


def test_a_file_that_cannot_be_opened_is_named(tmp_path, monkeypatch) -> None:
    """A file without read permission: DataError naming it and data.paths. (The tests run as root, who
    reads any file: the open is refused by a stand-in for Path.open.)"""
    _files(tmp_path, ["a.txt", "locked.txt"])
    files = resolve_files([str(tmp_path)])
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    with pytest.raises(DataError, match=r"data.paths file .*locked.txt' cannot be read: Permission denied"):
        read_bytes(files)


def test_a_path_given_twice_and_overlapping_globs_read_each_file_once(tmp_path) -> None:
    """Holds (pinned): a folder given twice, and globs that overlap it, read each file once, under the
    first entry's key, and hold out the same files as the folder alone."""
    _files(tmp_path / "d", [f"s{i:02d}.txt" for i in range(20)] + ["sub/x.txt", "sub/y.md"])
    folder = str(tmp_path / "d")
    entries = [folder, str(tmp_path / "d" / "*.txt"), folder, str(tmp_path / "d" / "**" / "*")]
    keys = split_keys(entries)
    assert keys == split_keys([folder])
    assert len(resolve_files(entries)) == 22
    assert validation_file_keys(entries, 0.3) == validation_file_keys([folder], 0.3)
