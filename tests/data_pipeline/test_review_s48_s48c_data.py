"""Review s48c: the data pipeline's file names and text (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
