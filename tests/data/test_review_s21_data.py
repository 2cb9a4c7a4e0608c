"""Review s21 (data pipeline): defects found in innerloop/data and the readers of a user's data, each left
as a strict xfail until fixed (report: notes/review_s21_data.md).

- MED: a text data file that cannot be read (permissions, I/O error) is a raw OSError traceback, not the
  one-line DataError naming the file (read_bytes / read_tokens).
- MED: data.name='hf' data files that are links to files without the suffix (the Hugging Face hub cache:
  snapshots/<rev>/x.jsonl -> blobs/<sha256>) are refused, naming a path the user never gave.
- MED: `eval --data` / `compare --data` of a save_to_disk folder always reads its split 'train': a saved
  Dataset of another split is refused naming data.split (which eval cannot set).
- MED: with a BPE tokenizer, the text "<|endoftext|>" inside a document becomes the document separator.
- LOW: a data.name='hf' dataset holding out no document (fewer than 1/val_fraction documents) is told
  its validation documents "hold fewer than seq_len + 1 tokens" and to raise val_fraction.
- LOW: the split key of a file found under two names (a link beside it) depends on directory order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest

from innerloop.data.text import DataError, read_tokens, split_keys, split_text_files

# -- MED: an unreadable data file -------------------------------------------------------------------------


def test_an_unreadable_text_file_is_a_data_error_naming_it(tmp_path) -> None:
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("hello " * 20)
    bad.write_text("secret " * 20)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    real_open = Path.open

    def open_(self: Path, *args, **kwargs):  # read_bytes reads the files into one buffer (s40d)
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    with (
        mock.patch.object(Path, "read_bytes", read_bytes),
        mock.patch.object(Path, "open", open_),
        pytest.raises(DataError, match="b.txt"),
    ):
        read_tokens([good, bad])


# -- MED: hf data files that are links into the hub cache's blobs -------------------------------------------


def test_hf_data_files_linked_to_suffixless_blobs_are_read_by_their_own_suffix(tmp_path) -> None:
    from innerloop.data.hf import check_hf_source

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "9f86d081").write_text(json.dumps({"text": "one document"}) + "\n")
    os.symlink("../../blobs/9f86d081", snapshot / "train.jsonl")
    builder, files = check_hf_source([str(snapshot / "train.jsonl")])
    assert builder == "json" and len(files) == 1


# -- MED: eval --data of a save_to_disk folder reads only its split 'train' ---------------------------------


@pytest.mark.slow  # builds and saves an Arrow dataset (~0.5 s)
def test_eval_data_reads_a_saved_dataset_of_another_split(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    from innerloop.train.data import dataset_tokens

    saved = tmp_path / "test_set"
    datasets.Dataset.from_dict({"text": ["ab", "cd"]}, split="test").save_to_disk(str(saved))
    tokens = dataset_tokens([str(saved)], "text")  # DataError: "data.split='train' is not the split ..."
    assert bytes(tokens.tolist()) == b"ab\0cd\0"


# -- MED: "<|endoftext|>" inside a document is the separator ------------------------------------------------


def test_the_text_of_the_end_of_text_token_inside_a_file_is_not_a_document_separator(tmp_path) -> None:
    pytest.importorskip("tokenizers")
    from innerloop.data.tokenizer import train_bpe

    tokenizer = train_bpe(["the quick brown fox jumps over the lazy dog " * 20], 300)
    text = tmp_path / "notes.md"
    text.write_text("GPT-2 separates documents with <|endoftext|> in its training data.")
    tokens = read_tokens([text], tokenizer).tolist()
    assert tokens.count(tokenizer.eos_id) == 1  # only the separator after the file


# -- LOW: an hf dataset that holds out no document ----------------------------------------------------------


@pytest.mark.slow  # opens a json dataset with `datasets` (~0.5 s)
def test_an_hf_dataset_holding_out_no_document_says_so(tmp_path) -> None:
    pytest.importorskip("datasets")
    from innerloop.train.data import HFDataModule

    data = tmp_path / "book.jsonl"
    data.write_text(json.dumps({"text": "a long single document " * 50}) + "\n")
    module = HFDataModule([str(data)], seq_len=8, batch_size=2, val_batches=1, val_fraction=0.5)
    with pytest.raises(DataError) as err:
        module.setup()
    message = str(err.value)
    assert message.startswith("no document is held out for validation"), message


# -- LOW: the split key of a file found under two names ----------------------------------------------------


def test_the_split_of_a_linked_file_does_not_depend_on_directory_order(tmp_path) -> None:
    # n0.txt hashes into validation at 0.5 and n1.txt into training; n1.txt is a link to n0.txt.
    (tmp_path / "n0.txt").write_text("x" * 100)
    os.symlink("n0.txt", tmp_path / "n1.txt")
    for name in ("o1.txt", "o2.txt", "o3.txt", "o4.txt"):
        (tmp_path / name).write_text("y" * 100)
    real = Path.rglob
    splits = []
    for order in (lambda found: sorted(found), lambda found: sorted(found, reverse=True)):

        def rglob(self: Path, pattern: str, order=order) -> list[Path]:
            return order(list(real(self, pattern)))

        with mock.patch.object(Path, "rglob", rglob):
            keys = split_keys([str(tmp_path)])
        splits.append(sorted(p.name for p in split_text_files(sorted(keys), 0.5, keys)[1]))
    assert splits[0] == splits[1]


@pytest.mark.slow  # builds and saves an Arrow dataset (~0.5 s)
def test_eval_data_of_a_saved_dataset_dict_needs_a_split_and_reads_the_one_named(tmp_path) -> None:
    """A saved DatasetDict was read as its split 'train' without a word; now its split is named (--split),
    and without it the error lists the splits."""
    datasets = pytest.importorskip("datasets")
    from innerloop.data.text import DataError
    from innerloop.train.data import dataset_tokens

    saved = tmp_path / "both"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["tr"]}),
            "test": datasets.Dataset.from_dict({"text": ["te"]}),
        }
    ).save_to_disk(str(saved))
    with pytest.raises(
        DataError, match=r"holds the splits \['test', 'train'\]: name the one to read with split"
    ):
        dataset_tokens([str(saved)], "text")
    assert bytes(dataset_tokens([str(saved)], "text", split="test").tolist()) == b"te\0"
    with pytest.raises(DataError, match="split='valid' is not a split of"):
        dataset_tokens([str(saved)], "text", split="valid")


def test_a_split_for_data_read_as_text_is_refused_naming_it(tmp_path) -> None:
    """--split names a split of records; --data read as text (a text run's, or without the run) has none:
    refused, not ignored."""
    from innerloop.config.load import ConfigError
    from innerloop.train.run import _windows_of_files

    text = tmp_path / "a.txt"
    text.write_text("some text to evaluate on " * 4)
    with pytest.raises(ConfigError, match=r"split='test' names a split of records.*leave split out"):
        _windows_of_files([str(text)], None, "no config.yaml beside it", 8, 1, 1, None, split="test")
