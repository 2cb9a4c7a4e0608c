"""Review s51g: the data pipeline at inputs earlier reviews did not try (corpora, splits, tokenizers)."""

from __future__ import annotations

import os

from innerloop.data.text import resolve_files, split_keys


def test_a_data_folder_reads_the_files_of_a_linked_subfolder_as_its_glob_does(tmp_path) -> None:
    """A data folder whose subfolder is a symbolic link (shards kept on another disk, linked in) gave
    none of that subfolder's files, while ``folder/**/*`` gave them: the run trained on part of the
    corpus without a word. Both now read the same files under the same split keys; a link back up (a
    loop) is entered once, and hidden names are still skipped."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "own").mkdir(parents=True)
    elsewhere.mkdir()
    (data / "own" / "a.txt").write_text("own text")
    (elsewhere / "b.txt").write_text("linked text")
    (elsewhere / ".hidden.txt").write_text("hidden")
    os.symlink(elsewhere, data / "shards")
    by_folder = split_keys([str(data)])
    assert sorted(by_folder.values()) == ["own/a.txt", "shards/b.txt"]
    assert by_folder == split_keys([str(data / "**" / "*")])
    os.symlink("..", data / "own" / "up")  # a loop: data/own/up/own/up/...
    assert split_keys([str(data)]) == by_folder
    assert resolve_files([str(data)]) == sorted(by_folder)
