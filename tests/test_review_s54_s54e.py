"""Regression tests of review 54's helper s54e, the data pipeline under hostile input (each seen failing
before its fix)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from innerloop.data.text import DataError, resolve_files
from innerloop.data.tokenizer import HFTokenizer, byte_level_tokenizer_json
from innerloop.train.data import TextDataModule


def _byte_level_tokenizer() -> HFTokenizer:
    """A Hugging Face tokenizer of the 256 bytes and an end-of-text token (id 256)."""
    return HFTokenizer(byte_level_tokenizer_json(end_of_text=True))


def test_too_few_validation_windows_of_a_tokenizer_run_are_counted_in_tokens(tmp_path: Path, caplog) -> None:
    """The warning that the validation text holds fewer windows than batches x batch size said "(251
    bytes)" of a run whose data.tokenizer counts tokens (make_val_examples passed no unit; the test
    text's and an evaluation's did). It now says tokens, and names the validation text."""
    (tmp_path / "a.txt").write_text("ab cd" * 100)
    module = TextDataModule(
        [str(tmp_path / "a.txt")],
        seq_len=4,
        batch_size=64,
        val_fraction=0.5,
        tokenizer=_byte_level_tokenizer(),
    )
    module.setup()
    with caplog.at_level(logging.WARNING, logger="innerloop.train.data"):
        inputs, _ = module.make_val_examples()
    assert inputs.shape == (62, 4)  # 251 tokens: (251 - 1) // 4 windows
    (message,) = [r.getMessage() for r in caplog.records if "windows of" in r.getMessage()]
    assert "(251 tokens)" in message and "bytes" not in message
    assert message.startswith("the validation text holds 62 windows")


def _resumed_warnings(paths: list[str], edit, caplog) -> list[str]:
    """The warnings of a TextDataModule resumed from a state recorded before ``edit()`` changed the data."""
    first = TextDataModule(paths, seq_len=8, batch_size=2, val_fraction=0.5)
    first.setup()
    state = first.state_dict()
    edit()
    resumed = TextDataModule(paths, seq_len=8, batch_size=2, val_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="innerloop.train.data"):
        resumed.load_state_dict(state)
        resumed.setup()
    return [record.getMessage() for record in caplog.records]


def test_a_resume_after_the_validation_text_was_edited_warns(tmp_path: Path, caplog) -> None:
    """A validation file (or a single file's validation tail) edited in place between a run and its
    resume, at the same length, left the split keys and cut and the training text as they were: the
    resumed run validated on other text, its val_loss curve a step off the one before, without a word
    (an edited training text warns; an hf run's edited validation documents are refused). The state
    now records the validation text's sha256, and a resume whose validation text differs warns."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first half of the text, " * 8 + "second half of the text " * 8)
    assert not [m for m in _resumed_warnings([str(corpus)], lambda: None, caplog) if "differs" in m]
    messages = _resumed_warnings(
        [str(corpus)], lambda: corpus.write_text(corpus.read_text()[:-6] + "edited"), caplog
    )
    (warning,) = [m for m in messages if "differs" in m]
    assert warning.startswith("the validation text differs from the one the checkpoint was validated on")
    assert "the training text" not in " ".join(messages)  # the tail only: training text as it was


def test_a_resume_after_a_validation_file_was_edited_warns(tmp_path: Path, caplog) -> None:
    """As above, for a corpus of several files: a held-out file rewritten at its length."""
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).write_text(f"the text of {name} " * 10)
    probe = TextDataModule([str(tmp_path)], seq_len=8, batch_size=2, val_fraction=0.5)
    probe.setup()
    held_out = tmp_path / probe.validation_keys[0]
    messages = _resumed_warnings(
        [str(tmp_path)], lambda: held_out.write_text(held_out.read_text().upper()), caplog
    )
    (warning,) = [m for m in messages if "differs" in m]
    assert warning.startswith("the validation text differs")


def test_a_broken_link_among_the_data_files_is_warned_of_not_dropped_silently(tmp_path: Path, caplog) -> None:
    """A data folder whose files are links (a corpus of links into a disk that is not mounted, a cache of
    links to blobs some of which were deleted): a link whose target is gone was left out of the data
    without a word, as glob.glob never did (it listed the link, which then failed to read), so a run
    trained on part of its data. It is now left out with a warning naming it and how many there are."""
    (tmp_path / "a.txt").write_text("text " * 20)
    (tmp_path / "b.txt").symlink_to(tmp_path / "gone" / "b.txt")
    (tmp_path / "c.txt").symlink_to(tmp_path / "gone" / "c.txt")
    (tmp_path / "notes.md").symlink_to(tmp_path / "gone" / "notes.md")  # not matched by *.txt
    for entry, others in ((str(tmp_path), 2), (str(tmp_path / "*.txt"), 1)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="innerloop.data.text"):
            assert resolve_files([entry]) == [tmp_path / "a.txt"]
        (message,) = [r.getMessage() for r in caplog.records]
        assert (
            f"data.paths entry {entry!r}: the link {str(tmp_path / 'b.txt')!r} (and {others} more)" in message
        )
        assert "leads to no file" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="innerloop.data.text"):
        resolve_files([str(tmp_path / "a.txt")])
    assert not caplog.records


def test_a_broken_link_named_as_a_data_file_is_called_one(tmp_path: Path) -> None:
    """A data.paths entry naming a link whose target is gone was said to "match no file (give files,
    directories or globs)", as if the name were wrong; the error now says it is a link and where to."""
    (tmp_path / "corpus.txt").symlink_to(tmp_path / "mnt" / "corpus.txt")
    with pytest.raises(DataError) as raised:
        resolve_files([str(tmp_path / "corpus.txt")])
    message = str(raised.value)
    assert f"data.paths entry {str(tmp_path / 'corpus.txt')!r} is a link to " in message
    assert f"{str(tmp_path / 'mnt' / 'corpus.txt')!r}, which does not exist" in message


def test_a_broken_link_named_as_hf_data_is_called_one(tmp_path: Path) -> None:
    """As above for data.name='hf' (a hub cache's snapshots/<rev>/train.jsonl -> blobs/<hash>, the blob
    deleted): the error said the entry "is not a local file or folder: data.name='hf' reads local files
    only (nothing is downloaded)", as if a hub name had been given."""
    from innerloop.data.hf import check_hf_source

    (tmp_path / "train.jsonl").symlink_to(tmp_path / "blobs" / "0123abcd")
    with pytest.raises(DataError) as raised:
        check_hf_source([str(tmp_path / "train.jsonl")])
    message = str(raised.value)
    assert "nothing is downloaded" not in message
    assert f"is a link to {str(tmp_path / 'blobs' / '0123abcd')!r}, which does not exist" in message
