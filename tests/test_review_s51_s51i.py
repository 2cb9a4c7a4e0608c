"""Review s51i: data folders and globs with links to folders (loops, split keys, an out_dir reached through
a link), and s51g's checks of a text corpus (Parquet / Arrow magic, NUL bytes)."""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import pytest

from innerloop.data.text import read_tokens, refuse_compressed, resolve_files, split_keys


def _tree(root: Path) -> None:
    """An ordinary tree (no link): files at several depths, hidden ones, a __pycache__, brackets."""
    for name in "a/x.txt a/b/y.txt a/b/c/z.md b/x.txt .h/x.txt a/.h/w.txt a/.e.txt s[1]/x.txt".split():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "top.txt").write_text("top")
    (root / "a" / "__pycache__").mkdir()
    (root / "a" / "__pycache__" / "m.txt").write_text("m")


_GLOBS = "**/*.txt ** */**/*.txt **/.h/* a/**/* */*.txt **/b/** **/[ab]/*.txt **/.* **/.h/** s[[]1]/*".split()


def test_a_glob_finds_the_files_glob_finds_on_a_tree_without_links(tmp_path) -> None:
    """A ``**`` glob is expanded by a walk now (below): on a tree without links it gives glob.glob's files,
    in the same order and under the same split keys, for globs with hidden names, brackets and two ``**``."""
    _tree(tmp_path)
    for pattern in _GLOBS:
        given = str(tmp_path / pattern)
        found = sorted({Path(p).resolve() for p in glob.glob(given, recursive=True) if os.path.isfile(p)})
        assert resolve_files([given]) == found, pattern
        folder = tmp_path.resolve().joinpath(*pattern.split("/")[: 1 if pattern.startswith("a/") else 0])
        assert split_keys([given]) == {p: p.relative_to(folder).as_posix() for p in found}, pattern


def test_a_glob_of_a_folder_with_two_link_loops_finishes(tmp_path) -> None:
    """``dir/**/*.txt`` on a folder holding ``x -> .`` and ``y -> .`` followed every route (x/y/x/...):
    it ran for minutes (> 20 s measured) where the folder entry took milliseconds. Each folder is now
    entered once for each place of the glob, as the folder entry enters it once."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    os.symlink(".", tmp_path / "x")
    os.symlink(".", tmp_path / "y")
    started = time.perf_counter()
    keys = split_keys([str(tmp_path / "**" / "*.txt")])
    assert time.perf_counter() - started < 0.2
    assert sorted(keys.values()) == ["a.txt", "sub/b.txt"]
    assert keys == split_keys([str(tmp_path)])


def test_a_link_that_sorts_first_renames_no_file_of_a_glob(tmp_path) -> None:
    """A ``**`` glob keyed a file found twice by its first path in sorted order: adding ``a_latest ->
    own`` renamed own/x.txt to a_latest/x.txt, which can move it between training and validation. A file
    keeps its own path now, as in a data folder; a file link that sorts first (``a.txt -> z.txt``) renames
    nothing either, for globs and folders alike."""
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "x.txt").write_text("x")
    (tmp_path / "z.txt").write_text("z")
    entries = ([str(tmp_path / "**" / "*.txt")], [str(tmp_path / "*" / "*.txt")], [str(tmp_path)])
    before = [split_keys(entry) for entry in entries]
    os.symlink(tmp_path / "own", tmp_path / "a_latest")
    os.symlink(tmp_path / "z.txt", tmp_path / "a.txt")
    for entry, keys in zip(entries, before, strict=True):
        assert split_keys(entry) == keys, entry


@pytest.mark.parametrize("entry", ["{d}", "{d}/**/*.txt"])
def test_a_subfolder_that_cannot_be_listed_is_said(tmp_path, monkeypatch, caplog, entry) -> None:
    """A subfolder the user may not read (permission denied) was left out of a folder's and a glob's files
    without a word (os.walk, rglob and glob skip it): the run trained on part of the corpus. Its files
    are still left out, with one warning naming it. (The tests run as root, who reads any folder: the
    listing is refused by a stand-in for os.scandir.)"""
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    scandir = os.scandir

    def refusing(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with caplog.at_level("WARNING", logger="innerloop.data.text"):
        assert sorted(split_keys([entry.format(d=tmp_path)]).values()) == ["a.txt"]
    assert f"the folder {str(tmp_path / 'locked')!r} cannot be read (Permission denied)" in caplog.text


def _data_with_link(tmp_path: Path, link_to: Path, name: str = "runs") -> Path:
    """A data folder of two text files and a link ``name`` to the folder ``link_to``."""
    data = tmp_path / "data"
    data.mkdir()
    for part in ("a", "b"):
        (data / f"{part}.txt").write_text(f"text {part} " * 40)
    link_to.mkdir(parents=True, exist_ok=True)
    os.symlink(link_to, data / name)
    return data


@pytest.mark.parametrize("entry", ["{d}", "{d}/**/*.yaml", "{d}/*/*"])
@pytest.mark.slow  # ~0.2 s each warm (a config loaded), the first load_config of a process several seconds
def test_an_out_dir_reached_through_a_link_in_the_data_is_refused(tmp_path, entry) -> None:
    """A link inside a data folder to the folder holding out_dir (``data/runs -> scratch``, out_dir
    scratch/run) was not seen (the check compared the entry's own folder, links resolved): the run's
    config.yaml, checkpoints and logs would be read as data at the next launch. Refused now, naming the
    link, for folders and globs, for a run's out_dir and an evaluation's --out alike."""
    from innerloop.config.load import ConfigError, check_output_outside_data, load_config

    scratch = tmp_path / "scratch"
    data = _data_with_link(tmp_path, scratch)
    given = entry.format(d=data)
    out = scratch if entry.endswith("*/*") else scratch / "run"  # one level below: scratch itself
    with pytest.raises(
        ConfigError, match=rf"is reached through the link '{data}/runs' below data.paths entry"
    ):
        load_config("tiny", [f"data.paths=[{given}]", f"out_dir={out}", "data.seq_len=16"])
    if not entry.endswith(".yaml"):  # an evaluation writes .csv, .png and .md files
        with pytest.raises(ConfigError, match="is reached through the link"):
            check_output_outside_data(out, [given], "--out", "--data")


@pytest.mark.slow  # two configs loaded, ~0.3 s warm
def test_an_out_dir_whose_folder_is_linked_into_the_data_is_refused(tmp_path) -> None:
    """The other way round: a link in the data to a folder inside out_dir (``data/logs -> run/logs``)."""
    from innerloop.config.load import ConfigError, load_config

    run = tmp_path / "run"
    data = _data_with_link(tmp_path, run / "logs", name="logs")
    with pytest.raises(ConfigError, match=rf"is reached through the link '{data}/logs' below"):
        load_config("tiny", [f"data.paths=[{data}]", f"out_dir={run}", "data.seq_len=16"])
    load_config("tiny", [f"data.paths=[{data}/*.txt]", f"out_dir={run}", "data.seq_len=16"])  # never in logs


def test_an_out_dir_behind_a_link_the_data_never_follows_is_accepted(tmp_path) -> None:
    """A hidden link (skipped below a data folder) or a glob that does not reach the link is no overlap."""
    from innerloop.config.load import check_output_outside_data

    scratch = tmp_path / "scratch"
    data = _data_with_link(tmp_path, scratch, name=".runs")
    for entry in (str(data), str(data / "**" / "*"), str(data / "*.txt")):
        check_output_outside_data(scratch / "run", [entry], "--out", "--data")


@pytest.mark.parametrize(
    "start", [b"PAR1 is the first part.\n", "ÿÿÿÿ -- fin du chapitre\n".encode("latin-1"), b"PAR", b"PAR1"]
)
def test_a_text_file_that_only_begins_as_a_dataset_file_is_read(tmp_path, start) -> None:
    """s51g refused a file as Parquet or Arrow by its first bytes alone: a plain text file beginning
    "PAR1" (a heading) was "a Parquet file (a dataset's records)", a latin-1 one beginning 'ÿÿÿÿ' (four
    0xff bytes) an Arrow stream, and the run refused its data. Such a file is one of them only where it
    also ends as one does (Parquet: PAR1; Arrow: ARROW1, or the stream's end-of-stream marker), as every
    file pyarrow and datasets write does; a file too short for both is text."""
    text = tmp_path / "notes.txt"
    text.write_bytes(start + (b"more words\n" * 4 if len(start) > 4 else b""))
    refuse_compressed([text])
    assert read_tokens([text]).numel() == text.stat().st_size + 1


def test_tokenizer_train_raw_reads_a_text_file_beginning_par1(tmp_path) -> None:
    """``innerloop tokenizer train --raw`` refused a UTF-8 text file beginning "PAR1" as a Parquet file."""
    from innerloop.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("PAR1 is the first part.\n" + "more words and some more text\n" * 40)
    assert (
        main(["tokenizer", "train", "--raw", "--vocab-size", "300", "--out", str(tmp_path / "t"), str(text)])
        == 0
    )
