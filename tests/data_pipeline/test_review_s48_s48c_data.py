"""Review s48c: the data pipeline's file names and text (issue 11)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from innerloop.data.hf import iter_texts, open_hf_dataset


def _texts(paths: list[str], streaming: bool = False) -> list[str]:
    dataset = open_hf_dataset(paths, "train", streaming, "text")
    return [text for _, chunk in iter_texts(dataset, "text") for text in chunk]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_data_file_whose_name_holds_glob_characters_is_read_itself(tmp_path: Path, streaming: bool) -> None:
    # datasets reads data_files as glob patterns: the file 'x[1].jsonl' was read as 'x1.jsonl', and a glob
    # '*.jsonl' that found '[ab].jsonl', a.jsonl and b.jsonl read a and b twice and '[ab].jsonl' never
    for name, text in (("x[1].jsonl", "bracketed"), ("x1.jsonl", "plain"), ("[ab].jsonl", "literal")):
        (tmp_path / name).write_text(f'{{"text": "{text}"}}\n', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n', encoding="utf-8")
    assert _texts([str(tmp_path / "x[1].jsonl")], streaming) == ["bracketed"]
    assert _texts([str(tmp_path / "*.jsonl")], streaming) == ["literal", "a", "b", "plain", "bracketed"]


BOM = b"\xef\xbb\xbf"


def _byte_level_hf_tokenizer():
    from innerloop.data.tokenizer import HFTokenizer, byte_level_tokenizer_json

    return HFTokenizer(byte_level_tokenizer_json(end_of_text=True))


def test_a_utf8_byte_order_mark_is_not_text_where_a_file_is_decoded(tmp_path: Path) -> None:
    # a UTF-8 file saved with a byte-order mark (Windows Notepad) began its document with the character
    # U+FEFF, tokenized as text, where datasets' json and csv readers and Python's utf-8-sig drop it
    from innerloop.cli import _read_text_file
    from innerloop.data.text import read_tokens

    marked, plain = tmp_path / "marked.txt", tmp_path / "plain.txt"
    marked.write_bytes(BOM + "héllo\r\nworld\n".encode())
    plain.write_bytes("héllo\r\nworld\n".encode())
    tokenizer = _byte_level_hf_tokenizer()
    assert torch.equal(read_tokens([marked], tokenizer), read_tokens([plain], tokenizer))
    assert tokenizer.encode_bytes(marked.read_bytes()) == tokenizer.encode("héllo\r\nworld\n")
    assert _read_text_file(marked) == "héllo\r\nworld\n"
    # only a mark at the start: one inside the text is a character of it (a zero-width no-break space)
    inside = tmp_path / "inside.txt"
    inside.write_bytes(b"a" + BOM + b"b")
    assert read_tokens([inside], tokenizer).tolist()[:5] == [*b"a", *BOM, *b"b"]


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_utf8_byte_order_mark_is_not_the_text_of_a_text_data_file(
    tmp_path: Path, suffix: str, streaming: bool
) -> None:
    # datasets' text reader kept it as the first line's first character (its json and csv readers drop it)
    data = BOM + b"first line\nsecond\n"
    path = tmp_path / f"d{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    assert _texts([str(path)], streaming) == ["first line", "second"]
