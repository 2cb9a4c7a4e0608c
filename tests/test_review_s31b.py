"""Review s31b: black-box checks of issues 3, 5, 10, 11, 14 and 15 with shapes, configs and inputs the
other tests do not use. Kept here: what was wrong (regression tests), and promises no other test
checks (each says which).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from innerloop.cli import main


def test_tokenizer_train_at_257_tokens_is_refused_as_the_vocabulary_size_not_blamed_on_the_text(
    tmp_path: Path, capsys
) -> None:
    # Before: --vocab-size 257 passed the documented range (>= 257) and then always failed with "too
    # little text to learn a single merge ... no pair of bytes inside a word", whatever the corpus
    # (257 = the bytes and end-of-text leaves no room for a merge, which train_bpe requires).
    pytest.importorskip("tokenizers")
    from innerloop.data.tokenizer import TokenizerError, train_bpe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat, the cat sat on the hat\n" * 20, encoding="utf-8")
    assert main(["tokenizer", "train", "--vocab-size", "257", "--out", str(tmp_path / "t"), str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "--vocab-size: must be an integer >= 258, got '257'" in err and "little text" not in err
    with pytest.raises(TokenizerError, match=r"vocab_size=257 must be >= 258 .*data.tokenizer=bytes"):
        train_bpe([corpus.read_text(encoding="utf-8")], 257)
    assert main(["tokenizer", "train", "--vocab-size", "258", "--out", str(tmp_path / "t"), str(corpus)]) == 0
