"""`innerloop tokenizer train` (innerloop.data.tokenizer.train_bpe) on text with nothing to learn: an empty
or whitespace-only file is refused in one line naming it, as is text too short for a single merge (a
tokenizer without merges is the byte-level one with its ids moved); nothing is written. Text with fewer
merges in it than --vocab-size asks for gives a smaller tokenizer, and the command says how large."""

from __future__ import annotations

import re

import pytest

from innerloop.cli import main
from innerloop.data.tokenizer import TokenizerError, train_bpe

NO_TEXT = "has no text to learn merges from (empty, or only whitespace); train on files that hold text"


def _train(tmp_path, *files) -> int:
    return main(
        ["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok"), *map(str, files)]
    )


@pytest.mark.parametrize("text", ["", "\n", "\n\n\n", " \t\n  \r\n", "\u3000\n"], ids=repr)
def test_an_empty_or_whitespace_file_is_refused_naming_it(tmp_path, text) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TokenizerError, match=re.escape(f"{str(path)!r} {NO_TEXT}")):
        train_bpe([text], 300, files=[path])
    with pytest.raises(TokenizerError, match=re.escape(f"the training input {NO_TEXT}")):
        train_bpe(iter([text]), 300)  # read once, as the command's generator of file texts is


def test_several_files_without_text_are_named_together(tmp_path) -> None:
    files = [tmp_path / f"{n}.txt" for n in range(7)]
    message = f"the 7 files {', '.join(repr(str(f)) for f in files[:5])} and 2 more have no text to learn"
    with pytest.raises(TokenizerError, match=re.escape(message)):
        train_bpe(["", "\n"] * 3 + [" "], 300, files=files)


def test_one_file_with_text_among_empty_ones_is_enough(tmp_path) -> None:
    assert train_bpe(["", "\n", "hello hello"], 300).vocab_size > 257


@pytest.mark.parametrize(("text", "characters"), [("a", "1 character,"), ("a\nb", "3 characters,")])
def test_text_too_short_for_a_single_merge_is_refused(tmp_path, text, characters) -> None:
    """ByteLevel splits the text into words; no word of two bytes, no pair to merge."""
    path = tmp_path / "short.txt"
    with pytest.raises(TokenizerError) as caught:
        train_bpe([text], 300, files=[path])
    assert str(caught.value).startswith(
        f"{str(path)!r} has too little text to learn a single merge ({characters}"
    )
    assert "use data.tokenizer=bytes" in str(caught.value)


@pytest.mark.parametrize("text", ["", "\n\n \n", "a"])
def test_the_command_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, text) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    assert _train(tmp_path, path) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("innerloop tokenizer train: error: "), error
    assert "no text to learn merges from" in error or "too little text to learn a single merge" in error
    assert not (tmp_path / "tok").exists()


def test_a_small_text_gives_the_merges_it_has_and_says_how_many_tokens(tmp_path, capsys) -> None:
    path = tmp_path / "small.txt"
    path.write_text("ab", encoding="utf-8")
    assert _train(tmp_path, path) == 0
    assert (
        "258 tokens (fewer than --vocab-size 300: the text has no more merges to learn)"
        in capsys.readouterr().out
    )
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
