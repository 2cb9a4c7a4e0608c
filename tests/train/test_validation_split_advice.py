"""The advice of a "too little validation text" error fits the split it is about.

With two or more files, the split by file hash may put every file on one side; then the last file in
sorted order is held out, whatever data.val_fraction is, so "a larger data.val_fraction" would be no
advice. The error says which file was held out and why, and what helps, for bytes (the config's check
from the files' sizes, and the DataModule's) and for a BPE tokenizer's tokens (the DataModule's).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from innerloop.config.load import ConfigError, load_config
from innerloop.data.text import (
    DataError,
    check_text_lengths,
    check_text_split,
    fallback_held_out,
    split_by_file,
    split_keys,
)
from innerloop.data.tokenizer import train_bpe
from innerloop.train.data import TextDataModule

LONG = "the quick brown fox jumps over the lazy dog. " * 40


def _two_files_on_one_side(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of b.txt (long) and c.txt (3 bytes with its separator): at data.val_fraction=0.1 the hash
    puts both into training, so c.txt, the last in sorted order, is held out."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text(LONG)
    (folder / "c.txt").write_text("ab")
    keys = split_keys([str(folder)])
    assert split_by_file(sorted(keys), 0.1, keys)[1] == []  # the premise: the hash holds out neither
    return folder, (folder / "c.txt").resolve()


def _fallback_advice(held_out: Path, unit: str) -> str:
    return (
        f"the validation text has 3 {unit}, fewer than data.seq_len + 1 = 17: the split by file hash at "
        f"data.val_fraction=0.1 put all 2 files on one side, so the last file in sorted order, "
        f"{str(held_out)!r}, is held out instead; give more files in data.paths (so that the hash split "
        "holds out some), a larger file that sorts last, or a shorter data.seq_len"
    )


def test_the_fallback_file_is_the_last_one_only_when_the_hash_holds_out_none(tmp_path) -> None:
    folder, held_out = _two_files_on_one_side(tmp_path)
    keys = split_keys([str(folder)])
    assert fallback_held_out(sorted(keys), 0.1, keys) == held_out
    assert split_by_file(sorted(keys), 0.5, keys)[1] == [held_out]
    assert fallback_held_out(sorted(keys), 0.5, keys) is None  # held out by the hash: no fallback
    assert fallback_held_out([held_out], 0.1) is None  # one file is split by bytes


def test_the_byte_level_check_from_sizes_names_the_held_out_file(tmp_path) -> None:
    folder, held_out = _two_files_on_one_side(tmp_path)
    keys = split_keys([str(folder)])
    with pytest.raises(DataError, match=re.escape(_fallback_advice(held_out, "bytes"))) as caught:
        check_text_split(sorted(keys), 0.1, 16, keys)
    assert "val_fraction or" not in str(caught.value)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_the_data_module_names_the_held_out_file(tmp_path, tokenizer) -> None:
    folder, held_out = _two_files_on_one_side(tmp_path)
    bpe = train_bpe([LONG], 300) if tokenizer == "bpe" else None  # "ab" and its end-of-text: 3 tokens
    data = TextDataModule([str(folder)], seq_len=16, batch_size=2, tokenizer=bpe)
    unit = "tokens" if tokenizer == "bpe" else "bytes"
    advice = _fallback_advice(held_out, unit).replace("data.", "")  # built by hand: its arguments (s58c)
    with pytest.raises(DataError, match=re.escape(advice)):
        data.setup()


def test_the_config_check_names_the_held_out_file(tmp_path) -> None:
    folder, held_out = _two_files_on_one_side(tmp_path)
    overrides = [f"data.paths=[{folder}]", "data.seq_len=16", f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=re.escape(_fallback_advice(held_out, "bytes"))):
        load_config("tiny", overrides)


def test_a_split_that_holds_out_files_by_hash_still_advises_a_larger_fraction() -> None:
    """There a larger data.val_fraction holds out more files; with one file, more of its bytes."""
    with pytest.raises(DataError, match=r"\(the held-out files\) has 3 bytes.*a larger data.val_fraction"):
        check_text_lengths(100, 3, 5, 16, 0.1)
    with pytest.raises(
        DataError, match=r"\(the last 0.1 of the file\) has 3 bytes.*a larger data.val_fraction"
    ):
        check_text_lengths(100, 3, 1, 16, 0.1)
