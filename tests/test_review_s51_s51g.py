"""Review s51g: the data pipeline at inputs earlier reviews did not try (corpora, splits, tokenizers)."""

from __future__ import annotations

import os

import pytest

from innerloop.data.text import DataError, read_tokens, refuse_compressed, resolve_files, split_keys
from innerloop.train.data import TextDataModule


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
    os.symlink(data / "own", data / "a_latest")  # a link to a folder below: its files keep their keys
    assert split_keys([str(data)]) == by_folder
    assert resolve_files([str(data)]) == sorted(by_folder)


# How the files a data.name='hf' run reads begin: Parquet, Arrow's file format (Feather v2), and Arrow's
# stream format, which datasets' save_to_disk writes (data-00000-of-00001.arrow).
_DATASET_FILES = {
    "corpus.parquet": b"PAR1\x15\x04\x15\x1e",
    "corpus.feather": b"ARROW1\x00\x00\xff\xff\xff\xff",
    "data-00000-of-00001.arrow": b"\xff\xff\xff\xff\xf0\x00\x00\x00\x10\x00\x00\x00",
}


# How they end (the ends of pyarrow's and datasets' files, checked too since a text file may begin "PAR1").
_DATASET_ENDS = {
    "corpus.parquet": b"PAR1",
    "corpus.feather": b"ARROW1",
    "data-00000-of-00001.arrow": b"\xff\xff\xff\xff\x00\x00\x00\x00",
}


@pytest.mark.parametrize("name", sorted(_DATASET_FILES))
def test_a_text_run_refuses_a_dataset_file_by_its_bytes(tmp_path, name) -> None:
    """A Parquet or Arrow file (or a save_to_disk folder) given to a text run was read as its bytes: a
    byte-level model trained on the binary columns without a word (as on a compressed file, which is
    refused). It is refused now, naming the file and data.name=hf, whatever its name, at the config's
    check (refuse_compressed) and when the text is read (the data module, eval's read_tokens)."""
    text, data = tmp_path / "notes.txt", tmp_path / name
    text.write_text("plain text " * 40)
    data.write_bytes(_DATASET_FILES[name] + b"columns " * 40 + _DATASET_ENDS[name])
    for check, paths in (
        (lambda: refuse_compressed([text, data]), "data.paths"),
        (lambda: read_tokens([text, data]), "data.paths"),
        # a DataModule built by hand names its argument paths (s58c)
        (lambda: TextDataModule([str(tmp_path)], seq_len=8, batch_size=1).setup(), "paths"),
    ):
        with pytest.raises(DataError, match=rf"(?<![.\w]){paths} file {str(data)!r} is an? .*data.name=hf"):
            check()
    renamed = tmp_path / "renamed.txt"  # by its bytes, not its name
    data.rename(renamed)
    with pytest.raises(DataError, match=r"renamed.txt' is an? (Parquet|Arrow)"):
        read_tokens([renamed])


def test_a_data_folder_of_hidden_files_only_says_they_are_skipped(tmp_path) -> None:
    """A data folder whose files are all hidden (``.train.txt``) or in ``__pycache__`` was said to
    "match no file", which a folder holding files does not explain: the message says they are skipped
    and how to name them."""
    (tmp_path / ".train.txt").write_text("text " * 40)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "more.txt").write_text("text " * 40)
    with pytest.raises(
        DataError,
        match=r"no file .*: it holds 2 files, all hidden .* skipped below a folder.*'\.cache/more\.txt'",
    ):
        split_keys([str(tmp_path)])
    (tmp_path / ".train.txt").unlink()
    (tmp_path / ".cache" / "more.txt").unlink()
    with pytest.raises(DataError, match=r"matches no file \(give files"):  # an empty folder: as before
        split_keys([str(tmp_path)])


def test_a_byte_level_read_warns_of_a_file_holding_nul_bytes(tmp_path, caplog) -> None:
    """Byte 0 is the end of a document for a byte-level model (DOCUMENT_SEPARATOR, where generate stops),
    and text holds none: a binary file among the text (an image, a .pyc, a database) was read without a
    word, each of its NUL bytes a document end. One warning now names it and counts them; text files
    give none, and the bytes read are unchanged."""
    text, binary = tmp_path / "a.txt", tmp_path / "logo.png"
    text.write_text("plain text\n")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with caplog.at_level("WARNING", logger="innerloop.data.text"):
        clean = read_tokens([text])
    assert clean.tolist() == [*b"plain text\n", 0] and not caplog.records
    with caplog.at_level("WARNING", logger="innerloop.data.text"):
        both = read_tokens([text, binary])
    assert both.tolist() == [*b"plain text\n", 0, *binary.read_bytes(), 0]
    [record] = caplog.records
    assert f"{str(binary)!r} holds 3 NUL bytes" in record.getMessage()


def test_tokenizer_train_raw_refuses_a_dataset_file_by_its_bytes(tmp_path, capsys) -> None:
    """``innerloop tokenizer train --raw`` reads every PATH whole as text, JSON markup and all; a Parquet
    or Arrow file's binary columns are no text to learn merges from: one that was valid UTF-8 trained the
    tokenizer on them without a word, another was said to be "not UTF-8 text; convert it to UTF-8". It is
    refused now, naming the file and how to read its records (without --raw)."""
    from innerloop.cli import main

    for name, head in _DATASET_FILES.items():
        path = tmp_path / name
        path.write_bytes(head + b"columns of text " * 40 + _DATASET_ENDS[name])
        argv = [
            "tokenizer",
            "train",
            "--raw",
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "tok"),
            str(path),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{str(path)!r} is a" in err and "without --raw" in err, err
